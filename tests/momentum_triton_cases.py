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
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from torch import nn

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "run by tests/test_momentum_triton.py, in a process with TRITON_INTERPRET=1",
        allow_module_level=True,
    )
pytest.importorskip("triton")

from invertnet import MomentumNet  # noqa: E402
from invertnet.momentum import kernels  # noqa: E402
from invertnet.momentum.exact import ExactMomentum, FixedPoint, RangeCheck  # noqa: E402
from invertnet.momentum.gamma import Gamma  # noqa: E402
from invertnet.momentum.kernels import native_kernels, triton_kernels  # noqa: E402
from tests._momentum_kernel_checks import (  # noqa: E402
    check_gradient_update_matches,
    check_phases_match,
    phase_cases,
)


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


@settings(max_examples=20, deadline=None)
@given(case=phase_cases(sizes=[1, 7, 1100]))
def test_kernels_match_the_tensor_operations_bit_for_bit(
    interpreted: ModuleType, case: dict[str, Any]
) -> None:
    check_phases_match(**case, device="cpu")


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("found_dtype", [None, torch.float32, torch.bfloat16])
def test_gradient_kernel_matches_the_tensor_operations(
    interpreted: ModuleType, residual: bool, found_dtype: torch.dtype | None
) -> None:
    check_gradient_update_matches(residual, found_dtype, "cpu")


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
