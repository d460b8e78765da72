"""Each example script runs in its quick mode and writes its figure."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Scripts that are not figure makers: the quickstart (tested below) and the DDP
# example, which torchrun launches (tests/test_ddp.py covers the same training);
# the flow example makes a figure but has its own test below, which checks its result,
# and so does the Llama fine-tuning example, which needs the hf extra.
NOT_FIGURES = {"quickstart.py", "ddp_revnet.py", "flow_two_moons.py", "finetune_tiny_llama.py"}
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name not in NOT_FIGURES)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_example_is_covered() -> None:
    assert {
        "custom_coupling.py",
        "drop_in_replacement.py",
        "plot_memory.py",
        "plot_dynamics_1d.py",
        "separate_nested_rings.py",
    } <= set(EXAMPLES)


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_writes_its_figure(script: str, tmp_path: Path) -> None:
    out = tmp_path / "figure.png"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 5000  # a real plot, not an empty canvas


def test_quickstart_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "input restored to shape (2, 16, 8, 8)" in result.stdout


def test_flow_two_moons_beats_the_best_gaussian(tmp_path: Path) -> None:
    """Even in quick mode the flow's test NLL is 0.4 nats below the best single Gaussian."""
    out = tmp_path / "moons.png"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "flow_two_moons.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert out.stat().st_size > 5000
    found = re.search(r"flow (-?[\d.]+) nats, best single Gaussian (-?[\d.]+) nats", result.stdout)
    assert found is not None, result.stdout
    flow_nll, gaussian_nll = float(found[1]), float(found[2])
    assert gaussian_nll - flow_nll >= 0.4, result.stdout


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_tiny_llama_trains_and_prints_memory(lora: bool, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    if lora:
        pytest.importorskip("peft")
    out = tmp_path / "figure.png"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune_tiny_llama.py"), "--quick"]
        + ["--out", str(out)]
        + (["--lora"] if lora else []),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    fell = re.search(r"loss fell from ([\d.]+) to ([\d.]+)", result.stdout)
    assert fell is not None, result.stdout
    assert float(fell[2]) < float(fell[1])
    suffix = " + LoRA" if lora else ""
    saved = {}
    for method in ("original", "original, checkpointed", "momentum, use_backprop=False"):
        found = re.search(
            rf"saved for backward, {method}{re.escape(suffix)} *: *([\d.]+) MiB", result.stdout
        )
        assert found is not None, result.stdout
        saved[method] = float(found[1])
    assert saved["momentum, use_backprop=False"] < saved["original"]
    trained = re.search(r"training ([\d,]+) of ([\d,]+) parameters", result.stdout)
    assert trained is not None, result.stdout
    counts = [int(x.replace(",", "")) for x in trained.groups()]
    # With LoRA only the adapters train (a few percent); without, every parameter.
    assert (counts[0] < counts[1] / 10) if lora else (counts[0] == counts[1])
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
