"""The compiled Triton kernels on a GPU give the bits of CUDA's tensor operations.

``momentum_triton_cases.py`` proves the kernels' arithmetic in Triton's
interpreter against the CPU's tensor operations; here the same checks run the
kernels as compiled for the GPU (no FMA contraction) against the tensor path on
CUDA, which is what ``MomentumNet(use_backprop=False)`` falls back to there.
Skipped without CUDA or Triton.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings

from invertnet.momentum import backends
from tests._momentum_kernel_checks import (
    check_gradient_update_matches,
    check_phases_match,
    phase_cases,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not backends.triton_available(),
    reason="needs a CUDA GPU and Triton",
)


def test_cuda_tensors_take_the_compiled_kernels() -> None:
    doubles = (torch.zeros(4, dtype=torch.float64, device="cuda"),)
    assert backends.select(torch.float32, doubles) is backends.get("triton")


@settings(max_examples=25, deadline=None)
@given(case=phase_cases(sizes=[1, 7, 1100, 70_000]))
def test_compiled_kernels_match_cuda_tensor_operations_bit_for_bit(case: dict[str, Any]) -> None:
    check_phases_match(backends.get("triton"), **case, device="cuda")


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("found_dtype", [None, torch.float32, torch.bfloat16])
def test_compiled_gradient_kernel_matches_cuda_tensor_operations(
    residual: bool, found_dtype: torch.dtype | None
) -> None:
    check_gradient_update_matches(backends.get("triton"), residual, found_dtype, "cuda")
