"""The Triton kernels of the exact momentum iteration, run in Triton's interpreter on the CPU.

``TRITON_INTERPRET=1`` makes ``triton.jit`` build interpreted kernels, which walk
CPU tensors with numpy: the same kernel code as on CUDA, so that its arithmetic
is proven bit for bit against the tensor operations without a GPU. Triton reads
the variable when it is imported, so these tests run in a process of their own:
``tests/test_momentum_triton.py`` starts it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run by tests/test_momentum_triton.py, in a process with TRITON_INTERPRET=1",
        allow_module_level=True,
    )
pytest.importorskip("triton")

from invertnet import MomentumNet  # noqa: E402
from invertnet.momentum import kernels  # noqa: E402
from invertnet.momentum.exact import (  # noqa: E402
    BitStore,
    ExactMomentum,
    FixedPoint,
    MomentumState,
    RangeCheck,
)
from invertnet.momentum.gamma import MAX_DENOMINATOR, Gamma  # noqa: E402
from invertnet.momentum.kernels import native_kernels, triton_kernels  # noqa: E402


@pytest.fixture(scope="module")
def interpreted() -> Iterator[ModuleType]:
    """The kernels module, interpreted, serving CPU tensors."""
    from invertnet.momentum import _triton

    assert type(_triton._step_kernel).__name__ == "InterpretedFunction"
    saved = kernels._triton, kernels._TRITON_DEVICES
    kernels._triton, kernels._TRITON_DEVICES = _triton, ("cuda", "cpu")
    try:
        yield _triton
    finally:
        kernels._triton, kernels._TRITON_DEVICES = saved


def _copy(state: MomentumState) -> MomentumState:
    store = BitStore.from_tensors(state.store.tensors(), state.store.layout())
    store.head_bound = state.store.head_bound
    return MomentumState(state.position.clone(), state.velocity.clone(), store)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for 0.0 and fails on NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _assert_same_state(a: MomentumState, b: MomentumState, where: str) -> None:
    # The kernels round with 1.5 * 2**52, which never gives -0.0 where torch's
    # round_() may: compare values there, bits everywhere else.
    assert torch.equal(a.position, b.position), f"position differs {where}"
    assert torch.equal(a.velocity, b.velocity), f"velocity differs {where}"
    assert torch.equal(a.store.head, b.store.head), f"store differs {where}"
    assert len(a.store.chunks) == len(b.store.chunks)


DTYPES = [torch.float32, torch.float64]
OUTPUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@settings(max_examples=20, deadline=None)
@given(
    numerator=st.integers(1, MAX_DENOMINATOR - 1),
    denominator=st.integers(2, MAX_DENOMINATOR),
    dtype=st.sampled_from(DTYPES),
    output_dtype=st.sampled_from([None, *OUTPUT_DTYPES]),  # None: that of the input
    residual=st.booleans(),
    log_scale=st.floats(-6, 3.5),
    size=st.sampled_from([1, 7, 1100]),
    seed=st.integers(0, 2**31),
)
def test_kernels_match_the_tensor_operations_bit_for_bit(
    interpreted: ModuleType,
    numerator: int,
    denominator: int,
    dtype: torch.dtype,
    output_dtype: torch.dtype | None,
    residual: bool,
    log_scale: float,
    size: int,
    seed: int,
) -> None:
    numerator = min(numerator, denominator - 1)
    scale = 10.0**log_scale
    gen = torch.Generator().manual_seed(seed)
    fixed = FixedPoint(dtype)
    core = ExactMomentum(Gamma(numerator, denominator), fixed)
    y_dtype = output_dtype or dtype

    def uniform() -> torch.Tensor:  # both signs
        return (torch.rand(size, generator=gen, dtype=torch.float64) * 2 - 1) * scale

    start = core.start(fixed.to_fixed(uniform(), "x"), fixed.to_fixed(uniform(), "v"))
    fast, slow = _copy(start), _copy(start)
    fast_checks, slow_checks = RangeCheck(fixed), RangeCheck(fixed)
    outputs = []
    steps = 4
    for t in range(steps):
        noise = uniform()
        y = (noise - slow.position if residual else noise).to(y_dtype)
        assert kernels.usable(dtype, (fast.store.head, fast.velocity, fast.position), (y,))
        with triton_kernels(True):
            out_fast = core.advance(fast, y, residual, t, fast_checks)
        with triton_kernels(False):
            out_slow = core.advance(slow, y, residual, t, slow_checks)
        assert _same_bits(out_fast, out_slow), f"inputs of layer {t + 1} differ"
        _assert_same_state(fast, slow, f"after step {t}")
        outputs.append(y)
    # The magnitudes the kernel wrote are those the tensor operations measured.
    records = fast_checks._records, slow_checks._records
    assert [r.what for r in records[0]] == [r.what for r in records[1]]
    for a, b in zip(*records):
        fast_value = float(a.tensors[0]) * a.scale
        slow_value = max(-float(b.tensors[0]), float(b.tensors[1])) * b.scale
        assert fast_value == slow_value, a.what
    fast_checks.check()
    slow_checks.check()
    gen_grad = torch.randn(size, generator=gen, dtype=torch.float64)
    for t in reversed(range(steps)):
        with triton_kernels(True):
            x_fast, g_fast = core.retreat_position(fast, gen_grad)
            core.retreat_velocity(fast, outputs[t], residual)
        with triton_kernels(False):
            x_slow, g_slow = core.retreat_position(slow, gen_grad)
            core.retreat_velocity(slow, outputs[t], residual)
        assert _same_bits(x_fast, x_slow) and _same_bits(g_fast, g_slow)
        _assert_same_state(fast, slow, f"after undoing step {t}")
    _assert_same_state(fast, start, "after undoing every step")


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("found_dtype", [None, torch.float32, torch.bfloat16])
def test_gradient_kernel_matches_the_tensor_operations(
    interpreted: ModuleType, residual: bool, found_dtype: torch.dtype | None
) -> None:
    core = ExactMomentum(Gamma(9, 10), FixedPoint(torch.float32))
    gen = torch.Generator().manual_seed(0)
    grad_x = torch.randn(3000, generator=gen, dtype=torch.float64)
    grad_v = torch.randn(3000, generator=gen, dtype=torch.float64)
    found = None if found_dtype is None else torch.randn(3000, generator=gen).to(found_dtype)
    results = []
    for enabled in (True, False):
        gx, gv = grad_x.clone(), grad_v.clone()
        with triton_kernels(enabled):
            core.backpropagate(gx, gv, found, residual)
        results.append((gx, gv))
    (gx_fast, gv_fast), (gx_slow, gv_slow) = results
    # Without fused multiply-adds on either side (numpy, and torch's CPU loops
    # may fuse): equal up to the last bit.
    torch.testing.assert_close(gx_fast, gx_slow, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(gv_fast, gv_slow, rtol=1e-15, atol=1e-15)


def test_the_step_kernel_records_nan_and_the_overflow_error_names_it(
    interpreted: ModuleType,
) -> None:
    fixed = FixedPoint(torch.float32)
    core = ExactMomentum(Gamma(9, 10), fixed)
    zeros = torch.zeros(3000, dtype=torch.float64)
    state = core.start(zeros.clone(), zeros.clone())
    y = torch.zeros(3000)
    y[1777] = float("nan")
    checks = RangeCheck(fixed)
    core.advance(state, y, True, 4, checks)
    with pytest.raises(OverflowError, match=r"\(1 - gamma\) \* f_4\(x_4\) reaches magnitude nan"):
        checks.check()
    big = torch.zeros(3000)
    big[5] = -fixed.max_abs * 20
    zeros = torch.zeros(3000, dtype=torch.float64)
    state = core.start(zeros.clone(), zeros.clone())
    with pytest.raises(OverflowError, match=r"f_0\(x_0\) reaches magnitude 5\.243e\+05"):
        core.advance(state, big, True, 0)


def _mlp_net(use_backprop: bool, is_residual: bool) -> MomentumNet:
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(5)]
    return MomentumNet(functions, gamma=0.9, use_backprop=use_backprop, is_residual=is_residual)


@pytest.mark.parametrize("is_residual", [True, False])
def test_momentum_net_trains_the_same_with_the_kernels(
    interpreted: ModuleType, monkeypatch: pytest.MonkeyPatch, is_residual: bool
) -> None:
    calls = {"step": 0, "unstep_velocity": 0}
    for name in calls:
        original = getattr(interpreted, name)

        def counted(*args: object, _name: str = name, _original: object = original) -> None:
            calls[_name] += 1
            _original(*args)  # type: ignore[operator]

        monkeypatch.setattr(interpreted, name, counted)
    x = torch.randn(4, 6, requires_grad=True)
    results = []
    for enabled in (True, False):
        net = _mlp_net(False, is_residual)
        with triton_kernels(enabled), native_kernels(False):
            out = net(x)
            grads = torch.autograd.grad(out.square().sum(), [x, *net.parameters()])
        results.append((out.detach(), grads))
    assert calls == {"step": 5, "unstep_velocity": 5}  # only with the kernels on
    (out_fast, grads_fast), (out_slow, grads_slow) = results
    assert torch.equal(out_fast, out_slow)
    for fast, slow in zip(grads_fast, grads_slow):
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9)
