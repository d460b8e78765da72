"""tools/bench_flows.py: every method builds and trains; invertnet's two modes agree."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests._core_helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return load_tool("bench_flows")


# normflows' LU 1x1 convolution calls torch.lu, deprecated in current PyTorch.
@pytest.mark.filterwarnings("ignore:torch.lu is deprecated:UserWarning")
def test_every_available_method_trains(bench) -> None:  # type: ignore[no-untyped-def]
    args = bench.parse(["--quick"])
    x = bench.batch(args)[:, :, :8, :8]
    methods = [m for m in bench.METHODS if bench.available(m)]
    assert {"invertnet", "invertnet-keep"} <= set(methods)
    for method in methods:
        model = bench.build(method, 2, (3, 8, 8), 8, seed=0)
        losses = [bench.train_step(model, x) for _ in range(2)]
        assert all(math.isfinite(v) for v in losses), method
        assert all(p.grad is not None for p in model[0].parameters() if p.requires_grad), method


def test_invertnet_modes_compute_the_same_loss_and_gradients(bench) -> None:  # type: ignore[no-untyped-def]
    x = torch.rand(4, 3, 8, 8) - 0.5
    keep = bench.build("invertnet-keep", 3, (3, 8, 8), 8, seed=0)
    saving = bench.build("invertnet", 3, (3, 8, 8), 8, seed=0)
    assert bench.train_step(keep, x) == pytest.approx(bench.train_step(saving, x), rel=1e-6)
    for p, q in zip(keep[0].parameters(), saving[0].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item())


def test_timing_worker_reports_every_method(bench) -> None:  # type: ignore[no-untyped-def]
    args = bench.parse(
        ["--quick", "--depths", "1", "--methods", "invertnet", "invertnet-keep", "--repeats", "2"]
    )
    rows = bench.worker_timing(args)
    assert [r["method"] for r in rows] == ["invertnet", "invertnet-keep"]
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 2 for r in rows)
