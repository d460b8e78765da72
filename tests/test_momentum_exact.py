"""The exact fixed-point core of MomentumNet(use_backprop=False), and its consequences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from invertnet import MomentumNet
from invertnet.momentum.exact import (
    CHUNK_BITS,
    SCALE_BITS,
    BitStore,
    ExactMomentum,
    FixedPoint,
)
from invertnet.momentum.gamma import MAX_DENOMINATOR, Gamma

GAMMAS = [0.99, 0.9, 0.5, 0.1]
DTYPES = [torch.float32, torch.float64]


def _run_core(gamma: float, dtype: torch.dtype, depth: int, scale: float, seed: int = 0):
    """Run the core on random updates; return (core, final state, history, updates)."""
    gen = torch.Generator().manual_seed(seed)
    fixed = FixedPoint(dtype)
    core = ExactMomentum(Gamma.from_value(gamma, "test"), fixed)
    shape = (7, 9)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    v = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    state = core.start(fixed.to_fixed(x, "x"), fixed.to_fixed(v, "v"))
    history, updates = [], []
    for t in range(depth):
        # Updates keep |v| near `scale`, so positions wander but stay in range.
        f = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale
        update = fixed.to_fixed((1 - gamma) * f - (1 - gamma) * fixed.to_float(state.velocity), "u")
        history.append((state.position.clone(), state.velocity.clone()))
        updates.append(update)
        core.step(state, update, t)
    core.check(state, depth)
    return core, state, history, updates


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_reversal_is_bit_identical_at_depth_1000(gamma: float, dtype: torch.dtype) -> None:
    core, state, history, updates = _run_core(gamma, dtype, depth=1000, scale=1e4)
    for t in reversed(range(1000)):
        core.unstep_position(state)
        core.unstep_velocity(state, updates[t])
        assert torch.equal(state.position, history[t][0]), f"position differs at layer {t}"
        assert torch.equal(state.velocity, history[t][1]), f"velocity differs at layer {t}"
    # The store is back to empty: every bit taken was given back.
    assert state.store.steps == 0 and not state.store.chunks
    assert torch.count_nonzero(state.store.head) == 0


@pytest.mark.parametrize("gamma", GAMMAS)
def test_values_span_both_signs_up_to_1e4(gamma: float) -> None:
    _, _, history, _ = _run_core(gamma, torch.float32, depth=50, scale=1e4)
    fixed = FixedPoint(torch.float32)
    values = torch.stack([fixed.to_float(v) for _, v in history])
    assert values.min() < -5e3 and values.max() > 5e3


@pytest.mark.parametrize("gamma", GAMMAS)
def test_store_grows_by_about_log2_of_1_over_gamma_bits_per_layer(gamma: float) -> None:
    depth = 1000
    _, state, _, _ = _run_core(gamma, torch.float32, depth=depth, scale=1.0)
    store = state.store
    elements = store.head.numel()
    bits = len(store.chunks) * CHUNK_BITS + math.log2(int(store.head.max()) + 1)
    expected = depth * math.log2(1 / gamma)
    assert expected - 2 * CHUNK_BITS <= bits <= expected + 2 * CHUNK_BITS
    # Chunks are int32: 4 bytes per 31 bits, plus an 8-byte head.
    assert store.nbytes() == elements * (8 + 4 * len(store.chunks))


def test_velocity_product_is_within_two_units_of_gamma_v() -> None:
    fixed = FixedPoint(torch.float64)
    gamma = Gamma.from_value(0.9, "test")
    core = ExactMomentum(gamma, fixed)
    v = torch.randint(-(2**50), 2**50, (1000,), dtype=torch.int64)
    state = core.start(torch.zeros_like(v), v.clone())
    for t in range(20):  # let the store fill with random digits
        core.step(state, torch.zeros_like(v), t)
    expected = state.velocity.double() * 0.9
    core.step(state, torch.zeros_like(v), 20)
    # float64 rounds 0.9 * v (|v| < 2**50) by at most 1/8 unit.
    assert (state.velocity.double() - expected).abs().max() < 2.125


def test_gamma_zero_stores_the_velocity_whole() -> None:
    core, state, history, updates = _run_core(0.0, torch.float32, depth=20, scale=10.0)
    assert len(state.store.kept) == 20
    for t in reversed(range(20)):
        core.unstep_position(state)
        core.unstep_velocity(state, updates[t])
        assert torch.equal(state.position, history[t][0])
        assert torch.equal(state.velocity, history[t][1])


def test_negative_values_use_floor_division() -> None:
    # momentumnet mixed truncating division with floor remainders: wrong below zero.
    core, state, history, updates = _run_core(0.5, torch.float32, depth=10, scale=1e-6)
    assert (state.velocity < 0).any()
    for t in reversed(range(10)):
        core.unstep_position(state)
        core.unstep_velocity(state, updates[t])
    assert torch.equal(state.velocity, history[0][1])


def test_bit_store_round_trip_through_saved_tensors() -> None:
    store = BitStore.empty_like(torch.zeros(3))
    store.begin_step(0)
    store.push(torch.tensor([1, 2, 3]), 10)
    store.head = store.head + 2**45  # force a flush at the next step
    store.begin_step(int(store.head.max()))
    assert len(store.chunks) == 1
    copy = BitStore.from_tensors(store.tensors(), store.layout())
    copy.end_unstep()
    assert not copy.chunks and len(store.chunks) == 1  # the original is untouched
    assert torch.equal(copy.head, torch.tensor([1, 2, 3]) + 2**45)


def test_gamma_is_an_exact_fraction() -> None:
    assert Gamma.from_value(0.9, "t") == Gamma(9, 10)
    assert Gamma.from_value(0.99, "t") == Gamma(99, 100)
    assert Gamma.from_value(0.0, "t") == Gamma(0, 1)
    assert Gamma.from_value(0.123456, "t") == Gamma(1929, 15625)
    odd = Gamma.from_value(1 / math.pi, "t")
    assert odd.denominator <= MAX_DENOMINATOR
    assert abs(odd.value - 1 / math.pi) < 1 / (odd.denominator * MAX_DENOMINATOR)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_gamma_out_of_range_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="gamma must be in"):
        Gamma.from_value(bad, "MomentumNet")


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_of_range_input_raises_overflow(dtype: torch.dtype) -> None:
    fixed = FixedPoint(dtype)
    with pytest.raises(OverflowError, match="the input x reaches magnitude"):
        fixed.to_fixed(torch.tensor([1.0, fixed.max_abs * 2]), "the input x")
    with pytest.raises(OverflowError, match="reaches magnitude nan"):
        fixed.to_fixed(torch.tensor([float("nan")]), "f")


def test_scale_bits_keep_1e4_with_headroom() -> None:
    for dtype in DTYPES:
        assert FixedPoint(dtype).max_abs >= 1e6
    assert SCALE_BITS[torch.float32] >= 32


# -- consequences at the level of MomentumNet ----------------------------------


class _Recorder(nn.Module):
    """A tanh layer that records, bit for bit, every input it is called with."""

    def __init__(self, d: int, seen: list[torch.Tensor]) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return 3.0 * torch.tanh(self.lin(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.9, 0.1])
def test_backward_gives_functions_bit_identical_inputs(gamma: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    seen: list[torch.Tensor] = []
    depth = 200
    net = MomentumNet([_Recorder(6, seen) for _ in range(depth)], gamma, use_backprop=False)
    net = net.to(dtype)
    x = (torch.randn(4, 6, dtype=dtype) * 1e3).requires_grad_(True)
    net(x).sum().backward()
    forward, backward = seen[:depth], seen[depth:]
    assert len(backward) == depth  # one evaluation per layer in backward
    for t in range(depth):
        assert torch.equal(forward[t], backward[depth - 1 - t]), f"layer {t} differs"


def test_forward_overflow_raises_before_anything_is_stored() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    net = MomentumNet([lin] * 30, gamma=0.5, use_backprop=False)
    x = torch.full((2, 4), 1e9, requires_grad=True)
    expected = "the input x .* exact reversal supports for torch.float32"
    with pytest.raises(OverflowError, match=expected):
        net(x)
    assert x.grad is None and torch.equal(x, torch.full((2, 4), 1e9))
    # The same input works in plain mode, and a smaller one in exact mode.
    MomentumNet([lin] * 30, gamma=0.5)(x).sum().backward()
    net(x.detach().mul(1e-6).requires_grad_(True)).sum().backward()


def test_growing_state_raises_overflow_naming_the_layer() -> None:
    class Push(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, 1e7)

    net = MomentumNet([Push()] * 200, gamma=0.0, use_backprop=False)
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(OverflowError, match=r"the position x_\d+ reaches"):
        net(x)
