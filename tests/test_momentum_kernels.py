"""The C loops of the exact momentum iteration give the states the tensor operations give."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from invertnet import MomentumNet
from invertnet.momentum import kernels
from invertnet.momentum.exact import ExactMomentum, FixedPoint, MomentumState
from invertnet.momentum.gamma import MAX_DENOMINATOR, Gamma
from invertnet.momentum.kernels import native_kernels
from tests._momentum_kernel_checks import assert_same_state, backpropagate_both_ways, copy_state


def test_the_c_loops_are_built() -> None:
    # Installing from source compiles them; without them every step falls back to
    # the tensor operations, several times slower for small tensors.
    assert kernels.NATIVE, "invertnet.momentum._kernels is missing: was a C compiler found?"


class _Counted:
    """Counts the calls of one of the kernels module's loops, to see which path ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        loop: Callable[..., None] = getattr(kernels, name)

        def counted(*args: Any) -> None:
            self.calls += 1
            loop(*args)

        monkeypatch.setattr(kernels, name, counted)


@settings(max_examples=60, deadline=None)
@given(
    numerator=st.integers(1, MAX_DENOMINATOR - 1),
    denominator=st.integers(2, MAX_DENOMINATOR),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    residual=st.booleans(),
    # Up to 10**3.5: with gamma near 1 the velocity barely decays, and 40 steps of it
    # must stay within the supported range.
    log_scale=st.floats(-6, 3.5),
    seed=st.integers(0, 2**31),
)
def test_steps_and_their_undoing_match_the_tensor_operations_bit_for_bit(
    numerator: int,
    denominator: int,
    dtype: torch.dtype,
    residual: bool,
    log_scale: float,
    seed: int,
) -> None:
    numerator = min(numerator, denominator - 1)
    scale = 10.0**log_scale
    gen = torch.Generator().manual_seed(seed)
    fixed = FixedPoint(dtype)
    core = ExactMomentum(Gamma(numerator, denominator), fixed)

    def uniform() -> torch.Tensor:  # both signs
        return (torch.rand(5, 7, generator=gen, dtype=torch.float64) * 2 - 1) * scale

    start = core.start(fixed.to_fixed(uniform(), "x"), fixed.to_fixed(uniform(), "v"))
    native, reference = copy_state(start), copy_state(start)
    outputs = []
    for t in range(40):
        # Pulled back towards the noise, so the state stays of the order of `scale`.
        noise = uniform()
        y = (noise - reference.position if residual else noise).to(dtype)
        with native_kernels(True):
            fast = core.advance(native, y, residual, t)
        with native_kernels(False):
            slow = core.advance(reference, y, residual, t)
        assert torch.equal(fast, slow)
        assert_same_state(native, reference, f"after step {t}")
        outputs.append(y)
    grad_v = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    for t in reversed(range(40)):
        with native_kernels(True):
            fast, fast_grad = core.retreat_position(native, grad_v)
            core.retreat_velocity(native, outputs[t], residual)
        with native_kernels(False):
            slow, slow_grad = core.retreat_position(reference, grad_v)
            core.retreat_velocity(reference, outputs[t], residual)
        assert torch.equal(fast, slow) and torch.equal(fast_grad, slow_grad)
        assert_same_state(native, reference, f"after undoing step {t}")
    assert_same_state(native, start, "after undoing every step")
    assert native.store.steps == 0 and torch.count_nonzero(native.store.head) == 0


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("with_input_gradient", [True, False])
def test_gradient_update_matches_the_tensor_operations(
    residual: bool, with_input_gradient: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    grad_x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    grad_v = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    found = torch.randn(64, 3, generator=gen) if with_input_gradient else None
    gx_fast, gv_fast = backpropagate_both_ways(native_kernels, grad_x, grad_v, found, residual)
    expected = grad_x + (found.double() if found is not None else 0)
    if not residual:
        expected = expected - 0.1 * grad_v
    torch.testing.assert_close(gx_fast, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(gv_fast, expected + 0.9 * grad_v, rtol=1e-15, atol=1e-15)


def _train_both_ways(
    make: Callable[[], tuple[MomentumNet, torch.Tensor]],
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    results = []
    for enabled in (True, False):
        net, x = make()
        x.requires_grad_(True)
        with native_kernels(enabled):
            out = net(x)
            wanted = [x, *net.parameters()]
            grads = torch.autograd.grad((out * out.detach().cos()).sum(), wanted)
        results.append((out.detach(), list(grads)))
    return results


def _assert_same_training(make: Callable[[], tuple[MomentumNet, torch.Tensor]]) -> None:
    (out_fast, grads_fast), (out_slow, grads_slow) = _train_both_ways(make)
    assert torch.equal(out_fast, out_slow)
    for fast, slow in zip(grads_fast, grads_slow):
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("is_residual", [True, False])
def test_momentum_net_trains_the_same_with_and_without_the_loops(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, is_residual: bool
) -> None:
    def make() -> tuple[MomentumNet, torch.Tensor]:
        torch.manual_seed(0)
        functions = [
            nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(20)
        ]
        net = MomentumNet(functions, gamma=0.9, use_backprop=False, is_residual=is_residual)
        return net.to(dtype), torch.randn(4, 8, dtype=dtype)

    steps = _Counted(monkeypatch, "step")
    undos = _Counted(monkeypatch, "unstep_velocity")
    _assert_same_training(make)
    assert steps.calls == 20 and undos.calls == 20  # the loops ran, once per layer


def test_channels_last_states_take_the_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    def make() -> tuple[MomentumNet, torch.Tensor]:
        torch.manual_seed(0)
        functions = [nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()) for _ in range(5)]
        net = MomentumNet(functions, gamma=0.5, use_backprop=False)
        net = net.to(memory_format=torch.channels_last)
        return net, torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last)

    steps = _Counted(monkeypatch, "step")
    _assert_same_training(make)
    assert steps.calls == 5


def test_an_expanded_output_gradient_takes_the_loops_in_the_state_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gradient of out.sum() is a tensor of ones expanded (stride 0); the state
    # gradients are made in the state's own layout (here channels_last) from it.
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()) for _ in range(4)]
    net = MomentumNet(functions, gamma=0.9, use_backprop=False)
    net = net.to(memory_format=torch.channels_last)
    plain = MomentumNet(functions, gamma=0.9)
    x = torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last).requires_grad_(True)
    updates = _Counted(monkeypatch, "accumulate")
    net(x).sum().backward()
    assert updates.calls == 4
    expected = torch.autograd.grad(plain(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


class _Transposed(nn.Module):
    """A layer whose output is a transposed view: not in the state's memory order."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.t().contiguous().t())).t().contiguous().t()


@pytest.mark.parametrize(
    "make_function, dtype",
    [
        (_Transposed, torch.float32),  # strides differ from the state's
        (lambda: nn.Sequential(nn.Linear(6, 6), nn.Tanh()), torch.float16),  # no loop for it
    ],
)
def test_tensors_the_loops_cannot_walk_take_the_tensor_operations(
    monkeypatch: pytest.MonkeyPatch, make_function: Callable[[], nn.Module], dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    net = MomentumNet([make_function() for _ in range(4)], gamma=0.9, use_backprop=False)
    plain = MomentumNet(list(net.functions), gamma=0.9)
    net, plain = net.to(dtype), plain.to(dtype)
    x = torch.randn(6, 5, dtype=dtype).t().requires_grad_(True)  # (5, 6), column-major
    steps = _Counted(monkeypatch, "step")
    out = net(x)
    out.float().square().sum().backward()
    assert steps.calls == 0
    assert x.grad is not None
    torch.testing.assert_close(out, plain(x), rtol=2e-3, atol=1e-3)


def test_autocast_outputs_get_gradients_in_their_dtype() -> None:
    # Under autocast the functions return bfloat16 for float32 inputs: the loops do
    # not apply, and the output gradient is converted once, from float64.
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)]
    light = MomentumNet(functions, gamma=0.9, use_backprop=False)
    plain = MomentumNet(functions, gamma=0.9)
    x = torch.randn(4, 8, requires_grad=True)
    grads = []
    for net in (plain, light):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        wanted = [x, *functions[0].parameters()]
        grads.append(torch.autograd.grad(out.float().square().sum(), wanted))
    for g_plain, g_light in zip(*grads):
        torch.testing.assert_close(g_light, g_plain, rtol=2e-2, atol=2e-2)


def test_native_kernels_requires_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "NATIVE", False)
    with (
        pytest.raises(RuntimeError, match=r"invertnet.momentum._kernels is not built"),
        native_kernels(True),
    ):
        pass
    with native_kernels(False):  # turning them off needs nothing
        pass


def test_native_kernels_restores_the_setting_after_an_error() -> None:
    with pytest.raises(ValueError, match="inside"), native_kernels(False):
        assert not kernels.usable(torch.float32, (torch.zeros(2, dtype=torch.float64),), ())
        raise ValueError("inside")
    assert kernels.usable(torch.float32, (torch.zeros(2, dtype=torch.float64),), ())


def _step_and_undo(core: ExactMomentum, start: MomentumState, y: torch.Tensor) -> list[Any]:
    state = copy_state(start)
    out = core.advance(state, y, True, 0)
    after = copy_state(state)
    x, grad_y = core.retreat_position(state, torch.ones_like(state.velocity))
    core.retreat_velocity(state, y, True)
    return [out, after.position, after.velocity, after.store.head, x, grad_y, state.store.head]


def test_large_tensors_are_cut_into_ranges_that_give_the_same_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fixed = FixedPoint(torch.float32)
    core = ExactMomentum(Gamma(9, 10), fixed)
    gen = torch.Generator().manual_seed(0)
    x, v, y = (torch.randn(1001, generator=gen) for _ in range(3))
    start = core.start(fixed.to_fixed(x, "x"), fixed.to_fixed(v, "v"))
    whole = _step_and_undo(core, start, y)
    # 1001 elements in ranges of at least 100: as many as threads (cut unevenly).
    monkeypatch.setattr(kernels, "PARALLEL_GRAIN", 100)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        cut = _step_and_undo(core, start, y)
    finally:
        torch.set_num_threads(threads)
    assert kernels._pool is not None and kernels._pool[1] == 3
    for a, b in zip(whole, cut):
        assert torch.equal(a, b)


def test_a_process_does_not_use_a_pool_inherited_from_its_parent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A forked child inherits the parent's pool object but not its threads: work
    # sent to it would wait forever. The pool is kept per process id.
    monkeypatch.setattr(kernels, "_pool", None)  # restored afterwards
    parent = kernels._executor(2)
    assert kernels._executor(2) is parent
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as seen from a child
    child = kernels._executor(2)
    assert child is not parent
    assert child.submit(sum, [1, 2]).result(timeout=10) == 3
    parent.shutdown()
    child.shutdown()


def test_the_loops_take_the_one_product_form_only_where_their_velocity_peak_allows() -> None:
    # The C loops return the largest velocity they wrote; the next step computes
    # n v + r in one product only if d |v| stays in range, else in the split form.
    fixed = FixedPoint(torch.float64)
    gen = torch.Generator().manual_seed(0)
    for gamma, scale, direct in [(Gamma(9, 10), 1.0, True), (Gamma(1929, 15625), 1e4, False)]:
        core = ExactMomentum(gamma, fixed)
        x = torch.randn(50, generator=gen, dtype=torch.float64) * scale
        state = core.start(fixed.to_fixed(x, "x"), torch.zeros_like(x), velocity_peak=0.0)
        reference = copy_state(state)
        reference.velocity_peak = None  # the tensor operations: always split
        outputs = [torch.randn(50, generator=gen, dtype=torch.float64) * scale for _ in range(5)]
        for t, y in enumerate(outputs):
            with native_kernels(True):
                core.advance(state, y, True, t)
            with native_kernels(False):
                core.advance(reference, y, True, t)
            assert_same_state(state, reference, f"after step {t}")
        assert state.velocity_peak is not None and reference.velocity_peak is None
        assert state.direct_at == ({0, 1, 2, 3, 4} if direct else {0})
        for t in reversed(range(5)):
            with native_kernels(True):
                core.retreat_position(state, torch.zeros_like(x))
                core.retreat_velocity(state, outputs[t], True)
            with native_kernels(False):
                core.retreat_position(reference, torch.zeros_like(x))
                core.retreat_velocity(reference, outputs[t], True)
            assert_same_state(state, reference, f"after undoing step {t}")
        assert torch.count_nonzero(state.velocity) == 0
