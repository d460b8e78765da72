"""tools/flow_drift.py: the drift measurement behind the figures in the flows guide."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests._core_helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def drift() -> ModuleType:
    return load_tool("flow_drift")


def test_data_is_deterministic_and_falls_back_without_scikit_learn(
    drift: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, source = drift.load_data(50, seed=3)
    assert source == ("digits" if importlib.util.find_spec("sklearn") else "synthetic")
    assert x.shape == (50, 64) and x.dtype == torch.float64
    assert torch.equal(x, drift.load_data(50, seed=3)[0])
    assert not torch.equal(x, drift.load_data(50, seed=4)[0])
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    synthetic, source = drift.load_data(50, seed=3)
    assert source == "synthetic" and synthetic.shape == (50, 64)
    assert torch.equal(synthetic, drift.load_data(50, seed=3, synthetic=True)[0])
    assert synthetic.std(0).min() > 0  # no constant feature: ActNorm can initialise


def test_measure_separates_dtypes_and_keep_every_restarts_reconstruction(
    drift: ModuleType,
) -> None:
    data, _ = drift.load_data(32, seed=0, synthetic=True)
    base = drift.realnvp_blocks(4, 16, "relu", seed=0)  # 12 blocks
    drift.train(base, data, 1, seed=0)
    figures = {}
    for dtype in (torch.float32, torch.float64):
        blocks = [b.to(dtype) for b in base]
        figures[dtype] = drift.measure(blocks, data.to(dtype), [None, 3])
    f32, f64 = figures[torch.float32], figures[torch.float64]
    assert 0 < f64["None"]["grad"] < 1e-12 and 0 < f64["None"]["recon"] < 1e-13
    assert 1e-9 < f32["None"]["grad"] < 1e-4 and 1e-9 < f32["None"]["recon"] < 1e-4
    assert f32["None"]["grad_all"] <= f32["None"]["grad"]
    # Groups of up to four blocks: inputs of blocks 1, 5 and 9 rebuilt; with every
    # third block's input kept (0, 3, 6, 9), only that of block 1.
    assert f32["None"]["rebuilt"] == 3 and f32["3"]["rebuilt"] == 1
    assert f32["3"]["recon"] < f32["None"]["recon"]


def test_command_line_prints_a_table_and_writes_json(
    drift: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "drift.json"
    argv = ["--synthetic", "--depths", "2", "--seeds", "0", "1", "--batch", "16"]
    argv += ["--samples", "40", "--hidden", "8", "--keep-every", "3", "--json", str(out)]
    threads = torch.get_num_threads()
    try:
        assert drift.main([*argv, "--activations", "silu"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "data: synthetic, batch 16" in text
    assert "| steps | dtype | activation | keep_every=None: grad / recon |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 2 |")]
    assert [row.split(" | ")[1:3] for row in rows] == [["float32", "silu"], ["float64", "silu"]]
    record = json.loads(out.read_text())
    assert record["data"] == "synthetic" and len(record["rows"]) == 4  # 2 seeds x 2 dtypes
    assert {r["dtype"] for r in record["rows"]} == {"float32", "float64"}
    largest = max(r["results"]["None"]["grad"] for r in record["rows"] if r["dtype"] == "float32")
    assert f"{largest:.1e} / " in rows[0]  # the table shows the worst seed


@pytest.mark.parametrize(
    "argv", [["--depths", "0"], ["--keep-every", "0"], ["--batch", "1"], ["--train-steps", "-1"]]
)
def test_bad_arguments_are_refused(drift: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        drift.parse_args(argv)
