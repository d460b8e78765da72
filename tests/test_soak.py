"""The soak test (tools/soak.py): 1000 training steps of a RevNet with flat memory.

The soak run itself takes minutes and is excluded from the default run; run it with
``OMP_NUM_THREADS=1 python -m pytest -m soak``. The check it applies is tested here
in the default run, so that a soak run that should fail does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("invertnet_soak_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(peaks: dict[int, int], tensors: dict[int, int], baseline: int = 1000) -> dict:
    return {
        "steps": max(peaks),
        "check_step": min(peaks),
        "baseline_rss_kib": baseline,
        "record": [
            {"step": s, "peak_rss_kib": peaks[s], "live_tensors": tensors[s]} for s in peaks
        ],
    }


def test_soak_check_accepts_flat_memory() -> None:
    soak = _load_soak()
    assert soak.verdict(_result({10: 1100, 1000: 1104}, {10: 50, 1000: 50}), 0.05) == []


def test_soak_check_measures_growth_above_the_baseline() -> None:
    soak = _load_soak()
    # +10 KiB on 1000 KiB of process is 1%, but 10% of the 100 KiB training uses.
    problems = soak.verdict(_result({10: 1100, 1000: 1110}, {10: 50, 1000: 50}), 0.05)
    assert len(problems) == 1 and "grew by 10.0%" in problems[0]


def test_soak_check_flags_more_live_tensors() -> None:
    soak = _load_soak()
    problems = soak.verdict(_result({10: 1100, 1000: 1100}, {10: 50, 1000: 51}), 0.05)
    assert problems == ["live tensors grew from 50 at step 10 to 51 at step 1000"]


@pytest.mark.soak
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_revnet_memory_stays_flat_for_1000_steps() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "1000", "--check-step", "10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.stdout, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["problems"] == [], result
    assert run.returncode == 0
