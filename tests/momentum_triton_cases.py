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
from typing import Any

import pytest
import torch
from hypothesis import given, settings

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run by tests/test_momentum_triton.py, in a process with TRITON_INTERPRET=1",
        allow_module_level=True,
    )
pytest.importorskip("triton")

from invertnet.momentum import backends  # noqa: E402
from invertnet.momentum.backends import Backend  # noqa: E402
from invertnet.momentum.exact import ExactMomentum  # noqa: E402
from invertnet.momentum.fixed_point import FixedPoint, RangeCheck  # noqa: E402
from invertnet.momentum.gamma import Gamma  # noqa: E402
from tests._momentum_kernel_checks import (  # noqa: E402
    check_gradient_update_matches,
    check_phases_match,
    check_trains_the_same,
    phase_cases,
)


@pytest.fixture(scope="module")
def interpreted() -> Iterator[Backend]:
    """The Triton backend, its kernels interpreted, serving CPU tensors."""
    from invertnet.momentum.backends import _triton_kernels

    assert type(_triton_kernels._advance_kernel).__name__ == "InterpretedFunction"
    backend = backends.get("triton")
    assert backend.kernels is _triton_kernels  # type: ignore[attr-defined]
    saved = backend.devices  # type: ignore[attr-defined]
    backend.devices = ("cuda", "cpu")  # type: ignore[attr-defined]
    try:
        yield backend
    finally:
        backend.devices = saved  # type: ignore[attr-defined]


@settings(max_examples=20, deadline=None)
@given(case=phase_cases(sizes=[1, 7, 1100]))
def test_kernels_match_the_tensor_operations_bit_for_bit(
    interpreted: Backend, case: dict[str, Any]
) -> None:
    check_phases_match(interpreted, **case, device="cpu")


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("found_dtype", [None, torch.float32, torch.bfloat16])
def test_gradient_kernel_matches_the_tensor_operations(
    interpreted: Backend, residual: bool, found_dtype: torch.dtype | None
) -> None:
    check_gradient_update_matches(interpreted, residual, found_dtype, "cpu")


def test_the_step_kernel_records_nan_and_the_overflow_error_names_it(
    interpreted: Backend,
) -> None:
    fixed = FixedPoint(torch.float32)
    core = ExactMomentum(Gamma(9, 10), fixed, interpreted)
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


@pytest.mark.parametrize("is_residual", [True, False])
def test_momentum_net_trains_the_same_with_the_kernels(
    interpreted: Backend, monkeypatch: pytest.MonkeyPatch, is_residual: bool
) -> None:
    check_trains_the_same(monkeypatch, interpreted, torch.float32, is_residual, depth=5)
