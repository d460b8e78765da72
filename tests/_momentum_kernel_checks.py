"""Checks that the fused kernels of the exact momentum iteration give the tensor path's bits.

The Triton checks are shared by ``momentum_triton_cases.py`` (Triton's interpreter on
CPU tensors, in CI) and ``test_momentum_triton_cuda.py`` (compiled kernels on a
GPU, against CUDA's tensor operations); ``test_momentum_kernels.py`` (the C loops)
shares the state helpers. Inputs are drawn on the CPU with a seeded generator and
moved to ``device``, so every device sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from hypothesis import strategies as st

from invertnet.momentum import kernels
from invertnet.momentum.exact import ExactMomentum, FixedPoint, MomentumState, RangeCheck
from invertnet.momentum.gamma import MAX_DENOMINATOR, Gamma
from invertnet.momentum.kernels import triton_kernels

#: The functions' input dtypes the kernels serve, and the output dtypes they read.
DTYPES = [torch.float32, torch.float64]
OUTPUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def phase_cases(sizes: Sequence[int]) -> st.SearchStrategy[dict[str, Any]]:
    """The keyword arguments of :func:`check_phases_match` but ``device``: random
    gamma fractions, dtypes, residual or not, scales and signs, of the given sizes."""
    return st.fixed_dictionaries(
        {
            "numerator": st.integers(1, MAX_DENOMINATOR - 1),
            "denominator": st.integers(2, MAX_DENOMINATOR),
            "dtype": st.sampled_from(DTYPES),
            "output_dtype": st.sampled_from([None, *OUTPUT_DTYPES]),  # None: the input's
            "residual": st.booleans(),
            "log_scale": st.floats(-6, 3.5),
            "size": st.sampled_from(list(sizes)),
            "seed": st.integers(0, 2**31),
        }
    )


def copy_state(state: MomentumState) -> MomentumState:
    """An independent copy of ``state`` (position, velocity and bit store)."""
    store = type(state.store).from_tensors(state.store.tensors(), state.store.layout())
    store.head_bound = state.store.head_bound
    return MomentumState(state.position.clone(), state.velocity.clone(), store)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for 0.0 and fails on NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def assert_same_state(a: MomentumState, b: MomentumState, where: str) -> None:
    """Equal positions, velocities and store heads, and as many stored chunks."""
    # The kernels round with 1.5 * 2**52, which never gives -0.0 where torch's
    # round_() may: compare values there, bits everywhere else.
    assert torch.equal(a.position, b.position), f"position differs {where}"
    assert torch.equal(a.velocity, b.velocity), f"velocity differs {where}"
    assert torch.equal(a.store.head, b.store.head), f"store differs {where}"
    assert len(a.store.chunks) == len(b.store.chunks)


def check_phases_match(
    numerator: int,
    denominator: int,
    dtype: torch.dtype,
    output_dtype: torch.dtype | None,
    residual: bool,
    log_scale: float,
    size: int,
    seed: int,
    device: str,
) -> None:
    """Four forward steps and their undoing, kernels on and off, compared bit for bit.

    ``output_dtype`` is that of the functions' outputs (``None``: ``dtype``).
    """
    numerator = min(numerator, denominator - 1)
    scale = 10.0**log_scale
    gen = torch.Generator().manual_seed(seed)
    fixed = FixedPoint(dtype)
    core = ExactMomentum(Gamma(numerator, denominator), fixed)
    y_dtype = output_dtype or dtype

    def uniform() -> torch.Tensor:  # both signs
        drawn = (torch.rand(size, generator=gen, dtype=torch.float64) * 2 - 1) * scale
        return drawn.to(device)

    start = core.start(fixed.to_fixed(uniform(), "x"), fixed.to_fixed(uniform(), "v"))
    fast, slow = copy_state(start), copy_state(start)
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
        assert same_bits(out_fast, out_slow), f"inputs of layer {t + 1} differ"
        assert_same_state(fast, slow, f"after step {t}")
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
    gen_grad = torch.randn(size, generator=gen, dtype=torch.float64).to(device)
    for t in reversed(range(steps)):
        with triton_kernels(True):
            x_fast, g_fast = core.retreat_position(fast, gen_grad)
            core.retreat_velocity(fast, outputs[t], residual)
        with triton_kernels(False):
            x_slow, g_slow = core.retreat_position(slow, gen_grad)
            core.retreat_velocity(slow, outputs[t], residual)
        assert same_bits(x_fast, x_slow) and same_bits(g_fast, g_slow)
        assert_same_state(fast, slow, f"after undoing step {t}")
    assert_same_state(fast, start, "after undoing every step")


def backpropagate_both_ways(
    switch: Callable[[bool], AbstractContextManager[None]],
    grad_x: torch.Tensor,
    grad_v: torch.Tensor,
    found: torch.Tensor | None,
    residual: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient update (``gamma = 9/10``) with the kernels that ``switch`` turns
    on, checked against the tensor operations to the last bit; returns its
    ``(grad_x, grad_v)``."""
    core = ExactMomentum(Gamma(9, 10), FixedPoint(torch.float32))
    results = []
    for enabled in (True, False):
        gx, gv = grad_x.clone(), grad_v.clone()
        with switch(enabled):
            core.backpropagate(gx, gv, found, residual)
        results.append((gx, gv))
    (gx_fast, gv_fast), (gx_slow, gv_slow) = results
    # Neither side may fuse a multiply-add where the other does not (numpy; torch's
    # CPU loops and CUDA kernels may): equal up to the last bit.
    torch.testing.assert_close(gx_fast, gx_slow, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(gv_fast, gv_slow, rtol=1e-15, atol=1e-15)
    return gx_fast, gv_fast


def check_gradient_update_matches(
    residual: bool, found_dtype: torch.dtype | None, device: str
) -> None:
    """The Triton gradient kernel against the tensor operations, to the last bit.

    ``found_dtype`` is that of the function's gradient (``None``: there is none).
    """
    gen = torch.Generator().manual_seed(0)
    grad_x = torch.randn(3000, generator=gen, dtype=torch.float64).to(device)
    grad_v = torch.randn(3000, generator=gen, dtype=torch.float64).to(device)
    found = None
    if found_dtype is not None:
        found = torch.randn(3000, generator=gen).to(device=device, dtype=found_dtype)
    backpropagate_both_ways(triton_kernels, grad_x, grad_v, found, residual)
