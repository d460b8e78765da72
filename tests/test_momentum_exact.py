"""The exact fixed-point core of MomentumNet(use_backprop=False), and its consequences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from invertnet import MomentumNet
from invertnet.momentum.backends import REFERENCE
from invertnet.momentum.exact import ExactMomentum
from invertnet.momentum.fixed_point import (
    CHUNK_BITS,
    HEAD_LIMIT,
    LIMIT,
    SCALE_BITS,
    BitStore,
    FixedPoint,
    RangeCheck,
    floor_divmod,
)
from invertnet.momentum.gamma import MAX_DENOMINATOR, Gamma

GAMMAS = [0.99, 0.9, 0.5, 0.1]
DTYPES = [torch.float32, torch.float64]


def _core(gamma: float | Gamma, dtype: torch.dtype) -> ExactMomentum:
    """A core on the reference backend: its arithmetic is what this file proves."""
    if not isinstance(gamma, Gamma):
        gamma = Gamma.from_value(gamma, "test")
    return ExactMomentum(gamma, FixedPoint(dtype), REFERENCE)


def _run_core(gamma: float, dtype: torch.dtype, depth: int, scale: float, seed: int = 0):
    """Run the core on random functions; return (core, final state, history, outputs)."""
    gen = torch.Generator().manual_seed(seed)
    core = _core(gamma, dtype)
    fixed = core.fixed
    shape = (7, 9)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    v = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale
    state = core.start(fixed.to_fixed(x, "x"), fixed.to_fixed(v, "v"))
    history, outputs = [], []
    checks = RangeCheck(fixed)
    for t in range(depth):
        # f = noise - x pulls the position back, so it stays of the order of `scale`
        # while taking both signs.
        noise = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale
        f = (noise - state.position).to(dtype)
        history.append((state.position.clone(), state.velocity.clone()))
        outputs.append(f)
        core.advance(state, f, True, t, checks)
    checks.check()
    return core, state, history, outputs


def _undo(core: ExactMomentum, state, history, outputs) -> None:
    for t in reversed(range(len(outputs))):
        core.retreat_position(state, torch.zeros_like(state.velocity))
        core.retreat_velocity(state, outputs[t], True)
        assert torch.equal(state.position, history[t][0]), f"position differs at layer {t}"
        assert torch.equal(state.velocity, history[t][1]), f"velocity differs at layer {t}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [*GAMMAS, 0.123456])
def test_reversal_is_bit_identical_at_depth_1000(gamma: float, dtype: torch.dtype) -> None:
    core, state, history, updates = _run_core(gamma, dtype, depth=1000, scale=1e4)
    _undo(core, state, history, updates)
    # The store is back to empty: every bit taken was given back.
    assert state.store.steps == 0 and not state.store.chunks
    assert torch.count_nonzero(state.store.head) == 0


@pytest.mark.parametrize("gamma", GAMMAS)
def test_values_span_both_signs_up_to_1e4(gamma: float) -> None:
    _, _, history, _ = _run_core(gamma, torch.float32, depth=50, scale=1e4)
    positions = torch.stack([x for x, _ in history])
    assert positions.min() < -5e3 and positions.max() > 5e3


@pytest.mark.parametrize("gamma", GAMMAS)
def test_store_grows_by_about_log2_of_1_over_gamma_bits_per_layer(gamma: float) -> None:
    depth = 1000
    _, state, _, _ = _run_core(gamma, torch.float32, depth=depth, scale=1.0)
    store = state.store
    elements = store.head.numel()
    bits = len(store.chunks) * CHUNK_BITS + math.log2(float(store.head.max()) + 1)
    expected = depth * math.log2(1 / gamma)
    assert expected - 2 * CHUNK_BITS <= bits <= expected + 2 * CHUNK_BITS
    # Chunks are int32: 4 bytes per 31 bits, plus an 8-byte head.
    assert store.nbytes() == elements * (8 + 4 * len(store.chunks))
    assert float(store.head.max()) <= store.head_bound < HEAD_LIMIT


@pytest.mark.parametrize("gamma", [0.9, 0.123456])
def test_velocity_product_is_within_one_unit_of_gamma_v(gamma: float) -> None:
    core = _core(gamma, torch.float64)
    gen = torch.Generator().manual_seed(0)
    # Velocities up to the limit: n v alone would pass it, the split product not.
    for magnitude in (2.0**49, 2.0**20):
        v = torch.randint(-(2**40), 2**40, (1000,), generator=gen).double() * (magnitude / 2**40)
        state = core.start(torch.zeros_like(v), v.round())
        zero = torch.zeros_like(v)  # f = 0: an update of 0
        for t in range(21):  # let the store fill with random digits
            expected = state.velocity * gamma
            state.position.zero_()  # only the velocity is of interest here
            core.advance(state, zero, True, t)
        # float64 rounds gamma * v (|v| < 2**50) by at most 1/8 unit.
        assert (state.velocity - expected).abs().max() < 1.125


def test_products_of_velocities_near_the_limit_are_undone_exactly() -> None:
    # n v passes 2**53 for these velocities (n = 1929): only the split form is exact.
    core = _core(0.123456, torch.float64)
    gen = torch.Generator().manual_seed(0)
    v = torch.randint(-(2**49), 2**49, (5000,), generator=gen).double()
    state = core.start(torch.zeros_like(v), v.clone())
    history, outputs = [], []
    for t in range(8):
        history.append((state.position.clone(), state.velocity.clone()))
        update = torch.randint(-(2**45), 2**45, (5000,), generator=gen).double()
        # The output whose update, (1 - gamma) f in units, is exactly `update`.
        f = update / core.constants.mix_units
        assert torch.equal(torch.round(f * core.constants.mix_units), update)
        outputs.append(f)
        core.advance(state, f, True, t)
    _undo(core, state, history, outputs)
    assert torch.equal(state.velocity, v)


def test_gamma_zero_stores_the_velocity_whole() -> None:
    core, state, history, updates = _run_core(0.0, torch.float32, depth=20, scale=10.0)
    assert len(state.store.kept) == 20
    _undo(core, state, history, updates)


def test_gamma_one_keeps_the_velocity_and_stores_nothing() -> None:
    core, state, history, updates = _run_core(1.0, torch.float32, depth=20, scale=10.0)
    assert not state.store.kept and not state.store.chunks
    assert torch.count_nonzero(state.store.head) == 0
    _undo(core, state, history, updates)


def test_negative_values_use_floor_division() -> None:
    # momentumnet mixed truncating division with floor remainders: wrong below zero.
    core, state, history, updates = _run_core(0.5, torch.float32, depth=10, scale=1e-6)
    assert (state.velocity < 0).any()
    _undo(core, state, history, updates)


def test_bit_store_cuts_chunks_on_a_fixed_schedule_and_restores_them() -> None:
    store = BitStore.empty_like(torch.zeros(3))
    store.begin_step(9, 10)
    store.push(torch.tensor([1.0, 2.0, 3.0]), 10)
    assert store.head_bound == 9
    big = float(2**45)
    store.head = store.head + big
    store.head_bound = HEAD_LIMIT * 9 // 10  # the next step could pass the limit
    store.begin_step(9, 10)
    assert len(store.chunks) == 1 and store.chunk_at == [1]
    assert store.chunks[0].dtype == torch.int32
    assert store.head_bound < HEAD_LIMIT
    copy = BitStore.from_tensors(store.tensors(), store.layout())
    copy.end_retreat()
    assert not copy.chunks and len(store.chunks) == 1  # the original is untouched
    assert torch.equal(copy.head, torch.tensor([1.0, 2.0, 3.0]) + big)


def _floor_divmod_matches_int64(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    # Values up to the largest that the state and the store reach, both signs,
    # and the multiples of the divisor and their neighbours, where a rounded
    # quotient would fall on the wrong side of an integer.
    top = LIMIT - 1
    wide = torch.randint(-top, top + 1, (200_000,), generator=gen)
    for divisor in (1, 2, 3, 9, 10, 100, 1929, 15625, 999_983, MAX_DENOMINATOR):
        near = torch.randint(-(top // divisor) + 1, top // divisor, (50_000,), generator=gen)
        near = (near * divisor).unsqueeze(1) + torch.tensor([-1, 0, 1])
        edges = torch.tensor([-top, -top + 1, -divisor, -1, 0, 1, divisor, top - 1, top])
        ints = torch.cat([wide, near.flatten(), edges])
        quotient, remainder = floor_divmod(ints.double().to(device), divisor)
        expected = torch.div(ints, divisor, rounding_mode="floor")
        assert torch.equal(quotient.cpu().long(), expected), divisor
        assert torch.equal(remainder.cpu().long(), ints - expected * divisor), divisor


def test_float64_floor_division_is_exact_below_the_limit() -> None:
    _floor_divmod_matches_int64("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float64_floor_division_is_exact_on_cuda() -> None:
    # CUDA contracts multiply-adds into fused ones; the bound allows for both.
    _floor_divmod_matches_int64("cuda")


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_function_output_raises_overflow(bad: float) -> None:
    core = _core(0.9, torch.float32)
    state = core.start(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    y = torch.tensor([0.0, bad, 1.0, 2.0])
    with pytest.raises(OverflowError, match=r"f_3\(x_3\) reaches magnitude (nan|inf)"):
        core.advance(state, y, residual=True, layer=3)


def test_a_state_that_stays_in_range_is_not_flagged() -> None:
    # x_{t+1} = x_t + f(x_t) = -x_t: the position never grows, though the sum of
    # its steps' magnitudes would pass the limit after a few dozen layers.
    core = _core(0.0, torch.float32)
    fixed = core.fixed
    x = torch.full((5,), 1e4)
    state = core.start(fixed.to_fixed(x, "x"), torch.zeros(5, dtype=torch.float64))
    checks = RangeCheck(fixed)
    for t in range(200):
        core.advance(state, -2 * state.position.float(), True, t, checks)
    checks.check()
    assert torch.equal(state.position.abs(), x.double())


def test_scale_bits_keep_1e4_with_headroom() -> None:
    for dtype in DTYPES:
        assert FixedPoint(dtype).max_abs >= 1e5
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


def _check_bit_identical_inputs(gamma: float, dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(0)
    seen: list[torch.Tensor] = []
    depth = 200
    net = MomentumNet([_Recorder(6, seen) for _ in range(depth)], gamma, use_backprop=False)
    net = net.to(device=device, dtype=dtype)
    x = (torch.randn(4, 6, dtype=dtype, device=device) * 1e3).requires_grad_(True)
    net(x).sum().backward()
    forward, backward = seen[:depth], seen[depth:]
    assert len(backward) == depth  # one evaluation per layer in backward
    for t in range(depth):
        assert torch.equal(forward[t], backward[depth - 1 - t]), f"layer {t} differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.9, 0.1])
def test_backward_gives_functions_bit_identical_inputs(
    gamma: float, dtype: torch.dtype, exact_path: str
) -> None:
    _check_bit_identical_inputs(gamma, dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gamma", [0.9, 0.1])
def test_backward_gives_functions_bit_identical_inputs_on_cuda(gamma: float) -> None:
    _check_bit_identical_inputs(gamma, torch.float32, "cuda")


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
    net(x.detach().mul(1e-9).requires_grad_(True)).sum().backward()


def test_growing_state_raises_overflow_naming_the_layer() -> None:
    class Push(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, 1e4)

    net = MomentumNet([Push()] * 200, gamma=0.0, use_backprop=False)
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(OverflowError, match=r"the position x_\d+ reaches"):
        net(x)
