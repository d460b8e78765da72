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

from invertnet.momentum import kernels

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
    assert kernels._TRITON_DEVICES == ("cuda",)
    assert kernels.usable(torch.float32, doubles, (torch.zeros(4),)) is kernels.NATIVE
    # Half precision has no C loop; on the CPU it takes the tensor operations.
    assert not kernels.usable(torch.bfloat16, doubles, (torch.zeros(4, dtype=torch.bfloat16),))
    # Where Triton does not load, CUDA tensors take the tensor operations.
    monkeypatch.setattr(kernels, "_triton", False)
    monkeypatch.setattr(kernels, "_TRITON_DEVICES", ("cuda", "cpu"))
    assert not kernels.triton_available()
    assert not kernels.usable(torch.float32, doubles, (torch.zeros(4),))
