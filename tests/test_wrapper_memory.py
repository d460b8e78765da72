"""Freeing inputs: what is freed, what is kept, and that nothing is ever corrupted."""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from invertnet import AdditiveCoupling, AffineAdapterNaive, AffineCoupling, InvertibleModuleWrapper
from tests._core_helpers import TwoWay, assert_all_close, run_and_grads, wrapped_pair


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@pytest.fixture
def no_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside the test (locally, not process-wide)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    assert [str(w.message) for w in caught] == []


def _additive(width: int = 4) -> AdditiveCoupling:
    return AdditiveCoupling(nn.Sequential(nn.Linear(width, width), nn.Tanh()))


@pytest.mark.parametrize(
    "make",
    [_additive, lambda: AffineCoupling(nn.Linear(4, 4), adapter=AffineAdapterNaive), TwoWay],
    ids=["additive", "affine", "generic"],
)
def test_training_forward_frees_and_backward_restores(make, no_warnings) -> None:
    torch.manual_seed(0)
    module = make()
    n_in = 2 if isinstance(module, TwoWay) else 1
    width = 4 if n_in == 2 else 8
    originals = [torch.randn(5, width) for _ in range(n_in)]
    xs = [x.clone().requires_grad_() for x in originals]
    full = [_nbytes(x) for x in xs]
    out = InvertibleModuleWrapper(module)(*xs)
    assert all(_nbytes(x) == 0 for x in xs)
    assert all(x.numel() == 0 for x in xs)
    (sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()).backward()
    assert [_nbytes(x) for x in xs] == full
    for x, original in zip(xs, originals):
        torch.testing.assert_close(x.detach(), original, rtol=1e-5, atol=1e-6)
        assert x.grad is not None and x.grad.shape == original.shape


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_nothing_is_freed_where_nothing_would_restore_it(context: str, no_warnings) -> None:
    module = _additive()
    x = torch.randn(3, 8, requires_grad=context != "nothing_requires_grad")
    if context == "nothing_requires_grad":
        module.requires_grad_(False)
    expected = module(x).detach()
    wrapper = InvertibleModuleWrapper(module)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context)
    with ctx() if ctx else torch.enable_grad():
        y = wrapper(x)
        y_inv = wrapper.inverse(y)
    assert _nbytes(x) == 3 * 8 * 4 and x.shape == (3, 8)
    assert _nbytes(y) == 3 * 8 * 4
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y_inv, x.detach(), rtol=1e-5, atol=1e-6)


def test_eval_mode_with_grad_still_frees() -> None:
    """eval() only changes dropout/BatchNorm; with grad enabled the input is still freed."""
    wrapper = InvertibleModuleWrapper(_additive()).eval()
    x = torch.randn(3, 8, requires_grad=True)
    wrapper(x).sum().backward()
    assert x.shape == (3, 8) and x.grad is not None


def _kept_case(case: str, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The wrapper's input for each sharing case, plus the tensors that share it."""
    if case == "relu":  # ReLU saves its output for its own backward
        h = torch.relu(x)
        return h, []
    if case == "is_view":
        h = (x * 1).view(3, 8)
        return h, [h._base]
    if case == "has_view":
        h = x * 1
        return h, [h.view(24)]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["relu", "is_view", "has_view"])
def test_shared_input_is_kept_warns_once_and_gradients_are_right(case: str) -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(_additive())
    x0 = torch.randn(3, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # warned once per wrapper, not per call
            wrapped.zero_grad(set_to_none=True)
            xw = x0.clone().requires_grad_()
            hw, sharers = _kept_case(case, xw)
            before = hw.detach().clone()
            yw = wrapped(hw)
            assert _nbytes(hw) > 0 and hw.shape == (3, 8)
            torch.testing.assert_close(hw.detach(), before)
            for s in sharers:  # the other holders still see intact data
                torch.testing.assert_close(s.detach().reshape(3, 8), before)
            (yw**2).sum().backward()

    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert issubclass(caught[0].category, UserWarning)
    assert "kept in memory" in messages[0] and "results are unaffected" in messages[0]
    assert caught[0].filename == __file__  # points at the caller's line

    xp = x0.clone().requires_grad_()
    hp, _ = _kept_case(case, xp)
    (plain(hp) ** 2).sum().backward()
    torch.testing.assert_close(xw.grad, xp.grad, rtol=1e-5, atol=1e-6)
    for pw, pp in zip(wrapped.parameters(), plain.parameters()):
        torch.testing.assert_close(pw.grad, pp.grad, rtol=1e-5, atol=1e-6)


def test_same_tensor_passed_twice_is_kept_and_gradients_are_right() -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(TwoWay())
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="input 0 is kept.*passed more than once"):
        got = run_and_grads(wrapped, [x.requires_grad_()], lambda t: wrapped(t, t))
    want = run_and_grads(plain, [x], lambda t: plain(t, t))
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-5, 1e-6)


def test_chain_frees_every_intermediate_and_restores_them(no_warnings) -> None:
    torch.manual_seed(0)
    blocks = [_additive() for _ in range(6)]
    chain = nn.Sequential(*[InvertibleModuleWrapper(b) for b in blocks])
    plain = nn.Sequential(
        *[InvertibleModuleWrapper(copy.deepcopy(b), disable=True) for b in blocks]
    )
    seen: list[torch.Tensor] = []
    for block in chain:
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x0 = torch.randn(4, 8)
    x = x0.clone().requires_grad_()
    y = chain(x)
    assert len(seen) == 6 and seen[0] is x
    assert [_nbytes(t) for t in seen] == [0] * 6  # every block input freed, x included
    assert _nbytes(y) == 4 * 8 * 4  # only the last output is kept
    y.sum().backward()

    expected, h = [], x0
    with torch.no_grad():
        for block in plain:
            expected.append(h)
            h = block(h)
    for got, want in zip(seen, expected):
        assert _nbytes(got) == 4 * 8 * 4
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_input_freed_by_one_wrapper_cannot_feed_another() -> None:
    first, second = InvertibleModuleWrapper(_additive()), InvertibleModuleWrapper(_additive())
    x = torch.randn(3, 8, requires_grad=True)
    y = first(x)  # kept: a graph dropped without backward hands the input back
    with pytest.raises(RuntimeError, match=r"freed by an earlier .*keep_input=True"):
        second(x)
    del y


def test_residual_skip_with_keep_input_gives_correct_gradients(no_warnings) -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(_additive(), keep_input=True)
    x = [torch.randn(3, 8, requires_grad=True)]
    got = run_and_grads(wrapped, x, lambda t: t + wrapped(t))
    want = run_and_grads(plain, x, lambda t: t + plain(t))
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-5, 1e-6)


@pytest.mark.parametrize("shape", [(3, 8), (3, 2, 1), (2, 4, 1, 1)])
def test_residual_skip_without_keep_input_raises_never_wrong_values(shape) -> None:
    """A freed input has a zero-element shape that cannot broadcast against the output.

    With a bare ``(0,)`` a trailing dimension of size 1 would broadcast and ``x + y``
    would silently be an empty tensor; the freed shape puts its zero opposite a
    dimension of size >= 2 instead.
    """
    block = AdditiveCoupling(nn.Tanh(), split_dim=1)
    wrapper = InvertibleModuleWrapper(block)
    x = torch.randn(*shape, requires_grad=True)
    y = wrapper(x)
    assert x.numel() == 0
    with pytest.raises(RuntimeError, match=r"residual skip .* pass keep_input=True"):
        x + y  # noqa: B018
    with pytest.raises(RuntimeError, match=r"InvertibleModuleWrapper\(AdditiveCoupling\)"):
        y + x  # noqa: B018
    with pytest.raises(RuntimeError, match="keep_input=True"):
        x.sum()  # would silently be 0 on the zero-element tensor
    # What the tensor is can still be asked; its values come back in backward.
    assert x.dtype == torch.float32 and x.requires_grad and x.untyped_storage().nbytes() == 0
    y.sum().backward()
    assert type(x) is torch.Tensor and x.shape == shape
    torch.testing.assert_close(x + 0, x)


def test_in_place_change_of_a_freed_input_is_refused_at_once() -> None:
    wrapper = InvertibleModuleWrapper(_additive())
    x = torch.randn(3, 8, requires_grad=True)
    y = wrapper(x)
    with torch.no_grad(), pytest.raises(RuntimeError, match="add_: .*keep_input=True"):
        x.add_(1.0)
    y.sum().backward()
    assert x.grad is not None


def test_in_place_change_that_bypasses_the_guard_is_caught_in_backward() -> None:
    wrapper = InvertibleModuleWrapper(_additive())
    x = torch.randn(3, 8, requires_grad=True)
    y = wrapper(x)
    # Code that turns __torch_function__ off (as a C++ extension would) gets through
    # to the zero-element tensor, but its write bumps the version counter.
    with torch.no_grad(), torch._C.DisableTorchFunctionSubclass():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place.*keep_input=True"):
        y.sum().backward()


def _bn_block() -> AdditiveCoupling:
    return AdditiveCoupling(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh()))


def test_eval_mode_runs_directly_with_exact_gradients(no_warnings) -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(_bn_block())
    wrapped.eval()
    plain.eval()
    x = torch.randn(6, 8, requires_grad=True)
    leaf = x.detach().clone().requires_grad_()
    y = wrapped(leaf)
    assert leaf.shape == (6, 8)  # nothing freed in eval mode, grad enabled or not
    assert y.grad_fn is not None and "Invertible" not in type(y.grad_fn).__name__
    y.sum().backward()
    got = run_and_grads(wrapped, [x])
    want = run_and_grads(plain, [x])
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-6, 1e-7)


def test_wrappers_alone_in_training_mode_save_memory_with_frozen_batchnorm(no_warnings) -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(_bn_block())
    wrapped.eval()
    plain.eval()
    wrapped.training = True  # the wrapper frees; its BatchNorm stays in eval mode
    assert not wrapped.module.Fm[1].training
    x = torch.randn(6, 8, requires_grad=True)
    stats = wrapped.module.Fm[1].running_mean.clone()
    leaf = x.detach().clone().requires_grad_()
    y = wrapped(leaf)
    assert _nbytes(leaf) == 0  # freed
    y.sum().backward()
    assert leaf.grad is not None
    got = run_and_grads(wrapped, [x], lambda t: wrapped(t))
    want = run_and_grads(plain, [x])
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-5, 1e-6)
    torch.testing.assert_close(wrapped.module.Fm[1].running_mean, stats)


def test_eval_mode_input_is_not_freed_but_training_mode_input_is() -> None:
    wrapper = InvertibleModuleWrapper(_additive())
    x = torch.randn(3, 8, requires_grad=True)
    wrapper.eval()
    wrapper(x)
    assert _nbytes(x) == 3 * 8 * 4
    wrapper.train()
    y = wrapper(x)
    assert _nbytes(x) == 0
    del y  # the graph goes without backward: the caller's leaf comes back
    assert _nbytes(x) == 3 * 8 * 4


class _SeesInputMemory(nn.Module):
    """A sub-module that records, when its backward runs, how many bytes the watched
    tensors' storages hold (0 while a wrapper has them freed)."""

    def __init__(self, name: str, width: int, log: list, watched: list) -> None:
        super().__init__()
        self.name, self.log, self.watched = name, log, watched
        self.linear = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.linear(h))
        if out.requires_grad:
            out.register_hook(self._record)
        return out

    def _record(self, grad: torch.Tensor) -> None:
        self.log.append((self.name, [_nbytes(x) for x in self.watched]))


@pytest.mark.parametrize("apart", [True, False], ids=["two-halves", "one-tensor"])
@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_fused_backward_takes_an_input_memory_only_after_the_sub_module_backward(
    apart: bool, kind: str
) -> None:
    # The peak of a block's backward is a sub-module's backward: where the gradients
    # need no reconstructed part (a + m), the part's memory is taken after it, not
    # beside its activations. Affine steps need the part for the scale's gradient,
    # so the part is rebuilt first there.
    torch.manual_seed(0)
    log: list = []
    watched: list = []
    f, g = _SeesInputMemory("F", 4, log, watched), _SeesInputMemory("G", 4, log, watched)
    if kind == "additive":
        module: nn.Module = AdditiveCoupling(f, g)
    else:
        module = AffineCoupling(f, g, adapter=AffineAdapterNaive)
    halves = [torch.randn(3, 4) for _ in range(2)]
    # Activations (x * 1), which the wrapper frees and rebuilds; leaves it would hide.
    if apart:
        xs = [h.clone().requires_grad_() * 1 for h in halves]
    else:
        xs = [torch.cat(halves, dim=1).requires_grad_() * 1]
    watched.extend(xs)
    full = [_nbytes(x) for x in xs]
    reference = [p.detach().clone() for p in module.parameters()]
    out = InvertibleModuleWrapper(module)(*xs)
    assert [_nbytes(x) for x in xs] == [0] * len(xs)
    (sum(o.square().sum() for o in out) if apart else out.square().sum()).backward()
    seen = dict(log)
    if kind == "affine":
        # G's step rebuilds x2 before G's backward (and a single tensor entirely).
        assert seen["G"] == ([0, full[1]] if apart else full)
    elif apart:
        assert seen == {"G": [0, 0], "F": [0, full[1]]}
    else:  # one tensor: taken whole when its first half (x2) is written, after G's backward
        assert seen == {"G": [0], "F": full}
    assert [_nbytes(x) for x in xs] == full
    torch.testing.assert_close(torch.cat([x.detach() for x in xs], dim=1), torch.cat(halves, 1))
    assert all(torch.equal(p, r) for p, r in zip(module.parameters(), reference))


def test_an_overridden_inverse_and_vjp_gets_the_freed_memory_as_tensors() -> None:
    # Callables in out= are the engine's own protocol: a subclass that overrides
    # inverse_and_vjp may index or inspect out, so it is handed tensors, as before.
    seen: list = []

    class Recording(AdditiveCoupling):
        def inverse_and_vjp(self, outputs, grad_outputs, params, out=None, grad_log_det=None):
            seen.extend(out)
            return super().inverse_and_vjp(outputs, grad_outputs, params, out, grad_log_det)

    torch.manual_seed(0)
    plain = _additive()
    module = Recording(copy.deepcopy(plain.Fm), copy.deepcopy(plain.Gm))
    x = torch.randn(3, 8, requires_grad=True)
    want = run_and_grads(plain, [x], seed=1)
    got = run_and_grads(InvertibleModuleWrapper(module), [x], seed=1)
    assert len(seen) == 1 and type(seen[0]) is torch.Tensor and _nbytes(seen[0]) > 0
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-5, 1e-6)


def _objects_alive_after_forward(depth: int) -> int:
    """How many objects the garbage collector tracks that a forward pass of ``depth``
    wrapped couplings leaves alive until backward."""
    torch.manual_seed(0)
    blocks = [
        InvertibleModuleWrapper(
            AdditiveCoupling(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 4))
        )
        for _ in range(depth)
    ]
    x1, x2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x1 * 1, x2 * 1
        for block in blocks:
            a, b = block(a, b)
        return a, b

    forward()[0].sum().backward()  # caches and lazily built state are made once
    counts = []
    # Twice, keeping the fewer: every 1024 records of modules with buffers, the
    # registry of records awaiting backward drops its dead entries, and the entries
    # then made again for these blocks' BatchNorms (a list each) count in the
    # window where that happens, which is at most one of the two.
    for _ in range(2):
        gc.collect()
        before = {id(o) for o in gc.get_objects()}
        out = forward()
        gc.collect()
        counts.append(sum(1 for o in gc.get_objects() if id(o) not in before))
        out[0].sum().backward()
        del out
    return min(counts)


def test_a_wrapped_block_keeps_few_objects_alive_until_backward() -> None:
    # Every object alive between forward and backward counts toward the garbage
    # collector's runs, whose full collections take milliseconds in a process that
    # imported torch: at 23 objects per block, a 128-block step collected 4 times
    # against RevLib's once and spent 36 ms doing so. Now 17: the two freed inputs'
    # records (with their shapes and storages), the outputs' aliases and their
    # tuple, the call record with its freed-input dict, module list and tensor
    # tuple, and autograd's node with its dict.
    # (A stray object made once, such as a cache entry, adds a fraction.)
    per_block = (_objects_alive_after_forward(40) - _objects_alive_after_forward(8)) / 32
    assert per_block < 18
