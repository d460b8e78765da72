"""Whole aliases: an input that views all of another tensor's memory exactly.

FSDP2's pre-forward hook hands a unit's inputs that require grad through an identity
autograd Function, and autograd returns them as views of the tensors the caller
passed (``x._base`` is that tensor: the same storage, shape and strides, offset 0).
A wrapper frees such an input, with the tensor it aliases, where nothing else holds
that tensor; anything else holding it (a caller's reference, a view, a saved tensor)
keeps the input, and its holders read the right values. All in float64.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from invertnet import AdditiveCoupling, InputKeptWarning, InvertibleModuleWrapper
from invertnet._runtime.torch_private import sole_holder_counts
from invertnet.wrappers._storage import FreedTensor, _sole_alias_holders
from tests._core_helpers import TwoWay, wrapped_pair

F64 = torch.float64


class Alias(torch.autograd.Function):
    """Returns its input: autograd hands it back as a whole alias (a view) of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _fsdp_alias(t: torch.Tensor) -> torch.Tensor:
    """What FSDP2's pre-forward hook does to a unit's input that requires grad (its
    own Function, with a stand-in for the parameter group it notifies)."""
    try:  # torch >= 2.6
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import (
            RegisterPostBackwardFunction,
        )
    except ImportError:  # torch 2.4 and 2.5
        from torch.distributed._composable.fsdp._fsdp_param_group import (
            RegisterPostBackwardFunction,
        )

    class Group:
        def post_backward(self) -> None:
            pass

    (alias,) = RegisterPostBackwardFunction.apply(Group(), t)
    return alias


needs_fsdp = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)

ALIASES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "function": Alias.apply,
    "view_as": lambda t: t.view_as(t),
    "slice": lambda t: t[:],
    "fsdp": _fsdp_alias,
}


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _block() -> AdditiveCoupling:
    return AdditiveCoupling(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))


def _pair(disable: bool = False, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    blocks = [_block().to(F64) for _ in range(2)]
    a, b = (InvertibleModuleWrapper(copy.deepcopy(m), disable=disable) for m in blocks)
    return a, b


def _batch() -> torch.Tensor:
    return torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(1))


def _grads(x: torch.Tensor, a: nn.Module, b: nn.Module) -> list[torch.Tensor]:
    return [x.grad, *(p.grad for p in (*a.parameters(), *b.parameters()))]


@pytest.fixture
def caught() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        yield found


def _kept_messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if w.category is InputKeptWarning]


def test_alias_counts_are_measured_relative_to_an_unheld_input() -> None:
    """The alias of the probe counts as an input nothing else holds, plus its base's
    storage reference; the base as its Python object and the alias's reference."""
    found = _sole_alias_holders("cpu")
    assert found is not None
    sole = sole_holder_counts("cpu")["non_leaf"]
    assert found.alias.tensor == sole.tensor
    assert found.alias.storage == sole.storage + 1
    assert found.base.storage == found.alias.storage


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_whole_alias_of_an_unheld_activation_is_freed_with_its_base(alias: str, caught) -> None:
    if alias == "fsdp" and not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    make = ALIASES[alias]
    x0 = _batch()

    a, b = _pair()
    x = x0.clone().requires_grad_()
    h = make(a(x))  # the base, a's output, is held by h alone
    y = b(h)
    assert _kept_messages(caught) == []
    assert _nbytes(h) == 0 and h.numel() == 0
    base = h._base
    assert isinstance(base, FreedTensor) and base.numel() == 0  # never full shape, 0 bytes
    with pytest.raises(RuntimeError, match="keep_input=True"):
        base.sum()
    (y**2).sum().backward()
    assert h.shape == base.shape == (3, 4) and _nbytes(h) == 3 * 4 * 8
    assert type(h) is torch.Tensor and type(base) is torch.Tensor
    assert torch.equal(x.detach(), x0)  # the caller's data, handed back bit for bit
    got = _grads(x, a, b)

    # The same blocks freeing a plain input: the same computation, bit for bit.
    a2, b2 = _pair()
    x2 = x0.clone().requires_grad_()
    h2 = a2(x2)
    (b2(h2) ** 2).sum().backward()
    assert all(torch.equal(g, w) for g, w in zip(got, _grads(x2, a2, b2)))

    # Plain autograd: the rebuilt input differs from the original by rounding only.
    a3, b3 = _pair(disable=True)
    x3 = x0.clone().requires_grad_()
    h3 = make(a3(x3))
    (b3(h3) ** 2).sum().backward()
    for g, w in zip(got, _grads(x3, a3, b3)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h.detach(), h3.detach(), rtol=1e-12, atol=1e-13)


def _plain_grads(build: Callable, x0: torch.Tensor) -> list[torch.Tensor]:
    a, b = _pair(disable=True)
    x = x0.clone().requires_grad_()
    loss, extra = build(a, b, x)
    loss.backward()
    return _grads(x, a, b) + [t.grad for t in extra]


def _caller_holds(a, b, x):
    h0 = a(x)
    y = b(Alias.apply(h0))
    seen = h0.detach().clone()  # read between the forward pass and backward
    return (y**2).sum() + h0.sum(), [], seen, h0


def _relu_output(a, b, x):
    h0 = torch.relu(a(x))  # ReLU saves its output for its own backward
    h = Alias.apply(h0)
    del h0
    return (b(h) ** 2).sum(), [], None, None


def _second_view(a, b, x):
    h0 = a(x)
    v = h0[1]
    h = Alias.apply(h0)
    del h0
    y = b(h)
    seen = v.detach().clone()
    return (y**2).sum() + (v**3).sum(), [], seen, v


def _saved_by_mul(a, b, x):
    w = _saved_by_mul.w
    h0 = a(x)
    z = h0 * w  # mul saves h0 for w's gradient
    h = Alias.apply(h0)
    del h0
    return (b(h) ** 2).sum() + z.sum(), [w], None, None


def _fsdp_relu_output(a, b, x):
    h0 = torch.relu(a(x))
    h = _fsdp_alias(h0)
    del h0
    return (b(h) ** 2).sum(), [], None, None


def _fsdp_second_view(a, b, x):
    h0 = a(x)
    v = h0[1]
    h = _fsdp_alias(h0)
    del h0
    y = b(h)
    seen = v.detach().clone()
    return (y**2).sum() + (v**3).sum(), [], seen, v


def _view_of_a_leaf(a, b, x):
    return (b(Alias.apply(x)) ** 2).sum(), [], None, None


# Each case, and the reason the wrapper gives for keeping its input.
HELD: dict[str, tuple[Callable, str]] = {
    "caller_holds_base": (_caller_holds, "which the caller still holds"),
    "relu_output": (_relu_output, "which is also held elsewhere"),
    "second_view": (_second_view, "which is also held elsewhere"),
    "saved_by_mul": (_saved_by_mul, "which is also held elsewhere"),
    "fsdp_relu_output": (_fsdp_relu_output, "which is also held elsewhere"),
    "fsdp_second_view": (_fsdp_second_view, "which is also held elsewhere"),
    "view_of_a_leaf": (_view_of_a_leaf, "view of another tensor; results"),
}


@pytest.mark.parametrize("case", sorted(HELD))
def test_alias_of_a_tensor_held_elsewhere_is_kept_and_read_right(case: str, caught) -> None:
    if case.startswith("fsdp") and not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    build, reason = HELD[case]
    _saved_by_mul.w = torch.randn(3, 4, dtype=F64, requires_grad=True)
    x0 = _batch()

    def plain(a, b, x):
        loss, extra, _, _ = build(a, b, x)
        return loss, extra

    want = _plain_grads(plain, x0)
    _saved_by_mul.w.grad = None

    a, b = _pair()
    x = x0.clone().requires_grad_()
    loss, extra, seen, holder = build(a, b, x)
    messages = _kept_messages(caught)
    assert len(messages) == 1 and "input 0" in messages[0], messages
    assert "it is a view of another tensor" in messages[0] and reason in messages[0]
    if seen is not None:  # the other holder read the right values after the forward pass
        a_ref, b_ref = _pair(disable=True)
        _, _, want_seen, _ = build(a_ref, b_ref, x0.clone().requires_grad_())
        assert torch.equal(seen, want_seen)
    loss.backward()
    if holder is not None:  # and still does after backward
        assert torch.equal(holder.detach(), seen)
    got = _grads(x, a, b) + [t.grad for t in extra]
    assert len(got) == len(want)
    for g, w in zip(got, want):  # plain autograd's, to the rounding of the fused backward
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)
    assert torch.equal(x.detach(), x0)


@pytest.mark.parametrize("view", ["partial", "transposed"])
def test_views_that_are_not_whole_aliases_are_kept(view: str, caught) -> None:
    a, b = _pair()
    x = _batch().requires_grad_()
    if view == "partial":  # the last rows of a (4, 4) activation: offset 4
        h = Alias.apply(torch.cat([x, x[:1]]) * 1)[1:]
    else:  # all of a (4, 3) activation, seen with other strides
        h = Alias.apply(a(x).t().contiguous() * 1).t()
    before = h.detach().clone()
    y = b(h)
    assert _nbytes(h) > 0 and torch.equal(h.detach(), before)
    assert _kept_messages(caught) == [
        "InvertibleModuleWrapper(AdditiveCoupling): input 0 is kept in memory instead of "
        "freed because it is a view of another tensor; results are unaffected, only the "
        "memory saving is lost (this warning is shown once per wrapper)"
    ]
    (y**2).sum().backward()
    assert torch.equal(h.detach(), before)


@needs_fsdp
def test_fsdp_alias_frees_the_unit_input_the_caller_holds_guarded_as_any_input(caught) -> None:
    """An alias made by FSDP2's hook stands for the tensor the caller passed to the
    unit (the wrapper): freed as that input would be without FSDP2, the caller's
    reference included, which then raises until backward restores it."""
    a, b = _pair()
    x = _batch().requires_grad_()
    h0 = a(x)
    y = b(_fsdp_alias(h0))
    assert _kept_messages(caught) == []
    assert _nbytes(h0) == 0 and isinstance(h0, FreedTensor) and h0.numel() == 0
    with pytest.raises(RuntimeError, match="keep_input=True"):
        h0 + 1
    with pytest.raises(RuntimeError, match="keep_input=True"):
        h0.add_(1)
    (y**2).sum().backward()
    assert type(h0) is torch.Tensor and h0.shape == (3, 4)
    a3, b3 = _pair(disable=True)
    torch.testing.assert_close(h0.detach(), a3(_batch()).detach(), rtol=1e-12, atol=1e-13)


def test_generic_alias_whose_base_the_caller_holds_is_kept(caught) -> None:
    """Without FSDP2, a caller that made a view of its own tensor may read that tensor
    again: its Python reference keeps the input (the counts alone cannot see it)."""
    a, b = _pair()
    x = _batch().requires_grad_()
    h0 = a(x)
    before = h0.detach().clone()
    b(h0.view_as(h0))
    assert "which the caller still holds" in _kept_messages(caught)[0]
    assert torch.equal(h0.detach(), before)


def test_aliases_of_a_generic_module_are_rebuilt_by_its_inverse(caught) -> None:
    """A module without a fused backward: the inverse rebuilds the inputs, copied
    into the aliases' memory, which the bases see too."""
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(TwoWay().to(F64))
    x0 = torch.randn(3, 8, dtype=F64, generator=torch.Generator().manual_seed(2))

    def run(wrapper: nn.Module) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        x = x0.clone().requires_grad_()
        h1 = Alias.apply(x[:, :4] * 2)  # activations that nothing but the aliases hold
        h2 = Alias.apply(x[:, 4:] * 3)
        y1, y2 = wrapper(h1, h2)
        if wrapper is wrapped:
            assert _nbytes(h1) == _nbytes(h2) == 0
            assert isinstance(h1._base, FreedTensor) and isinstance(h2._base, FreedTensor)
        ((y1 * y2).sum() + (y2**2).sum()).backward()
        return [x.grad, *(p.grad for p in wrapper.parameters())], (h1, h2)

    got, (h1, h2) = run(wrapped)
    want, (p1, p2) = run(plain)
    assert _kept_messages(caught) == []
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)
    for h, p in ((h1, p1), (h2, p2)):
        assert h.shape == h._base.shape == (3, 4)
        torch.testing.assert_close(h._base.detach(), p.detach(), rtol=1e-12, atol=1e-13)


def test_a_freed_alias_serves_several_backward_passes(caught) -> None:
    torch.manual_seed(0)
    blocks = [_block().to(F64) for _ in range(2)]
    a, b = (InvertibleModuleWrapper(copy.deepcopy(m), num_bwd_passes=2) for m in blocks)
    a2, b2 = (InvertibleModuleWrapper(copy.deepcopy(m), disable=True) for m in blocks)
    grads = []
    for first, second in ((a, b), (a2, b2)):
        x = _batch().requires_grad_()
        h = Alias.apply(first(x))
        loss = (second(h) ** 2).sum()
        if first is a:
            assert _nbytes(h) == 0
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append(_grads(x, first, second))
    assert _kept_messages(caught) == []
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)
