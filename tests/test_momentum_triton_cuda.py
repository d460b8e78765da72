"""The compiled Triton kernels on a GPU give the bits of CUDA's tensor operations.

``momentum_triton_cases.py`` proves the kernels' arithmetic in Triton's
interpreter against the CPU's tensor operations; here the same checks run the
kernels as compiled for the GPU (no FMA contraction) against the tensor path on
CUDA, which is what ``MomentumNet(use_backprop=False)`` falls back to there.
Skipped without CUDA or Triton.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invertnet.momentum import kernels
from invertnet.momentum.gamma import MAX_DENOMINATOR
from tests._triton_property import (
    DTYPES,
    OUTPUT_DTYPES,
    check_gradient_update_matches,
    check_phases_match,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not kernels.triton_available(),
    reason="needs a CUDA GPU and Triton",
)


def test_cuda_tensors_take_the_compiled_kernels() -> None:
    doubles = (torch.zeros(4, dtype=torch.float64, device="cuda"),)
    assert kernels.usable(torch.float32, doubles, (torch.zeros(4, device="cuda"),))


@settings(max_examples=25, deadline=None)
@given(
    numerator=st.integers(1, MAX_DENOMINATOR - 1),
    denominator=st.integers(2, MAX_DENOMINATOR),
    dtype=st.sampled_from(DTYPES),
    output_dtype=st.sampled_from([None, *OUTPUT_DTYPES]),  # None: that of the input
    residual=st.booleans(),
    log_scale=st.floats(-6, 3.5),
    size=st.sampled_from([1, 7, 1100, 70_000]),
    seed=st.integers(0, 2**31),
)
def test_compiled_kernels_match_cuda_tensor_operations_bit_for_bit(
    numerator: int,
    denominator: int,
    dtype: torch.dtype,
    output_dtype: torch.dtype | None,
    residual: bool,
    log_scale: float,
    size: int,
    seed: int,
) -> None:
    check_phases_match(
        numerator, denominator, dtype, output_dtype, residual, log_scale, size, seed, "cuda"
    )


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("found_dtype", [None, torch.float32, torch.bfloat16])
def test_compiled_gradient_kernel_matches_cuda_tensor_operations(
    residual: bool, found_dtype: torch.dtype | None
) -> None:
    check_gradient_update_matches(residual, found_dtype, "cuda")
