"""The Triton kernels of MomentumNet(use_backprop=False), proven on the CPU in Triton's interpreter.

The cases are in ``momentum_triton_cases.py``; they run in a process of their
own, since Triton reads ``TRITON_INTERPRET`` when it is imported, and this
process may have imported it already.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from invertnet.momentum import backends

pytest.importorskip("triton")


def test_the_triton_kernels_match_the_tensor_operations_in_the_interpreter() -> None:
    import triton

    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < (3, 2):
        # Compiled kernels run such loops on any Triton 3; the interpreter of 3.0
        # passes scalar arguments as arrays, which Python's range refuses.
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter cannot run a loop with a run-time bound"
        )
    cases = Path(__file__).with_name("momentum_triton_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=cases.parent.parent,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.split("\n")[-2]


def test_cpu_tensors_keep_the_c_loops_and_cuda_dispatch_needs_triton(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doubles = (torch.zeros(4, dtype=torch.float64),)
    triton = backends.get("triton")
    assert triton.devices == ("cuda",)  # type: ignore[attr-defined]
    c_loops = backends.get("native") if backends.NATIVE else backends.REFERENCE
    assert backends.select(torch.float32, doubles) is c_loops
    # Half precision has no C loop; on the CPU it takes the tensor operations.
    assert backends.select(torch.bfloat16, doubles) is backends.REFERENCE
    # Where Triton does not load, the tensors it would serve take the next backend.
    monkeypatch.setattr(triton, "_module", False)
    monkeypatch.setattr(triton, "devices", ("cuda", "cpu"))
    assert not backends.triton_available()
    assert backends.select(torch.float32, doubles) is c_loops
