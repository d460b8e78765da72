"""invertnet.ReversibleSequential: two streams split once and merged once, RevLib's
(F, G) pairs, non-invertible layers between stages, and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import invertnet
from invertnet import AdditiveCoupling, InvertibleModuleWrapper, ReversibleSequential
from tests._core_helpers import activation_bytes, assert_grads_close

pytestmark = pytest.mark.usefixtures("one_thread")


def _branch(channels: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh(), nn.Dropout(dropout)
    )


def _stack(dropout: float = 0.2, **kwargs: object) -> ReversibleSequential:
    """Couplings, RevLib-style (F, G) pairs and a strided non-invertible layer."""
    torch.manual_seed(0)
    return ReversibleSequential(
        AdditiveCoupling(_branch(2, dropout), _branch(2, dropout)),
        (_branch(2, dropout), _branch(2, dropout)),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        AdditiveCoupling(_branch(4, dropout), _branch(4, dropout)),
        invertnet.AffineCoupling(_branch(4), adapter=invertnet.AffineAdapterNaive),
        **kwargs,
    ).double()


def _grads(model: nn.Module, x: torch.Tensor, streams: bool = False) -> list:
    model.zero_grad(set_to_none=True)
    leaf = x.detach().clone().requires_grad_()
    torch.manual_seed(7)  # the dropout masks
    if streams:
        y = torch.cat(model(*(h * 1 for h in leaf.chunk(2, dim=1))), dim=1)
    else:
        y = model(leaf * 1)
    weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    (y * weights).sum().backward()
    return [leaf.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("streams", [False, True], ids=["one-tensor", "two-streams"])
def test_gradients_equal_plain_autograd_with_dropout_in_float64(streams: bool) -> None:
    saving = _stack()
    plain = copy.deepcopy(saving)
    plain.disable = True
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    want = _grads(plain, x, streams)
    got = _grads(saving, x, streams)
    assert all(g is not None for g in got)
    assert_grads_close(want, got, rtol=1e-10, atol=1e-12)
    # The memory-saving run kept nothing it should have freed.
    keep = copy.deepcopy(saving)
    keep.keep_input = True
    assert_grads_close(want, _grads(keep, x, streams), rtol=1e-10, atol=1e-12)


def test_the_callers_input_comes_back_bit_identical() -> None:
    stack = _stack()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    stack(x).sum().backward()
    assert torch.equal(x.detach(), before)
    halves = [h.clone().requires_grad_() for h in before.chunk(2, dim=1)]
    originals = [h.detach().clone() for h in halves]
    torch.cat(stack(*halves), dim=1).sum().backward()
    for h, o in zip(halves, originals):
        assert torch.equal(h.detach(), o) and h.grad is not None


def test_inverse_reconstructs_the_input_in_both_forms() -> None:
    torch.manual_seed(0)
    stack = ReversibleSequential(
        *(AdditiveCoupling(_branch(3)) for _ in range(3)), (_branch(3), _branch(3))
    ).double()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = stack(x)
        torch.testing.assert_close(stack.inverse(y), x)
        y1, y2 = stack(*x.chunk(2, dim=1))
        torch.testing.assert_close(torch.cat(stack.inverse(y1, y2), dim=1), x)
    # Under grad too (the wrappers' inverse direction frees and rebuilds).
    y = y.detach().requires_grad_()
    rebuilt = stack.inverse(y * 1)
    torch.testing.assert_close(rebuilt.detach(), x)
    rebuilt.sum().backward()
    assert y.grad is not None


def test_split_dim_minus_one_carries_token_streams() -> None:
    torch.manual_seed(0)
    stack = ReversibleSequential(
        *(AdditiveCoupling(nn.Linear(4, 4), split_dim=-1) for _ in range(2)), split_dim=-1
    )
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        y = stack(x)
        torch.testing.assert_close(stack.inverse(y), x, rtol=1e-5, atol=1e-6)
    assert y.shape == x.shape


def test_settings_follow_the_stack_for_its_own_wrappers_only() -> None:
    given = InvertibleModuleWrapper(AdditiveCoupling(_branch(2)), keep_input=True)
    stack = ReversibleSequential(AdditiveCoupling(_branch(2)), given, (_branch(2), _branch(2)))
    own = [stack[0], stack[2]]
    assert all(isinstance(w, InvertibleModuleWrapper) for w in own) and stack[1] is given
    assert not any(w.keep_input for w in own) and all(w.preserve_rng_state for w in own)
    stack.keep_input, stack.disable, stack.preserve_rng_state = True, True, False
    assert all(w.keep_input and w.disable and not w.preserve_rng_state for w in own)
    assert given.keep_input and not given.disable and given.preserve_rng_state
    assert (stack.keep_input, stack.disable, stack.preserve_rng_state) == (True, True, False)
    assert len(stack) == 3 and list(stack) == [stack[0], given, stack[2]]
    # A pair becomes the additive coupling of its two modules.
    assert isinstance(stack[2].module, AdditiveCoupling)


def test_a_non_invertible_layer_runs_on_the_merged_streams() -> None:
    seen: list[tuple[int, ...]] = []
    pool = nn.AvgPool2d(2)
    pool.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    stack = ReversibleSequential(pool, AdditiveCoupling(_branch(2)), pool)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = stack(x)
    assert seen == [(2, 4, 8, 8), (2, 4, 4, 4)] and y.shape == (2, 4, 2, 2)
    y.sum().backward()
    with pytest.raises(TypeError, match=r"layer 0 \(AvgPool2d\) is not invertible"):
        stack.inverse(y)


def test_keywords_reach_every_reversible_block() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.lin(x)) * scale

    torch.manual_seed(0)
    stack = ReversibleSequential(
        *(AdditiveCoupling(Scaled(), split_dim=-1) for _ in range(3)), split_dim=-1
    ).double()
    plain = copy.deepcopy(stack)
    plain.disable = True
    x = torch.randn(4, 6, dtype=torch.float64)
    scale = torch.rand(4, 1, dtype=torch.float64)

    def grads(model: nn.Module) -> list:
        leaf = x.clone().requires_grad_()
        model(leaf * 1, scale=scale).square().sum().backward()
        return [leaf.grad, *(p.grad for p in model.parameters())]

    assert_grads_close(grads(plain), grads(stack), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        y = stack(x, scale=scale)
        torch.testing.assert_close(stack.inverse(y, scale=scale), x)
        assert not torch.allclose(stack(x, scale=2 * scale), y)


def test_activation_memory_is_flat_in_depth() -> None:
    x = torch.randn(4, 8, 8, 8)

    def measure(depth: int, **kwargs: object) -> int:
        torch.manual_seed(0)
        stem = nn.Conv2d(8, 8, 3, padding=1)  # the stack's input comes out of a layer
        stack = ReversibleSequential(
            *(AdditiveCoupling(_branch(4)) for _ in range(depth)), **kwargs
        )
        model = nn.Sequential(stem, stack)
        return activation_bytes(model, lambda: model(x).sum())

    saving = {d: measure(d) for d in (2, 8)}
    kept = {d: measure(d, keep_input=True) for d in (2, 8)}
    plain = {d: measure(d, disable=True) for d in (2, 8)}
    assert saving[8] == saving[2]
    assert kept[8] > 2 * kept[2] and plain[8] > 3 * plain[2]
    assert saving[8] < kept[8] / 4


def test_outputs_equal_revlibs_reversible_sequential() -> None:
    revlib = pytest.importorskip("revlib")
    torch.manual_seed(0)
    pairs = [(_branch(2), _branch(2)) for _ in range(3)]
    ours = ReversibleSequential(*pairs).double()
    theirs = revlib.ReversibleSequential(*(m for pair in pairs for m in pair)).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize(
    ("blocks", "kwargs", "error", "match"),
    [
        (((nn.Linear(2, 2),),), {}, TypeError, r"block 0 is a tuple of 1 items"),
        (((nn.Linear(2, 2), "g"),), {}, TypeError, r"a pair must be two modules"),
        ((lambda x: x,), {}, TypeError, r"block 0 is a function; expected an nn.Module"),
        ((), {"split_dim": 1.0}, TypeError, r"split_dim must be an int"),
    ],
)
def test_bad_construction_is_refused(blocks, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        ReversibleSequential(*blocks, **kwargs)


def test_bad_calls_are_refused_before_anything_is_freed() -> None:
    stack = ReversibleSequential(AdditiveCoupling(nn.Linear(2, 2)))
    x = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"dimension 1 of the input has size 5; it must be even"):
        stack(x * 1)
    with pytest.raises(TypeError, match=r"one tensor .* or the two streams, got 3"):
        stack(x, x, x)
    with pytest.raises(TypeError, match=r"one tensor or the two streams, got 0"):
        stack.inverse()
