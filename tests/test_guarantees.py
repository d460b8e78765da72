"""The misuse matrix: what a user may do with a memory-saving layer (issue 23, point 9).

A memory-saving layer runs its sub-modules twice (forward, then again in backward)
and frees or reads back tensors the caller may still hold. Each test below is one
usage pattern that users of ``torch.utils.checkpoint``, memcnn, RevLib or
momentumnet reported (or that follows from how they work), run on an invertnet layer
and on the same layer with plain autograd (``disable=True``, or
``MomentumNet(use_backprop=True)``), in float64. Each asserts what
``docs/guide/guarantees.rst`` promises:

* the same values and gradients as plain autograd (rel 1e-10; ``.grad is None``
  exactly where plain autograd leaves it ``None``), or a clear error, one that names
  invertnet's layer and the cause, raised before anything is lost;
* where plain autograd raises, invertnet raises too;
* the caller's tensors (inputs, gradients passed to ``backward``) are never changed.

Where both outcomes keep the rules, a test accepts either (``same_or_clear_error``);
where only one does (plain autograd raises, or the pattern is an ordinary training
step), it asks for that one.

Every reference path can be checked on its own: with
``INVERTNET_GUARANTEES_SELF_CHECK=1`` in the environment, the memory-saving layer is
replaced by a second copy of its plain counterpart, and every test must pass.
"""

from __future__ import annotations

import copy
import gc
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.utils.checkpoint import checkpoint

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    InvertibleModuleWrapper,
    MomentumNet,
)

F64 = torch.float64
SELF_CHECK = os.environ.get("INVERTNET_GUARANTEES_SELF_CHECK", "") not in ("", "0")

# -- Small invertible modules -------------------------------------------------------


def tanh_net(n: int) -> nn.Module:
    """The default sub-network: ``tanh(Linear(x))``, so that a wrong reconstruction or a
    stale weight changes the gradients visibly."""
    return nn.Sequential(nn.Linear(n, n), nn.Tanh())


class Generic(nn.Module):
    """Invertible but not a coupling, so the wrapper inverts it and runs it forward
    again (no fused backward): ``(a, b) -> (a * e^s, b + net(a))``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.log_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([a * torch.exp(self.log_scale), b + self.net(a)], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a_scaled, b_shifted = y.chunk(2, dim=1)
        a = a_scaled * torch.exp(-self.log_scale)
        return torch.cat([a, b_shifted - self.net(a)], dim=1)


class TwoInTwoOut(nn.Module):
    """A generic module of two inputs and two outputs:
    ``y1 = a + f(b)``, ``y2 = b * e^s + g(y1)``."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.f, self.g = tanh_net(n), tanh_net(n)
        self.log_scale = nn.Parameter(torch.tensor(-0.2))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1 = a + self.f(b)
        return y1, b * torch.exp(self.log_scale) + self.g(y1)

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = (y2 - self.g(y1)) * torch.exp(-self.log_scale)
        return y1 - self.f(b), b


class Identity(nn.Module):
    """Returns its input itself (memcnn PR 40 made identity functions work)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y


class Reshape(nn.Module):
    """Returns a view of its input, scaled by a parameter only in its second half."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], 2, -1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.view(y.shape[0], -1)


class Shift(nn.Module):
    """Adds (or multiplies by) a buffer, as a normalisation with running statistics
    or a fixed positional table does."""

    def __init__(self, n: int, use: str) -> None:
        super().__init__()
        self.use = use
        self.register_buffer("value", torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value if self.use == "add" else x * self.value


class Scaled(nn.Module):
    """A MomentumNet function with an extra argument: ``tanh(Linear(x)) * scale``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        return h if scale is None else h * scale


class Biased(nn.Module):
    """A MomentumNet function with an extra argument used additively:
    ``tanh(Linear(x) + bias)``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x) + bias)


# -- The layers under test ----------------------------------------------------------


@dataclass
class Layer:
    """A memory-saving layer and its plain-autograd counterpart, with the same weights."""

    saving: nn.Module
    plain: nn.Module
    name: str  # the class an invertnet error should name
    rtol: float = 1e-10
    atol: float = 1e-12


WIDTH = 4  # features of the (3, WIDTH) input every layer takes
# Wrapper kinds: the coupling engine's fused backward (additive, affine), and the
# inverse-plus-re-forward path (generic), each freeing its input or keeping it.
WRAPPERS = ["additive", "additive-keep", "affine", "generic", "generic-keep"]
LAYERS = [*WRAPPERS, "momentum"]


def _wrap(module: nn.Module, **kwargs: Any) -> Layer:
    module = module.to(F64)
    plain = InvertibleModuleWrapper(copy.deepcopy(module), disable=True)
    if SELF_CHECK:
        saving: nn.Module = InvertibleModuleWrapper(copy.deepcopy(module), disable=True)
    else:
        saving = InvertibleModuleWrapper(copy.deepcopy(module), **kwargs)
    return Layer(saving, plain, "InvertibleModuleWrapper")


def build(kind: str, net: Callable[[int], nn.Module] = tanh_net, seed: int = 0) -> Layer:
    """The layer ``kind`` of :data:`LAYERS`, its sub-networks made by ``net(features)``."""
    torch.manual_seed(seed)
    keep = kind.endswith("-keep")
    base = kind.removesuffix("-keep")
    half = WIDTH // 2
    if base == "additive":
        return _wrap(AdditiveCoupling(net(half), net(half)), keep_input=keep)
    if base == "affine":
        return _wrap(
            AffineCoupling(net(half), net(half), adapter=AffineAdapterNaive), keep_input=keep
        )
    if base == "generic":
        return _wrap(Generic(net(half)), keep_input=keep)
    if base == "momentum":
        functions = [net(WIDTH), net(WIDTH)]
        plain = MomentumNet(copy.deepcopy(functions), gamma=0.9, use_backprop=True).to(F64)
        saving = MomentumNet(copy.deepcopy(functions), gamma=0.9, use_backprop=SELF_CHECK)
        # The exact mode holds the state in 64-bit fixed point, plain mode in float64:
        # the two differ by ~1e-9 by design (MomentumNet's Notes), far below the
        # percent-level errors a misuse causes.
        return Layer(saving.to(F64), plain, "MomentumNet", rtol=1e-7, atol=1e-8)
    raise ValueError(kind)


def batch(requires_grad: bool = True, seed: int = 1, shape: Sequence[int] = (3, WIDTH)):
    """A fresh float64 input; the same values for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_(requires_grad)


def loss_of(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A fixed random projection of the outputs: every output element gets its own
    gradient, the same in both runs."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    gen = torch.Generator().manual_seed(1234)
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in model.parameters()]


# -- Assertions ---------------------------------------------------------------------


def assert_same(got: Sequence[Any], want: Sequence[Any], layer: Layer) -> None:
    """Values and gradients equal to plain autograd's, ``None`` exactly where its are."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            assert g is None and w is None, f"entry {i}: got {g!r}, plain autograd {w!r}"
        elif isinstance(w, torch.Tensor):
            torch.testing.assert_close(
                g, w, rtol=layer.rtol, atol=layer.atol, msg=lambda m, i=i: f"entry {i}: {m}"
            )
        else:
            assert g == w, f"entry {i}: got {g!r}, plain autograd {w!r}"


def snapshot(t: torch.Tensor) -> tuple[torch.Size, tuple[int, ...], torch.Tensor]:
    return t.shape, t.stride(), t.detach().clone()


def assert_unchanged(t: torch.Tensor, snap: tuple[torch.Size, tuple[int, ...], torch.Tensor]):
    """The caller's tensor is bit for bit what it was: shape, layout and values."""
    shape, stride, values = snap
    assert t.shape == shape, f"the caller's tensor changed shape: {tuple(t.shape)}"
    assert t.stride() == stride, f"the caller's tensor changed layout: {t.stride()}"
    assert torch.equal(t.detach(), values), "the caller's tensor changed values"


def assert_clear(err: BaseException, layer: Layer, cause: str) -> None:
    """An error that names invertnet's layer and, in words matching ``cause``, why."""
    text = str(err)
    assert layer.name in text, f"the error does not name {layer.name}: {err!r}"
    assert re.search(cause, text, re.IGNORECASE), f"the error does not say why ({cause}): {err!r}"


Pattern = Callable[[nn.Module, list[torch.Tensor]], Sequence[Any]]


def same_or_clear_error(
    layer: Layer,
    pattern: Pattern,
    make_inputs: Callable[[], list[torch.Tensor]],
    cause: str,
    unchanged: Sequence[int] | None = None,
) -> None:
    """Run ``pattern(model, inputs)`` on both layers: invertnet must return what plain
    autograd returns, or raise a clear error; either way the caller's inputs (those at
    the positions ``unchanged``, by default all) are kept."""
    want = pattern(layer.plain, make_inputs())
    inputs = make_inputs()
    before = [snapshot(t) for t in inputs]
    try:
        got = pattern(layer.saving, inputs)
    except Exception as err:  # noqa: BLE001 - any error must be a clear one
        assert_clear(err, layer, cause)
    else:
        assert_same(got, want, layer)
    for i, (t, snap) in enumerate(zip(inputs, before)):
        if unchanged is None or i in unchanged:
            assert_unchanged(t, snap)


def same_as_plain(
    layer: Layer, pattern: Pattern, make_inputs: Callable[[], list[torch.Tensor]]
) -> None:
    """Run ``pattern`` on both layers: the same results, the caller's inputs kept."""
    want = pattern(layer.plain, make_inputs())
    inputs = make_inputs()
    before = [snapshot(t) for t in inputs]
    got = pattern(layer.saving, inputs)
    assert_same(got, want, layer)
    for t, snap in zip(inputs, before):
        assert_unchanged(t, snap)


def standard_step(model: nn.Module, inputs: list[torch.Tensor]) -> list[Any]:
    """Forward, a projection loss, backward; the outputs and every gradient."""
    out = model(*inputs)
    loss_of(out).backward()
    outs = list(out) if isinstance(out, tuple) else [out]
    return [o.detach() for o in outs] + [x.grad for x in inputs] + grads(model)


# == A. The caller's tensors ========================================================


@pytest.mark.parametrize("how", ["in-place", "through-detach"])
@pytest.mark.parametrize("kind", LAYERS)
def test_output_modified_in_place_before_backward(kind: str, how: str) -> None:
    """Output changed in place before backward; pytorch/pytorch#36383, #26546.

    The output changed in place after the call (``y.mul_(2)``, ``y.relu_()``, or a
    write through ``y.detach()``, which shares its memory): plain autograd's gradients
    do not depend on ``y``'s values here. pytorch/pytorch#36383, #26546 (in-place
    outputs of checkpoint); torch.Tensor.detach docs (in-place writes are seen by both)."""
    layer = build(kind)

    def pattern(model, inputs):
        y = model(*inputs)
        if how == "in-place":
            y.mul_(2.0)
        else:
            y.detach().add_(1.0)  # e.g. normalising a detached copy for logging
        loss_of(y).backward()
        return [y.detach(), inputs[0].grad, *grads(model)]

    same_or_clear_error(layer, pattern, lambda: [batch()], r"in.?place|modified|version")


@pytest.mark.parametrize("kind", LAYERS)
def test_input_modified_in_place_before_backward(kind: str) -> None:
    """Caller's batch changed in place before backward; memcnn issues 38, 73.

    The caller's batch changed in place between forward and backward (a data
    augmentation writing into its buffer). Where plain autograd raises in backward
    (a Linear saved the batch), invertnet must raise too: in backward, keeping the
    caller's write, or at the write itself, refusing it (then backward runs and
    leaves the batch as it was). Where plain autograd saved a copy (MomentumNet's
    plain mode does), invertnet gives its gradients or a clear error. Non-reentrant
    checkpoint saves its inputs with version counters for this reason; memcnn issues
    38 and 73 (a freed input used later)."""
    layer = build(kind)

    def step(model: nn.Module, x: torch.Tensor, write: bool) -> list[Any]:
        y = model(x)
        if write:
            x.add_(1.0)
        loss_of(y).backward()
        return [y.detach(), *grads(model)]

    plain_error: RuntimeError | None = None
    try:
        want = step(layer.plain, batch(requires_grad=False), write=True)
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err)
        plain_error = err

    x = batch(requires_grad=False)
    original = snapshot(x)
    y = layer.saving(x)
    try:
        x.add_(1.0)
    except RuntimeError as err:  # refused at the write: nothing may be lost
        assert_clear(err, layer, r"in.?place|modif|freed|keep_input")
        loss_of(y).backward()
        assert_unchanged(x, original)
        return
    try:
        loss_of(y).backward()
    except RuntimeError as err:
        if plain_error is None or layer.name in str(err):
            assert_clear(err, layer, r"in.?place|modified")
        else:
            assert "modified by an inplace operation" in str(err)
    else:
        assert plain_error is None, "plain autograd raises here, invertnet did not"
        assert_same([y.detach(), *grads(layer.saving)], want, layer)
    assert_unchanged(x, snapshot(original[2] + 1.0))


@pytest.mark.parametrize("requires_grad", [True, False], ids=["input-grad", "batch"])
@pytest.mark.parametrize("kind", LAYERS)
def test_forward_without_backward_keeps_the_input(kind: str, requires_grad: bool) -> None:
    """Training-mode forward, graph dropped without backward; memcnn issue 38.

    A training-mode forward whose graph is dropped without backward (metrics on the
    training batch, a skipped step, an exception in the loss): nothing will ever
    restore a freed input, so none may be freed. memcnn frees it anyway (issue 38:
    reading it segfaults); DESIGN.md "Defects"."""
    layer = build(kind)
    x = batch(requires_grad)
    before = snapshot(x)
    y = layer.saving(x)
    want = layer.plain(batch(requires_grad))
    assert_same([y.detach()], [want.detach()], layer)
    del y
    gc.collect()
    assert_unchanged(x, before)


@pytest.mark.parametrize("kind", LAYERS)
def test_gradient_passed_to_backward_is_not_changed(kind: str) -> None:
    """Caller's gradient in ``y.backward(g)`` kept; pytorch/pytorch#81417.

    ``y.backward(g)`` and ``autograd.grad(y, ..., grad_outputs=g)`` with the
    caller's ``g``: a backward that sums into its incoming gradient in place would
    change the caller's tensor. pytorch/pytorch#81417 (grad inputs mutated in
    backward give silently wrong results)."""
    layer = build(kind)
    g = batch(requires_grad=False, seed=5)
    g_before = snapshot(g)

    def pattern(model, inputs):
        y = model(*inputs)
        y.backward(g, retain_graph=False)
        first = [inputs[0].grad, *grads(model)]
        z = model(*[t.detach().clone().requires_grad_() for t in inputs])
        params = [p for p in model.parameters() if p.requires_grad]
        second = torch.autograd.grad(z, params, grad_outputs=g)
        return [y.detach(), *first, *second]

    same_as_plain(layer, pattern, lambda: [batch()])
    assert_unchanged(g, g_before)


@pytest.mark.parametrize("holder", ["view-of-a-batch", "parameter"])
@pytest.mark.parametrize("kind", LAYERS)
def test_input_held_elsewhere_stays_readable(kind: str, holder: str) -> None:
    """Input a view of a held batch, or a Parameter; memcnn issues 39, 70.

    The input is a view of a tensor the caller reads before backward (``x =
    batch[:, :4]``), or an ``nn.Parameter`` (a learned embedding fed to the block):
    freeing it would corrupt the holder. memcnn issues 39 and 70 (freeing an input
    also held elsewhere corrupts it)."""
    layer = build(kind)

    def make_inputs():
        if holder == "parameter":
            return [nn.Parameter(batch(requires_grad=False))]
        return [batch(requires_grad=False, shape=(3, 2 * WIDTH))]

    def pattern(model, inputs):
        source = inputs[0]
        x = source if holder == "parameter" else source[:, :WIDTH]
        y = model(x)
        read_between = source.detach().clone()  # the caller reads it before backward
        loss_of(y).backward()
        return [y.detach(), read_between, source.grad, *grads(model)]

    same_as_plain(layer, pattern, make_inputs)


@pytest.mark.parametrize("layout", ["transposed", "channels-last"])
@pytest.mark.parametrize("kind", LAYERS)
def test_non_contiguous_input_keeps_its_layout(kind: str, layout: str) -> None:
    """Transposed or channels_last input keeps its layout; issue 23's list.

    A transposed (non-contiguous) or channels_last input: a freed input must come
    back bit for bit with its strides, not as a contiguous copy. Issue 23's list; a
    freed input restored by ``set_`` with default strides would change its layout."""
    if layout == "channels-last":

        def conv(n: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.Tanh())

        layer = build(kind, net=conv)

        def make_inputs():
            x = batch(requires_grad=False, shape=(2, WIDTH, 3, 3))
            return [x.to(memory_format=torch.channels_last).requires_grad_()]

    else:
        layer = build(kind)

        def make_inputs():
            return [batch(requires_grad=False, shape=(WIDTH, 3)).t().requires_grad_()]

    same_as_plain(layer, standard_step, make_inputs)


@pytest.mark.parametrize("module", [Identity, Reshape])
@pytest.mark.parametrize("keep_input", [False, True])
def test_module_returning_its_input_or_a_view_of_it(module: type, keep_input: bool) -> None:
    """Wrapped module returns its input or a view of it; memcnn PR 40.

    A wrapped module whose output is its input, or a view of it (a reshape or
    squeeze step of a flow): freeing the input would free the output. memcnn PR 40
    ("Identity functions are now supported")."""
    layer = _wrap(module(), keep_input=keep_input)

    def pattern(model, inputs):
        y = model(*inputs)
        read_between = y.detach().clone()
        loss_of(y).backward()
        return [read_between, inputs[0].grad, *grads(model)]

    same_or_clear_error(layer, pattern, lambda: [batch()], r"output|alias|shares")


@pytest.mark.parametrize("kind", LAYERS)
def test_residual_skip_around_the_layer(kind: str) -> None:
    """Residual skip ``h + layer(h)``; memcnn issue 39.

    ``h + layer(h)``: the input is used again after the call. The result must be
    plain autograd's, or a clear error that names ``keep_input``. memcnn issue 39
    ("Residual connection - Trying to backward through the graph a second time")."""
    layer = build(kind)
    torch.manual_seed(3)
    pre = nn.Linear(WIDTH, WIDTH).to(F64)

    def pattern(model, inputs):
        h = pre(inputs[0])
        out = h + model(h)
        loss_of(out).backward()
        return [out.detach(), inputs[0].grad, pre.weight.grad, *grads(model)]

    def run(model, inputs):
        pre.zero_grad(set_to_none=True)
        return pattern(model, inputs)

    same_or_clear_error(layer, run, lambda: [batch()], r"keep_input")


@pytest.mark.parametrize("how", ["same-tensor", "halves-of-one-tensor"])
@pytest.mark.parametrize("module", ["coupling", "generic"])
@pytest.mark.parametrize("keep_input", [False, True])
def test_one_tensor_passed_as_two_inputs(keep_input: bool, module: str, how: str) -> None:
    """One tensor passed as two inputs; issue 23's list, memcnn issue 70.

    A two-input layer called as ``layer(x, x)``, or with two views of one tensor
    (``layer(*x.chunk(2, 1))``): freeing one frees the other. Issue 23's list; memcnn
    issue 70 (freeing a tensor held elsewhere)."""
    torch.manual_seed(0)
    inner = AdditiveCoupling(tanh_net(WIDTH)) if module == "coupling" else TwoInTwoOut(WIDTH)
    layer = _wrap(inner, keep_input=keep_input)

    def make_inputs():
        return [batch(shape=(3, 2 * WIDTH) if how != "same-tensor" else (3, WIDTH))]

    def pattern(model, inputs):
        x = inputs[0]
        args = (x, x) if how == "same-tensor" else tuple(x.chunk(2, dim=1))
        out = model(*args)
        loss_of(out).backward()
        return [*(o.detach() for o in out), x.grad, *grads(model)]

    same_as_plain(layer, pattern, make_inputs)


@pytest.mark.parametrize("kind", WRAPPERS)
def test_inverse_called_between_forward_and_backward(kind: str) -> None:
    """``layer.inverse(y)`` called before backward; memcnn issue 38.

    ``layer.inverse(layer(x))`` compared with a copy of ``x`` before backward, as a
    check of invertibility inside a training step: the inverse must not free the
    output that the pending backward needs. memcnn issue 38 (``is_invertible_module``
    on a wrapper segfaulted)."""
    layer = build(kind)

    def pattern(model, inputs):
        x = inputs[0]
        copy_of_x = x.detach().clone()
        y = model(x)
        error = (model.inverse(y) - copy_of_x).abs().max().item()
        loss_of(y).backward()
        return [y.detach(), error < 1e-12, x.grad, *grads(model)]

    same_or_clear_error(layer, pattern, lambda: [batch()], r"keep_input|freed|inverse")


# == B. Which gradients =============================================================


@pytest.mark.parametrize("kind", LAYERS)
def test_backward_with_inputs_subset(kind: str) -> None:
    """``loss.backward(inputs=[...])``; pytorch/pytorch#51743, memcnn.

    ``loss.backward(inputs=[x, one parameter])``: only those get a gradient.
    memcnn refuses it; pytorch/pytorch#51743 (reentrant checkpoint does not support
    ``inputs``)."""
    layer = build(kind)

    def pattern(model, inputs):
        x = inputs[0]
        first = next(iter(model.parameters()))
        loss_of(model(x)).backward(inputs=[x, first])
        return [x.grad, *grads(model)]

    same_as_plain(layer, pattern, lambda: [batch()])


@pytest.mark.parametrize("wrt", ["input", "parameters-and-unused"])
@pytest.mark.parametrize("kind", LAYERS)
def test_autograd_grad(kind: str, wrt: str) -> None:
    """``torch.autograd.grad``, ``allow_unused``; pytorch/pytorch#102223, memcnn PR 48.

    ``torch.autograd.grad`` of the input alone, or of the parameters and a tensor
    the loss does not use (``allow_unused=True``): nothing accumulates into ``.grad``.
    pytorch/pytorch#102223 (checkpoint with autograd.grad); memcnn PR 48
    (``allow_unused``)."""
    layer = build(kind)

    def pattern(model, inputs):
        x = inputs[0]
        loss = loss_of(model(x))
        if wrt == "input":
            got = list(torch.autograd.grad(loss, [x]))
        else:
            unused = torch.ones(2, dtype=F64, requires_grad=True)
            got = list(torch.autograd.grad(loss, [*model.parameters(), unused], allow_unused=True))
        return [*got, x.grad, *grads(model)]

    same_as_plain(layer, pattern, lambda: [batch()])


@pytest.mark.parametrize("kind", LAYERS)
def test_input_that_does_not_require_grad(kind: str) -> None:
    """Input without requires_grad; pytorch/pytorch#6884, #7617, #42812.

    The data batch (``requires_grad=False``) into a layer whose parameters train:
    the parameters still get their gradients. pytorch/pytorch#6884, #7617, #42812
    (reentrant checkpoint gives no parameter gradients then)."""
    same_as_plain(build(kind), standard_step, lambda: [batch(requires_grad=False)])


@pytest.mark.parametrize("kind", LAYERS)
def test_frozen_sub_module(kind: str) -> None:
    """Frozen sub-module; pytorch/pytorch PR 37266, momentumnet (DESIGN.md).

    One sub-module frozen with ``requires_grad_(False)`` (fine-tuning): its
    parameters get ``None``, the others plain autograd's gradients.
    pytorch/pytorch#37266 (checkpoint with frozen layers); momentumnet's gradients are
    wrong for partially frozen networks (DESIGN.md)."""
    layer = build(kind)
    for model in (layer.saving, layer.plain):
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        first.requires_grad_(False)
    same_as_plain(layer, standard_step, lambda: [batch()])


@pytest.mark.parametrize("kind", LAYERS)
def test_everything_frozen(kind: str) -> None:
    """Every parameter frozen, input without grad; pytorch/pytorch#7617.

    All parameters frozen and an input without grad: the output does not require
    grad, as in plain autograd, and ``backward`` raises as it does there.
    pytorch/pytorch#7617 (checkpoint's output should require grad exactly when the
    function's does)."""
    layer = build(kind)
    for model in (layer.saving, layer.plain):
        model.requires_grad_(False)
    x = batch(requires_grad=False)
    before = snapshot(x)
    y_plain, y = layer.plain(batch(requires_grad=False)), layer.saving(x)
    assert y.requires_grad == y_plain.requires_grad
    assert_same([y], [y_plain], layer)
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss_of(y).backward()
    assert_unchanged(x, before)


@pytest.mark.parametrize("kind", LAYERS)
def test_hooks_on_the_input_and_output(kind: str) -> None:
    """Tensor hooks and ``retain_grad``; pytorch/pytorch#65537.

    A tensor hook on the output that rescales its gradient, one on the input that
    records it, and ``retain_grad`` on the output: each runs once, and the rescaled
    gradient is the one propagated. pytorch/pytorch#65537 (gradient hooks must be
    called once under checkpoint)."""
    layer = build(kind)

    def pattern(model, inputs):
        x = inputs[0]
        seen: list[torch.Tensor] = []
        x.register_hook(lambda g: seen.append(g.detach().clone()))
        y = model(x)
        y.retain_grad()
        y.register_hook(lambda g: g * 3.0)
        loss_of(y).backward()
        return [len(seen), *seen, y.grad, x.grad, *grads(model)]

    same_as_plain(layer, pattern, lambda: [batch()])


@pytest.mark.parametrize("module", ["coupling", "generic"])
@pytest.mark.parametrize("keep_input", [False, True])
def test_one_of_two_outputs_unused(keep_input: bool, module: str) -> None:
    """One of two outputs unused; fairscale PR 701, pytorch/pytorch#33962.

    A two-output layer whose second output the loss ignores: its gradient is
    ``None`` on the way in, and the other gradients are plain autograd's. fairscale PR
    701 and pytorch/pytorch#33962 (checkpoint's backward not run in corner cases)."""
    torch.manual_seed(0)
    inner = AdditiveCoupling(tanh_net(WIDTH)) if module == "coupling" else TwoInTwoOut(WIDTH)
    layer = _wrap(inner, keep_input=keep_input)

    def pattern(model, inputs):
        y1, y2 = model(*inputs)
        loss_of(y1).backward()
        return [y1.detach(), y2.detach(), *(t.grad for t in inputs), *grads(model)]

    same_as_plain(layer, pattern, lambda: [batch(seed=1), batch(seed=2)])


@pytest.mark.parametrize("kind", LAYERS)
def test_backward_twice_with_retain_graph(kind: str) -> None:
    """Backward twice with ``retain_graph``; memcnn issue 36, guided-diffusion PR 144.

    ``loss.backward(retain_graph=True)`` then ``loss.backward()`` again (two losses
    sharing a trunk, a gradient penalty): plain autograd accumulates twice; invertnet
    must too, or raise a clear error that says how to allow it. memcnn issue 36;
    openai/guided-diffusion PR 144 (checkpoint does not support several backwards)."""
    layer = build(kind)

    def pattern(model, inputs):
        loss = loss_of(model(*inputs))
        loss.backward(retain_graph=True)
        loss.backward()
        return [inputs[0].grad, *grads(model)]

    same_or_clear_error(
        layer, pattern, lambda: [batch()], r"num_bwd_passes|retain_graph|more than once|twice"
    )


# == C. State that changes between forward and backward =============================


@pytest.mark.parametrize("kind", LAYERS)
def test_parameter_replaced_between_forward_and_backward(kind: str) -> None:
    """Weight replaced by a new Parameter before backward; checkpoint docs.

    A weight replaced by a new ``nn.Parameter`` before backward (weight tying set up
    late, ``load_state_dict(..., assign=True)``, an EMA swap): plain autograd sends the
    gradient to the old parameter, computed with the old value; the new one gets
    none. The checkpoint docs warn that a recomputation that differs from the
    forward (a global variable) gives silently wrong gradients."""
    layer = build(kind)

    def pattern(model, inputs):
        y = model(*inputs)
        target = next(m for m in model.modules() if isinstance(m, nn.Linear))
        old = target.weight
        target.weight = nn.Parameter(old.detach() * 2.0)
        loss_of(y).backward()
        return [inputs[0].grad, old.grad, target.weight.grad, *grads(model)]

    same_or_clear_error(layer, pattern, lambda: [batch()], r"parameter|weight|changed|replaced")


@pytest.mark.parametrize("use", ["add", "mul"])
@pytest.mark.parametrize("kind", LAYERS)
def test_buffer_changed_between_forward_and_backward(kind: str, use: str) -> None:
    """Buffer changed in place before backward; pytorch/pytorch#96136.

    A buffer the sub-network reads is updated in place before backward (a running
    statistic, a refreshed positional table). Used additively, plain autograd's
    gradients do not depend on it, so invertnet's must not either (or a clear
    error); multiplied in, plain autograd raises, and invertnet must raise too.
    pytorch/pytorch#96136 (recomputation sees changed BatchNorm state)."""

    def net(n: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n, n), Shift(n, use), nn.Tanh())

    layer = build(kind, net=net)

    def pattern(model, inputs):
        y = model(*inputs)
        for m in model.modules():
            if isinstance(m, Shift):
                m.value.add_(0.5)
        loss_of(y).backward()
        return [inputs[0].grad, *grads(model)]

    if use == "add":
        same_or_clear_error(layer, pattern, lambda: [batch()], r"buffer|changed|modified")
    else:
        for model in (layer.plain, layer.saving):
            with pytest.raises(RuntimeError, match=r"(?i)in.?place|modified|changed"):
                pattern(model, [batch()])


@pytest.mark.parametrize("kind", LAYERS)
def test_freezing_between_forward_and_backward(kind: str) -> None:
    """``requires_grad_(False)`` between forward and backward; issue 23's list.

    ``requires_grad_(False)`` on a sub-module after the forward (a freezing
    callback run mid-step): plain autograd computes the graph it recorded but leaves
    the now-frozen parameters' ``.grad`` as it was (``None``); the others get their
    gradients. Non-reentrant checkpoint raises ``CheckpointError`` (fewer tensors
    saved in the recomputation). Issue 23's list (frozen sub-modules)."""
    layer = build(kind)

    def pattern(model, inputs):
        y = model(*inputs)
        next(m for m in model.modules() if isinstance(m, nn.Linear)).requires_grad_(False)
        loss_of(y).backward()
        return [inputs[0].grad, *grads(model)]

    same_or_clear_error(layer, pattern, lambda: [batch()], r"requires_grad|frozen|changed")


# == D. Grad modes, transforms and threads ==========================================


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", LAYERS)
def test_forward_without_grad_then_backward(kind: str, mode: str) -> None:
    """Forward under no_grad or inference_mode, then backward; DESIGN.md (memcnn).

    A forward under ``torch.no_grad()`` or ``torch.inference_mode()`` (validation)
    followed by a mistaken ``backward``: the output is plain's, the input is kept
    (memcnn frees it even under no_grad, DESIGN.md), and backward raises as in plain
    autograd."""
    layer = build(kind)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    x = batch()
    before = snapshot(x)
    with context():
        y = layer.saving(x)
        y_plain = layer.plain(batch())
    assert_same([y, y.requires_grad], [y_plain, y_plain.requires_grad], layer)
    assert_unchanged(x, before)
    with pytest.raises(RuntimeError, match=r"does not require grad|inference"):
        loss_of(y).backward()
    assert_unchanged(x, before)


@pytest.mark.parametrize("kind", LAYERS)
def test_forward_mode_ad(kind: str) -> None:
    """Forward-mode AD; pytorch/pytorch#10223, haidog-yaqub/MeanFlow issue 4.

    ``torch.autograd.forward_ad`` (a Jacobian-vector product, as in consistency and
    MeanFlow models): the tangent must be plain autograd's, or a clear error that
    names the layer. pytorch/pytorch#10223; haidog-yaqub/MeanFlow issue 4 (jvp with
    checkpoint)."""
    layer = build(kind)
    tangent = batch(requires_grad=False, seed=7)

    def pattern(model, inputs):
        with fwAD.dual_level():
            y = model(fwAD.make_dual(inputs[0], tangent))
            primal, jvp = fwAD.unpack_dual(y)
            return [primal.detach(), None if jvp is None else jvp.detach()]

    same_or_clear_error(
        layer, pattern, lambda: [batch(requires_grad=False)], r"forward.?(mode|AD)|jvp|dual"
    )


@pytest.mark.parametrize("transform", ["grad", "vmap"])
@pytest.mark.parametrize("kind", LAYERS)
def test_torch_func_transforms(kind: str, transform: str) -> None:
    """``torch.func.grad`` and ``vmap``; pytorch/pytorch#165880, #122729.

    ``torch.func.grad`` of the loss, or ``torch.func.vmap`` over a batch of inputs
    (per-sample work): the result must be plain autograd's, or a clear error that
    names the layer. pytorch/pytorch#165880 and #122729 (vmap and checkpoint)."""
    layer = build(kind)

    def pattern(model, inputs):
        if transform == "grad":
            return [torch.func.grad(lambda x: loss_of(model(x)))(inputs[0])]
        return [torch.func.vmap(model)(inputs[0]).detach()]

    def make_inputs():
        shape = (3, WIDTH) if transform == "grad" else (2, 3, WIDTH)
        return [batch(requires_grad=False, shape=shape)]

    same_or_clear_error(layer, pattern, make_inputs, r"torch\.func|functorch|vmap|transform")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", LAYERS)
def test_inside_torch_utils_checkpoint(kind: str, use_reentrant: bool) -> None:
    """Layer inside ``torch.utils.checkpoint``; pytorch/pytorch PR 90105.

    The layer inside ``torch.utils.checkpoint`` (a model that checkpoints every
    block, or Hugging Face's ``gradient_checkpointing_enable()`` on a converted
    model): the recomputation calls the layer a second time in backward.
    pytorch/pytorch PR 90105 (nested checkpoint)."""
    layer = build(kind)

    def pattern(model, inputs):
        y = checkpoint(model, inputs[0], use_reentrant=use_reentrant)
        loss_of(y).backward()
        return [y.detach(), inputs[0].grad, *grads(model)]

    same_or_clear_error(layer, pattern, lambda: [batch()], r"checkpoint|recomput")


@pytest.mark.parametrize("kind", LAYERS)
def test_backward_on_another_thread(kind: str) -> None:
    """Backward on another thread than forward; pytorch/pytorch#96764.

    Forward on the main thread, backward on a worker thread (a pipeline that
    hands the loss over): grad mode, autocast and debug settings are per thread.
    pytorch/pytorch#96764 (checkpoint's thread safety)."""
    layer = build(kind)

    def pattern(model, inputs):
        y = model(*inputs)
        failures: list[BaseException] = []

        def work() -> None:
            try:
                loss_of(y).backward()
            except BaseException as err:  # noqa: BLE001 - re-raised on the main thread
                failures.append(err)

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        if failures:
            raise failures[0]
        return [y.detach(), inputs[0].grad, *grads(model)]

    same_as_plain(layer, pattern, lambda: [batch()])


# == E. MomentumNet's extra arguments ===============================================


@pytest.mark.parametrize("as_keyword", [True, False], ids=["keyword", "positional"])
def test_momentum_extra_argument_that_requires_grad(as_keyword: bool) -> None:
    """MomentumNet extra argument requiring grad; pytorch/pytorch PR 80987.

    An extra tensor argument that requires grad (a learned scale, a conditioning
    vector), passed by keyword or position: it gets plain autograd's gradient.
    momentumnet drops keyword arguments (DESIGN.md); pytorch/pytorch PR 80987
    (keyword arguments in non-reentrant checkpoint)."""
    layer = build("momentum", net=Scaled)

    def pattern(model, inputs):
        x, scale = inputs
        y = model(x, scale=scale) if as_keyword else model(x, scale)
        loss_of(y).backward()
        return [y.detach(), x.grad, scale.grad, *grads(model)]

    def make_inputs():
        return [batch(), (1.0 + 0.1 * batch(requires_grad=False, seed=9)).requires_grad_()]

    same_as_plain(layer, pattern, make_inputs)


def test_momentum_extra_argument_modified_before_backward() -> None:
    """MomentumNet extra argument changed before backward; DESIGN.md.

    An extra argument (a mask or bias) changed in place between forward and
    backward: used additively, plain autograd's gradients do not depend on it, so
    MomentumNet must give them or raise a clear error naming the argument (as its
    docstring promises). momentumnet re-runs the functions with whatever the
    argument holds then (DESIGN.md)."""
    layer = build("momentum", net=Biased)

    def pattern(model, inputs):
        x, bias = inputs
        y = model(x, bias)
        bias.add_(1.0)
        loss_of(y).backward()
        return [y.detach(), x.grad, *grads(model)]

    def make_inputs():
        return [batch(), batch(requires_grad=False, seed=4)]

    same_or_clear_error(layer, pattern, make_inputs, r"argument|changed|modified", unchanged=[0])
