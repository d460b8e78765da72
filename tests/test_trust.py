"""Issue 23 ("trust"): usage patterns that broke memory-saving layers elsewhere.

Each test runs one pattern on an :class:`~invertnet.InvertibleModuleWrapper` and on
the same module under ``disable=True`` (plain autograd), in float64, and asserts
either the same outputs and gradients (rel 1e-10, ``.grad is None`` exactly where
plain autograd leaves it ``None``, the caller's tensors bit-identical afterwards)
or a clear error naming the layer (``InvertibleModuleWrapper(...)``) and the cause.

Inputs come in three kinds (``how``): ``"batch"``, the caller's leaf that does not
require grad; ``"leaf"``, the caller's leaf that does (both are hidden by the wrapper
and handed back bit for bit in backward); ``"activation"``, ``leaf * 1``, which has a
``grad_fn`` and is freed and rebuilt by the inverse.
"""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    InvertibleModuleWrapper,
    is_invertible_module,
)
from tests._trust_helpers import (
    ATOL,
    F64,
    HOW,
    RTOL,
    H,
    N,
    assert_same,
    caller_input,
    data,
    detached,
    grads,
    loss_of,
    net,
)

KINDS = ["additive", "affine"]
LAYER = r"InvertibleModuleWrapper\("


# -- helpers ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def coupling(kind: str, fm: nn.Module | None = None, gm: nn.Module | None = None) -> nn.Module:
    fm = net() if fm is None else fm
    gm = net() if gm is None else gm
    if kind == "additive":
        return AdditiveCoupling(fm, gm).double()
    return AffineCoupling(fm, gm, adapter=AffineAdapterNaive).double()


def pair(module: nn.Module, **kwargs: Any) -> tuple[InvertibleModuleWrapper, ...]:
    """The module under a memory-saving wrapper, and a copy under plain autograd."""
    return (
        InvertibleModuleWrapper(copy.deepcopy(module), **kwargs),
        InvertibleModuleWrapper(copy.deepcopy(module), disable=True),
    )


def step(
    layer: nn.Module,
    how: str,
    seed: int | None = None,
    between: Callable[[], None] | None = None,
) -> list[Any]:
    """One forward and backward pass; returns outputs, the input's gradient and the
    parameters' gradients, after checking that the caller's leaf is unchanged."""
    x, inp, before = caller_input(how)
    if seed is not None:
        torch.manual_seed(seed)
    y = layer(inp)
    if between is not None:
        between()
    loss_of(y).backward()
    assert x.shape == before.shape and torch.equal(x.detach(), before)
    return [*detached(y), x.grad, *grads(layer)]


def snap(values: Any) -> list[torch.Tensor | None]:
    values = values if isinstance(values, (tuple, list)) else (values,)
    return [None if v is None else v.detach().clone() for v in values]


# -- 1. dropout -------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_with_default_arguments_matches_plain(kind: str, keep_input: bool, how: str):
    module = coupling(kind, net(nn.Dropout(0.5)), net(nn.Dropout(0.5)))
    wrapped, plain = pair(module, keep_input=keep_input)
    assert_same(step(wrapped, how, seed=7), step(plain, how, seed=7))


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_without_preserve_rng_state_is_refused(kind: str, keep_input: bool, how: str):
    module = coupling(kind, net(nn.Dropout(0.5)))
    layer = InvertibleModuleWrapper(module, keep_input=keep_input, preserve_rng_state=False)
    x, inp, before = caller_input(how)
    with pytest.raises(RuntimeError, match=LAYER + r".*drew random numbers"):
        layer(inp)
    assert x.shape == before.shape and torch.equal(x.detach(), before)
    assert inp.shape == before.shape and torch.equal(inp.detach(), before)


# -- 2. eval() between forward and backward ---------------------------------------------


@pytest.mark.parametrize("inner", ["batchnorm", "dropout"])
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_eval_before_backward_matches_plain(kind: str, keep_input: bool, how: str, inner: str):
    middle = nn.BatchNorm1d(H) if inner == "batchnorm" else nn.Dropout(0.5)
    module = coupling(kind, net(middle), net(copy.deepcopy(middle)))
    results, stats = [], []
    for layer in pair(module, keep_input=keep_input):
        model = nn.Sequential(layer)
        results.append(step(model, how, seed=3, between=model.eval))
        assert not model.training
        stats.append([b.clone() for b in model.buffers()])
    assert_same(*results)
    assert_same(*stats)
    if inner == "batchnorm":
        assert all(int(b) == 1 for b in stats[0] if b.dtype == torch.long)  # updated once


# -- 3. parameters written between forward and backward ------------------------------------


def _modify(model: nn.Module, how_modified: str, opt: torch.optim.Optimizer) -> None:
    if how_modified == "no_grad_add":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1)
    else:
        opt.step()


@pytest.mark.parametrize("how_modified", ["no_grad_add", "sgd_step"])
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_modified_in_place_before_backward_is_refused(
    kind: str, keep_input: bool, how: str, how_modified: str
):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=keep_input)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss_of(layer(data(5))).backward()  # a previous step: the optimizer has gradients
    x, inp, before = caller_input(how)
    y = layer(inp)
    _modify(layer, how_modified, opt)
    with pytest.raises(
        RuntimeError,
        match=LAYER + r".*parameter .* was modified in place between the forward pass and backward",
    ):
        loss_of(y).backward()
    assert x.shape == before.shape and torch.equal(x.detach(), before)


@pytest.mark.parametrize("how_modified", ["no_grad_add", "sgd_step"])
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_modified_in_place_before_backward_plain_raises_too(kind: str, how_modified):
    layer = InvertibleModuleWrapper(coupling(kind), disable=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss_of(layer(data(5))).backward()
    y = layer(data(1))
    _modify(layer, how_modified, opt)
    with pytest.raises(RuntimeError):
        loss_of(y).backward()


# -- 4. a fixed batch reused every step --------------------------------------------------


@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fixed_batch_reused_every_step(dtype: torch.dtype, requires_grad: bool, keep_input):
    blocks = [AffineCoupling(net(), net(), adapter=AffineAdapterNaive) for _ in range(3)]

    def build(**kwargs: Any) -> nn.Sequential:
        wrapped = (InvertibleModuleWrapper(copy.deepcopy(b), **kwargs) for b in blocks)
        return nn.Sequential(*wrapped).to(dtype)

    g = torch.Generator().manual_seed(11)
    batch = torch.randn(N, 2 * H, generator=g, dtype=dtype)
    target = torch.randn(N, 2 * H, generator=g, dtype=dtype)
    losses, input_grads, params = [], [], []
    for model in (build(keep_input=keep_input), build(disable=True)):
        x = batch.clone().requires_grad_(requires_grad)
        before, version = x.detach().clone(), x._version
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        seen = []
        for _ in range(5):
            opt.zero_grad()
            loss = (model(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
            seen.append(loss.detach())
            assert torch.equal(x.detach(), before)
            assert x._version == version
        losses.append(seen)
        input_grads.append([x.grad])
        params.append([p.detach().clone() for p in model.parameters()])
    rtol, atol = (RTOL, ATOL) if dtype == F64 else (1e-5, 1e-6)
    for got, want in zip(
        (losses[0], input_grads[0], params[0]), (losses[1], input_grads[1], params[1])
    ):
        assert len(got) == len(want)
        for g_, w_ in zip(got, want):
            assert (g_ is None) == (w_ is None)
            if g_ is not None:
                torch.testing.assert_close(g_, w_, rtol=rtol, atol=atol)


# -- 5. torch.func.functional_call ----------------------------------------------------------


def _shifted(layer: nn.Module) -> dict[str, torch.Tensor]:
    """New leaf tensors for the parameters, with other values than the module's own."""
    g = torch.Generator().manual_seed(21)
    return {
        n: (p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)).requires_grad_()
        for n, p in layer.named_parameters()
    }


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_functional_call_with_new_parameters(kind: str, keep_input: bool, how: str):
    results = []
    for layer in pair(coupling(kind), keep_input=keep_input):
        params = _shifted(layer)
        x, inp, before = caller_input(how)
        y = functional_call(layer, params, (inp,))
        loss_of(y).backward()
        assert all(p.grad is None for p in layer.parameters())
        assert torch.equal(x.detach(), before)
        results.append([*detached(y), x.grad, *(params[n].grad for n in sorted(params))])
    assert_same(*results)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_functional_call_with_new_parameters_and_buffers(kind: str, keep_input: bool, how: str):
    module = coupling(kind, net(nn.BatchNorm1d(H)), net(nn.BatchNorm1d(H)))
    results, passed_buffers = [], []
    for layer in pair(module, keep_input=keep_input):
        own_buffers = [b.clone() for b in layer.buffers()]
        tensors = _shifted(layer)
        buffers = {n: b.clone() for n, b in layer.named_buffers()}
        tensors.update(buffers)
        x, inp, before = caller_input(how)
        y = functional_call(layer, tensors, (inp,))
        loss_of(y).backward()
        assert all(p.grad is None for p in layer.parameters())
        assert all(torch.equal(b, o) for b, o in zip(layer.buffers(), own_buffers))
        assert torch.equal(x.detach(), before)
        names = sorted(n for n, _ in layer.named_parameters())
        results.append([*detached(y), x.grad, *(tensors[n].grad for n in names)])
        passed_buffers.append([buffers[n] for n in sorted(buffers)])
    assert_same(*results)
    assert_same(*passed_buffers)
    assert all(int(b) == 1 for b in passed_buffers[0] if b.dtype == torch.long)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_functional_call_with_maml_fast_weights(kind: str, keep_input: bool, how: str):
    results = []
    for layer in pair(coupling(kind), keep_input=keep_input):
        names, params = zip(*layer.named_parameters())
        xa, inp_a, before_a = caller_input(how, seed=1)
        inner = torch.autograd.grad(loss_of(layer(inp_a)), params)
        fast = {n: p - 0.1 * g for n, p, g in zip(names, params, inner)}
        xb, inp_b, before_b = caller_input(how, seed=2)
        outer = loss_of(functional_call(layer, fast, (inp_b,)))
        found = torch.autograd.grad(outer, list(layer.parameters()))
        assert all(p.grad is None for p in layer.parameters())
        assert torch.equal(xa.detach(), before_a) and torch.equal(xb.detach(), before_b)
        results.append([*inner, outer.detach(), *found])
    assert_same(*results)


# -- 6. hooks on the wrapped module ---------------------------------------------------------


def _register_logging_hooks(module: nn.Module, log: dict[str, list]) -> None:
    def pre(m, args):
        log["pre"].append(snap(args))

    def pre_kwargs(m, args, kwargs):
        log["pre_kwargs"].append([*snap(args), len(kwargs)])

    def fwd(m, args, out):
        log["forward"].append([*snap(args), *snap(out)])

    def fwd_kwargs(m, args, kwargs, out):
        log["forward_kwargs"].append([*snap(args), len(kwargs), *snap(out)])

    def bwd_pre(m, grad_output):
        log["backward_pre"].append(snap(grad_output))

    def bwd(m, grad_input, grad_output):
        log["backward"].append([*snap(grad_input), *snap(grad_output)])

    module.register_forward_pre_hook(pre)
    module.register_forward_pre_hook(pre_kwargs, with_kwargs=True)
    module.register_forward_hook(fwd)
    module.register_forward_hook(fwd_kwargs, with_kwargs=True)
    module.register_full_backward_pre_hook(bwd_pre)
    module.register_full_backward_hook(bwd)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_hooks_on_the_wrapped_module_run_as_without_wrapper(kind: str, keep_input: bool, how):
    results, logs = [], []
    for layer in pair(coupling(kind), keep_input=keep_input):
        log: dict[str, list] = defaultdict(list)
        _register_logging_hooks(layer.module, log)
        results.append(step(layer, how))
        logs.append(log)
    assert_same(*results)
    got, want = logs
    assert sorted(got) == sorted(want)
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in want.items()}
    assert all(len(v) == 1 for v in want.values())
    for key in want:
        for g, w in zip(got[key], want[key]):
            assert len(g) == len(w), key
            for a, b in zip(g, w):
                if isinstance(b, int):
                    assert a == b, key
                else:
                    assert_same([a], [b])


@pytest.mark.parametrize("hook", ["forward", "forward_kwargs", "pre", "pre_kwargs"])
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_hook_returning_new_output_or_inputs_is_refused(kind: str, keep_input: bool, hook: str):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=keep_input)
    m = layer.module
    if hook == "forward":
        m.register_forward_hook(lambda mod, args, out: out * 2)
    elif hook == "forward_kwargs":
        m.register_forward_hook(lambda mod, args, kwargs, out: out * 2, with_kwargs=True)
    elif hook == "pre":
        m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    else:
        m.register_forward_pre_hook(
            lambda mod, args, kwargs: ((args[0] * 2,), kwargs), with_kwargs=True
        )
    x, inp, before = caller_input("leaf")
    with pytest.raises(RuntimeError, match=LAYER + r".*hook"):
        layer(inp)
    assert x.shape == before.shape and torch.equal(x.detach(), before)


@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_deprecated_backward_hook_is_refused(kind: str, keep_input: bool):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=keep_input)
    layer.module.register_backward_hook(lambda mod, gi, go: None)
    x, inp, before = caller_input("leaf")
    with pytest.raises(RuntimeError, match=LAYER + r".*register_full_backward_hook"):
        layer(inp)
    assert x.shape == before.shape and torch.equal(x.detach(), before)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_full_backward_hook_replacing_grad_input(kind: str, keep_input: bool, how: str):
    def replace(mod, grad_input, grad_output):
        return tuple(None if g is None else 3 * g + 1 for g in grad_input)

    results = []
    for layer in pair(coupling(kind), keep_input=keep_input):
        layer.module.register_full_backward_hook(replace)
        results.append(step(layer, how))
    assert_same(*results)


# -- 7. a sub-module writing over its input -------------------------------------------------


class MulInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return torch.tanh(self.linear(x))


@pytest.mark.parametrize("writer", ["relu_inplace", "mul_"])
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_sub_module_writing_over_its_input_is_refused(
    kind: str, keep_input: bool, how: str, writer: str
):
    fm = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(H, H)) if writer != "mul_" else MulInput()
    layer = InvertibleModuleWrapper(coupling(kind, fm), keep_input=keep_input)
    _, inp, before = caller_input(how)
    with pytest.raises(RuntimeError, match=LAYER + r".*wrote over its input"):
        layer(inp)
    assert inp.shape == before.shape  # not left freed


# -- 8. inputs made from numpy arrays -------------------------------------------------------


@pytest.mark.parametrize("maker", ["from_numpy", "as_tensor"])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_input_from_numpy(kind: str, keep_input: bool, requires_grad: bool, maker: str):
    array = np.random.default_rng(0).standard_normal((N, 2 * H))
    original = array.copy()
    results = []
    for layer in pair(coupling(kind), keep_input=keep_input):
        x = torch.from_numpy(array) if maker == "from_numpy" else torch.as_tensor(array)
        x.requires_grad_(requires_grad)
        y = layer(x)
        loss_of(y).backward()
        assert np.array_equal(array, original)
        assert x.shape == (N, 2 * H) and torch.equal(x.detach(), torch.from_numpy(original))
        results.append([*detached(y), x.grad, *grads(layer)])
    assert_same(*results)


# -- 9. memcnn's check that an input was freed ----------------------------------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", KINDS)
def test_freed_input_answers_memcnns_storage_checks(kind: str, how: str):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=False)
    x, inp, before = caller_input(how)
    y = layer(inp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated
        assert inp.storage().size() == 0
    assert inp.untyped_storage().size() == 0
    assert inp.untyped_storage().nbytes() == 0
    inp.data_ptr()
    with pytest.raises(RuntimeError, match="keep_input=True"):
        inp + 1
    with pytest.raises(RuntimeError, match="keep_input=True"):
        inp.sum()
    loss_of(y).backward()
    assert inp.shape == before.shape
    if how == "activation":
        torch.testing.assert_close(inp.detach(), before, rtol=RTOL, atol=ATOL)
    else:
        assert torch.equal(inp.detach(), before)
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close((inp + 1).detach(), before + 1, rtol=RTOL, atol=ATOL)


# -- 10. double backward -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["leaf", "activation"])
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_is_refused(kind: str, keep_input: bool, how: str):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=keep_input)
    x, inp, before = caller_input(how)
    (g,) = torch.autograd.grad(loss_of(layer(inp)), x, create_graph=True)
    with pytest.raises(RuntimeError, match=LAYER + r".*double backward"):
        g.sum().backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("api", ["autograd.grad", "backward"])
@pytest.mark.parametrize("how", ["leaf", "activation"])
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_create_graph_alone_gives_first_order_gradients(
    kind: str, keep_input: bool, how: str, api: str
):
    results = []
    for layer in pair(coupling(kind), keep_input=keep_input):
        x, inp, before = caller_input(how)
        loss = loss_of(layer(inp))
        wrt = [x, *layer.parameters()]
        if api == "backward":
            loss.backward(create_graph=True)
            found = [t.grad for t in wrt]
        else:
            found = list(torch.autograd.grad(loss, wrt, create_graph=True))
        assert torch.equal(x.detach(), before)
        results.append([None if g is None else g.detach() for g in found])
    assert_same(*results)


# -- 11. forward-mode AD and torch.func ----------------------------------------------------


@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_ad_is_refused(kind: str, keep_input: bool):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=keep_input)
    x, tangent = data(1, requires_grad=False), data(2, requires_grad=False)
    before = x.clone()
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=LAYER + r".*forward-mode AD"):
        layer(fwAD.make_dual(x, tangent))
    assert torch.equal(x, before)


@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_is_refused(kind: str, keep_input: bool):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=keep_input)
    x = data(1, requires_grad=False)
    before = x.clone()
    with pytest.raises(RuntimeError, match=LAYER + r".*torch\.func"):
        torch.func.grad(lambda v: layer(v).sum())(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_ad_and_torch_func_work_with_disable(kind: str):
    layer = InvertibleModuleWrapper(coupling(kind), disable=True)
    x, tangent = data(1, requires_grad=False), data(2, requires_grad=False)
    with fwAD.dual_level():
        got_tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, tangent))).tangent
    _, want_tangent = torch.autograd.functional.jvp(layer, x, tangent)
    torch.testing.assert_close(got_tangent, want_tangent, rtol=RTOL, atol=ATOL)
    got_grad = torch.func.grad(lambda v: layer(v).sum())(x)
    leaf = x.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(layer(leaf).sum(), leaf)
    torch.testing.assert_close(got_grad, want_grad, rtol=RTOL, atol=ATOL)


# -- 12. an output written in place before backward ----------------------------------------


@pytest.mark.parametrize("mode", ["no_grad", "in_graph"])
@pytest.mark.parametrize("how", ["batch", "leaf"])
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_output_modified_in_place_is_refused(kind: str, keep_input: bool, how: str, mode: str):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=keep_input)
    x, inp, before = caller_input(how)
    y = layer(inp)
    if mode == "no_grad":
        with torch.no_grad():
            y.mul_(2)
    else:
        y.mul_(2)
    with pytest.raises(RuntimeError, match=LAYER + r".*output 0 was modified in place"):
        loss_of(y).backward()
    assert x.shape == before.shape and torch.equal(x.detach(), before)
    torch.testing.assert_close((x + 1).detach(), before + 1)  # usable, not hidden


# -- 13. a graph discarded without backward -------------------------------------------------


@pytest.mark.parametrize("with_loss", [False, True])
@pytest.mark.parametrize("how", ["batch", "leaf"])
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_graph_discarded_without_backward_gives_the_input_back(
    kind: str, keep_input: bool, how: str, with_loss: bool
):
    layer = InvertibleModuleWrapper(coupling(kind), keep_input=keep_input)
    x, inp, before = caller_input(how)
    y = layer(inp)
    loss = loss_of(y) if with_loss else None
    del y, loss
    gc.collect()
    assert x.shape == before.shape and torch.equal(x.detach(), before)
    torch.testing.assert_close((x + 1).detach(), before + 1)


# -- 14. siamese use ------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_siamese_two_batches_one_backward(kind: str, keep_input: bool, how: str):
    module = coupling(kind, net(nn.BatchNorm1d(H)), net(nn.BatchNorm1d(H)))
    results, stats = [], []
    for layer in pair(module, keep_input=keep_input):
        x1, in1, before1 = caller_input(how, seed=1)
        x2, in2, before2 = caller_input(how, seed=2)
        y1 = layer(in1)
        y2 = layer(in2)
        (loss_of(y1) + (y1 * y2).sum()).backward()
        assert torch.equal(x1.detach(), before1) and torch.equal(x2.detach(), before2)
        results.append([y1.detach(), y2.detach(), x1.grad, x2.grad, *grads(layer)])
        stats.append([b.clone() for b in layer.buffers()])
    assert_same(*results)
    assert_same(*stats)
    assert all(int(b) == 2 for b in stats[0] if b.dtype == torch.long)


def _shared_module_matches_plain(
    module: nn.Module, forward: Callable[[nn.Module, bool, torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """``forward(shared, disable, input)`` on a copy of ``module`` through memory-saving
    wrappers and through disabled ones, then backward: outputs, gradients and
    buffers agree, and the caller's input comes back; returns the buffers."""
    results, stats = [], []
    for disable in (False, True):
        shared = copy.deepcopy(module)
        x, inp, before = caller_input("activation")
        y = forward(shared, disable, inp)
        loss_of(y).backward()
        assert torch.equal(x.detach(), before)
        results.append([y.detach(), x.grad, *grads(shared)])
        stats.append([b.clone() for b in shared.buffers()])
    assert_same(*results)
    assert_same(*stats)
    return stats[0]


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_one_module_under_two_wrappers_in_one_forward(kind: str, keep_input: bool, dropout: bool):
    """The same module (BatchNorm inside) under two wrappers, called one after the
    other before one backward, as a block repeated in a stack is: the first call's
    record keeps its buffer values before the second call updates them, so
    gradients and running statistics equal plain autograd's (this raised, naming
    the buffer as written by someone else)."""

    def middle() -> tuple[nn.Module, ...]:
        return (nn.BatchNorm1d(H), *((nn.Dropout(0.3),) if dropout else ()))

    def forward(shared: nn.Module, disable: bool, inp: torch.Tensor) -> torch.Tensor:
        first, second = (
            InvertibleModuleWrapper(shared, keep_input=keep_input, disable=disable)
            for _ in range(2)
        )
        torch.manual_seed(5)
        return second(first(inp))

    stats = _shared_module_matches_plain(coupling(kind, net(*middle()), net(*middle())), forward)
    assert all(int(b) == 2 for b in stats if b.dtype == torch.long)


@pytest.mark.parametrize("second", ["no_grad", "disabled"])
def test_module_run_unrecorded_by_another_wrapper_before_backward(second: str):
    """A second wrapper of the same module runs it without recording (under
    ``torch.no_grad()`` in training mode, or with ``disable=True``) before the
    first call's backward: BatchNorm's statistics move, and the first call's record
    keeps its buffer values first, so its gradients equal plain autograd's."""

    def forward(shared: nn.Module, disable: bool, inp: torch.Tensor) -> torch.Tensor:
        y = InvertibleModuleWrapper(shared, disable=disable)(inp)
        other = InvertibleModuleWrapper(shared, disable=second == "disabled")
        if second == "no_grad":
            with torch.no_grad():
                other(data(2) * 1)
        else:
            other(data(2) * 1)  # its graph is dropped
        return y

    module = coupling("additive", net(nn.BatchNorm1d(H)), net(nn.BatchNorm1d(H)))
    stats = _shared_module_matches_plain(module, forward)
    assert all(int(b) == 2 for b in stats if b.dtype == torch.long)


def test_records_of_models_dropped_without_backward_do_not_pile_up(monkeypatch):
    """Records awaiting backward are registered by module, so that another layer
    running the module makes them keep their buffers; those of models dropped after
    a forward pass without backward are swept out every few registrations."""
    from invertnet._runtime import forward_state

    monkeypatch.setattr(forward_state, "_SWEEP_EVERY", 4)
    monkeypatch.setattr(forward_state, "_registrations", 0)
    for _ in range(20):
        layer = InvertibleModuleWrapper(
            coupling("additive", net(nn.BatchNorm1d(H)), net(nn.BatchNorm1d(H)))
        )
        layer(data(1) * 1)  # the graph is dropped without backward
        del layer
        gc.collect()
    # At most the models registered since the last sweep (20 is a multiple of 4),
    # two BatchNorm modules each.
    assert len(forward_state._awaiting) <= 2


# -- 15. an output unused by the loss -------------------------------------------------------


@pytest.mark.parametrize("used", [0, 1])
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_output_unused_by_the_loss(kind: str, keep_input: bool, how: str, used: int):
    results = []
    for layer in pair(coupling(kind), keep_input=keep_input):
        x1, in1, before1 = caller_input(how, seed=1, shape=(N, H))
        x2, in2, before2 = caller_input(how, seed=2, shape=(N, H))
        ys = layer(in1, in2)
        assert isinstance(ys, tuple) and len(ys) == 2
        loss_of(ys[used]).backward()
        assert torch.equal(x1.detach(), before1) and torch.equal(x2.detach(), before2)
        results.append([*detached(ys), x1.grad, x2.grad, *grads(layer)])
    assert_same(*results)
    if used == 0:  # y1 = x1 (+)  Fm(x2): Gm's parameters get None
        assert any(g is None for g in results[1][4:])


# -- 16. a parameter frozen between forward and backward ------------------------------------


@pytest.mark.parametrize("which", ["Fm-first", "Gm-last"])
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_frozen_between_forward_and_backward(
    kind: str, keep_input: bool, how: str, which: str
):
    results = []
    for layer in pair(coupling(kind), keep_input=keep_input):
        sub, position = (layer.module.Fm, 0) if which == "Fm-first" else (layer.module.Gm, -1)
        frozen = list(sub.parameters())[position]
        found = step(layer, how, between=lambda frozen=frozen: frozen.requires_grad_(False))
        assert frozen.grad is None
        assert sum(p.grad is None for p in layer.parameters()) == 1
        results.append(found)
    assert_same(*results)


# -- 17. checks, pickling and copies between forward and backward ---------------------------


@pytest.mark.parametrize("action", ["deepcopy", "pickle", "is_invertible_module"])
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_copy_or_check_between_forward_and_backward(
    kind: str, keep_input: bool, how: str, action: str
):
    results, copies = [], []

    def act(model: nn.Module) -> None:
        if action == "deepcopy":
            copies.append(copy.deepcopy(model))
        elif action == "pickle":
            copies.append(pickle.loads(pickle.dumps(model)))
        else:
            assert is_invertible_module(model[0], (N, 2 * H), atol=1e-10)

    for layer in pair(coupling(kind), keep_input=keep_input):
        model = nn.Sequential(layer)
        results.append(step(model, how, between=lambda model=model: act(model)))
    assert_same(*results)
    if copies:
        # The copies work on their own: a full step gives the plain layer's gradients.
        wrapped_copy, plain_copy = copies
        assert isinstance(wrapped_copy[0], InvertibleModuleWrapper)
        assert_same(step(wrapped_copy, how), step(plain_copy, how))


# -- 18. a buffer the forward pass reads and updates (spectral norm) ------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("keep_input", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_buffer_read_and_updated_in_forward_is_replayed_from_before(
    kind: str, keep_input: bool, how: str
):
    """Spectral normalisation's power iteration reads and updates its vector ``u``:
    the recomputation is given ``u`` as the forward pass found it (with the values
    the forward pass left, gradients were off by a few percent), and the buffers end
    as plain training leaves them."""

    def sn_net() -> nn.Module:
        return nn.Sequential(nn.utils.spectral_norm(nn.Linear(H, H)), nn.Tanh())

    module = coupling(kind, sn_net(), sn_net())
    wrapped, plain = pair(module, keep_input=keep_input)
    assert_same(step(wrapped, how), step(plain, how))
    for (name, b), (_, c) in zip(wrapped.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=name)
