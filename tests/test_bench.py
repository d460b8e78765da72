"""``invertnet bench``: the table, the JSON document, the plot, and bad options.

One tiny run (depths 1 and 2, batch 2, one repeat) is shared by the tests that
read its outputs; timings are never asserted, only structure and the counted
bytes, which are deterministic.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import invertnet
from invertnet.bench import cli as bench_cli
from invertnet.bench import main
from invertnet.bench import measure as bench_measure
from invertnet.bench import memory as bench_memory
from invertnet.bench import report as bench_report
from invertnet.bench import workloads as bench_workloads
from invertnet.bench._worker import measure_config_line
from invertnet.bench.measure import Config, Result, combine_rounds, with_times
from invertnet.bench.report import COLUMNS, SCHEMA, format_table, render_rst
from invertnet.bench.workloads import CORE_METHODS, METHOD_INFO, SIZES, WORKLOADS, build
from tests._core_helpers import load_tool

METHODS = CORE_METHODS  # the tiny run measures these; peers are tested on their own
ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depths", "1", "2", "--batch-size", "2", "--repeats", "1", "--no-progress"]
WORKLOADS_RUN = ["additive-conv", "momentum-mlp"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path, rst_path = out / "b.json", out / "b.png", out / "b.rst"
    capture = out / "stdout.txt"
    argv = [
        "--workloads",
        *WORKLOADS_RUN,
        *TINY,
        "--methods",
        *METHODS,
        "--json",
        str(json_path),
        "--plot",
        str(png_path),
        "--rst",
        str(rst_path),
    ]
    saved = sys.stdout
    with capture.open("w") as stream:
        sys.stdout = stream
        try:
            status = main(argv)
        finally:
            sys.stdout = saved
    return {
        "status": status,
        "stdout": capture.read_text(),
        "document": json.loads(json_path.read_text()),
        "png": png_path,
        "rst": rst_path.read_text(),
    }


def _by_key(document: dict) -> dict[tuple[str, int, str], dict]:
    return {
        (r["config"]["workload"], r["config"]["depth"], r["config"]["method"]): r
        for r in document["results"]
    }


def test_tiny_run_succeeds_and_prints_one_row_per_configuration(tiny_run: dict) -> None:
    assert tiny_run["status"] == 0
    lines = tiny_run["stdout"].splitlines()
    header = lines[0]
    for column in COLUMNS:
        assert column in header
    rows = [line.split() for line in lines[2:] if line.split() and line.split()[0] in WORKLOADS]
    expected = {(w, d, m) for w in WORKLOADS_RUN for d in ("1", "2") for m in METHODS}
    assert {(r[0], r[1], r[2]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        if r[2] == "plain":  # time and memory ratios of plain to itself
            assert r[5] == "1.00x" and r[8] == "1.00x"


def test_json_has_every_figure_machine_and_settings(tiny_run: dict) -> None:
    document = tiny_run["document"]
    assert document["schema"] == SCHEMA
    machine = document["machine"]
    for key in ("cpu", "cpu_count", "python", "torch", "device", "platform"):
        assert machine[key]
    assert machine["torch"] == torch.__version__
    settings = document["settings"]
    assert settings["depths"] == {w: [1, 2] for w in WORKLOADS_RUN}
    assert settings["size"] == "cpu" and settings["autocast"] == ["off"]
    assert settings["workloads"] == WORKLOADS_RUN
    assert document["alerts"] == [] and document["notes"] == []
    assert settings["repeats"] == 1 and settings["batch_size"] == 2
    assert settings["command"].startswith("invertnet bench --workloads")
    assert "VmHWM" in document["memory_method"]
    assert set(document["workloads"]) == set(WORKLOADS_RUN)
    results = _by_key(document)
    assert len(results) == len(WORKLOADS_RUN) * 2 * len(METHODS)
    for key, row in results.items():
        assert row["error"] is None, key
        assert len(row["step_times_s"]) == 1 and row["median_s"] > 0
        assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] >= 0
        assert row["batch_size"] == 2 and row["parameters"] > 0
        plain = results[(key[0], key[1], "plain")]
        assert row["time_ratio"] == pytest.approx(row["median_s"] / plain["median_s"])
        if plain["peak_bytes"]:
            assert row["memory_ratio"] == pytest.approx(row["peak_bytes"] / plain["peak_bytes"])


def test_saved_bytes_cross_check_shows_who_keeps_activations(tiny_run: dict) -> None:
    results = _by_key(tiny_run["document"])
    for workload in WORKLOADS_RUN:
        saved = {(d, m): results[(workload, d, m)]["saved_bytes"] for d in (1, 2) for m in METHODS}
        # Plain autograd saves every block's activations, checkpoint every block's
        # input: both more with depth.
        assert saved[(2, "plain")] > saved[(1, "plain")]
        assert saved[(2, "checkpoint")] > saved[(1, "checkpoint")]
        # invertnet saves no per-block tensors: depth changes nothing.
        assert saved[(2, "invertnet")] == saved[(1, "invertnet")]


def test_plot_is_a_png(tiny_run: dict) -> None:
    data = tiny_run["png"].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000  # axes, lines and labels, not an empty canvas


def test_rst_table_lists_every_configuration(tiny_run: dict) -> None:
    rst = tiny_run["rst"]
    assert "Measured with ``invertnet bench --workloads" in rst
    body = [line for line in rst.splitlines() if line.startswith("| ") and "workload" not in line]
    assert len(body) == len(WORKLOADS_RUN) * 2 * len(METHODS)


def _run_bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_workload_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_bad(["--workloads", "resnet-9000"], capsys)
    assert "unknown workload 'resnet-9000'" in err
    assert "additive-conv" in err  # lists what is known


@pytest.mark.parametrize("depth", ["0", "-3", "eight"])
def test_bad_depth_is_a_clear_error(depth: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_bad(["--depths", "8", depth], capsys)
    assert f"depth must be a positive integer, got {depth!r}" in err


def test_unavailable_cuda_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _run_bad(["--device", "cuda"], capsys)
    assert "CUDA is not available" in err and "--device cpu" in err


def test_unsupported_device_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_bad(["--device", "toaster"], capsys)
    assert "'toaster' is not a device" in err


def test_workloads_needing_momentumnet_are_reported_when_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delattr(invertnet, "MomentumNet")
    parser = bench_cli.build_parser()
    names, skipped = bench_cli._choose_workloads(parser, None)
    assert names == ["additive-conv", "affine-conv", "revvit"]
    assert set(skipped) == {"momentum-mlp", "transformer", "llama"}
    assert all("invertnet.MomentumNet" in reason for reason in skipped.values())
    err = _run_bad(["--workloads", "momentum-mlp"], capsys)
    assert "needs invertnet.MomentumNet" in err


def test_failed_configuration_is_reported_not_raised() -> None:
    line = json.dumps({"workload": "additive-conv", "depth": 2, "method": "magic"})
    result = measure_config_line(line)
    assert "unknown method 'magic' for workload 'additive-conv'" in result["error"]
    assert result["step_times_s"] == []


def test_failed_row_shows_in_the_table() -> None:
    document = {
        "results": [
            {
                "config": {"workload": "additive-conv", "depth": 8, "method": "plain"},
                "error": "the measuring process killed by signal 9 (out of memory?)",
            }
        ]
    }
    table = format_table(document)
    row = table.splitlines()[2]
    assert row.split()[:4] == ["additive-conv", "8", "plain", "failed"]
    assert "notes" in table.splitlines()[0]
    # The message goes below the table, so it does not widen the columns.
    assert "failed: additive-conv depth 8 plain: the measuring process killed by signal 9" in table
    assert len(row) < 120


_SAME_FUNCTION = [
    (workload, method, reference)
    for workload, spec in WORKLOADS.items()
    for method, reference in [("plain", "plain"), *spec.same_function.items()]
]


@pytest.fixture
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("workload", "method", "reference"), _SAME_FUNCTION)
def test_methods_compute_the_same_function(
    workload: str, method: str, reference: str, one_thread: None
) -> None:
    # Ratios are only meaningful if the methods compared train the same network.
    missing = WORKLOADS[workload].missing() + [
        m for m in (method, reference) if bench_workloads.method_available(m)
    ]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    ref_model, ref_batch = build(workload, 3, reference, batch_size=2, dtype=torch.float64)
    model, batch = build(workload, 3, method, batch_size=2, dtype=torch.float64)
    expected = ref_model(*ref_batch.args, **ref_batch.kwargs)
    got = model(*batch.args, **batch.kwargs)
    # Tolerances: one thread makes the float64 reductions' order fixed within this
    # process (a run that once failed at 8.8e-9 against 1e-9 ran the full suite on
    # a loaded machine, where MKL and OpenMP may pick another thread count, and so
    # another summation order, from one call to the next). Beyond rounding,
    # MomentumNet(use_backprop=False) holds its state in fixed point with units of
    # 2**-32 (invertnet.momentum.exact.SCALE_BITS): about 2.3e-10 per layer, 1e-9
    # over these three layers of outputs of size 1 to 7. 1e-7 covers both with
    # margin and is still six orders of magnitude below what a different function
    # (other weights, a dropped or reordered block) gives. momentumnet 0.10
    # computes in float32 whatever the dtype: its rows agree to float32 rounding.
    tol = 1e-4 if "momentumnet" in (method, reference) else 1e-7
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_python_dash_m_and_console_dispatch_show_the_method() -> None:
    from invertnet.cli import main as invertnet_main

    proc = subprocess.run(
        [sys.executable, "-m", "invertnet.bench", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: invertnet bench" in proc.stdout
    assert "VmHWM" in proc.stdout and "max_memory_allocated" in proc.stdout
    assert invertnet_main(["bench", "--help"]) == 0


def _load_tool(name: str = "update_readme_bench") -> Any:
    return load_tool(name)


def test_readme_tool_replaces_only_the_marked_block(tmp_path: Path, tiny_run: dict) -> None:
    tool = _load_tool()
    readme = tmp_path / "README.rst"
    readme.write_text(
        "Intro\n\n.. bench-results-start\n\nold table\n\n.. bench-results-end\n\nAfter\n"
    )
    data = tmp_path / "b.json"
    data.write_text(json.dumps(tiny_run["document"]))
    assert tool.main([str(data), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("Intro\n") and text.endswith("After\n")
    assert render_rst(tiny_run["document"]).strip() in text


def test_readme_tool_refuses_a_readme_without_markers(tmp_path: Path) -> None:
    tool = _load_tool()
    with pytest.raises(ValueError, match="bench-results-start"):
        tool.replace_block("no markers here", "table")


class _RecordingRunner:
    """Stands in for Runner: records the order of configurations, makes up results."""

    calls: list[Config] = []

    def __init__(self, timeout_s: float) -> None:
        self.round_of: dict[Config, int] = {}

    def __enter__(self) -> _RecordingRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run(self, config: Config) -> Result:
        type(self).calls.append(config)
        seen = self.round_of[config] = self.round_of.get(config, 0) + 1
        # Round k: every step takes k ms and the peak is k MB (round 2 is "slow" on memory).
        peak = {1: 10, 2: 30, 3: 20}[seen] * 2**20
        return Result(
            config=config,
            step_times_s=[seen * 1e-3] * config.repeats,
            peak_bytes=peak,
            saved_bytes=5,
            batch_size=2,
            parameters=7,
            memory_method="fake",
            warnings=[f"round {seen}"],
        )

    def run_interleaved(self, configs: list[Config]) -> list[Result]:
        type(self).calls.append(tuple(configs))  # type: ignore[arg-type]
        seen = self.round_of[configs[0]] = self.round_of.get(configs[0], 0) + 1
        # Round k: every step takes 10 k ms, no memory figures.
        return [
            Result(config=c, step_times_s=[seen * 1e-2] * c.repeats, warnings=["timed"])
            for c in configs
        ]


def test_rounds_interleave_configurations_and_pool_their_times(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_cli, "Runner", _RecordingRunner)
    _RecordingRunner.calls = []
    out = tmp_path / "b.json"
    argv = ["--workloads", "momentum-mlp", "--depths", "1", "2", "--methods", "plain", "invertnet"]
    options = ["--repeats", "2", "--rounds", "3", "--timing", "separate", "--no-progress"]
    status = main([*argv, *options, "--json", str(out)])
    assert status == 0
    order = [(c.depth, c.method) for c in _RecordingRunner.calls]
    one_round = [(1, "plain"), (1, "invertnet"), (2, "plain"), (2, "invertnet")]
    assert order == one_round * 3  # all configurations, then all again: not 3 in a row
    document = json.loads(out.read_text())
    assert document["settings"]["rounds"] == 3
    for row in document["results"]:
        assert row["step_times_s"] == pytest.approx([1e-3] * 2 + [2e-3] * 2 + [3e-3] * 2)
        assert row["median_s"] == pytest.approx(2e-3)
        assert row["peak_bytes"] == 20 * 2**20  # the median round, not the mean
        assert row["warnings"] == ["round 1", "round 2", "round 3"]
    assert "6 steps (3 rounds)" in render_rst(document)


def test_interleaved_timing_takes_memory_and_time_from_separate_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_cli, "Runner", _RecordingRunner)
    _RecordingRunner.calls = []
    out = tmp_path / "b.json"
    argv = ["--workloads", "momentum-mlp", "--depths", "1", "2", "--methods", "plain", "invertnet"]
    assert (
        main([*argv, "--repeats", "2", "--rounds", "3", "--no-progress", "--json", str(out)]) == 0
    )
    jobs = []
    for call in _RecordingRunner.calls:
        if isinstance(call, tuple):  # a group timed together
            jobs.append(("time", call[0].depth, tuple(c.method for c in call)))
        else:  # a memory run: nothing timed in it
            assert call.repeats == 0 and call.warmup == 0
            jobs.append(("memory", call.depth, call.method))
    one_round = [
        ("memory", 1, "plain"),
        ("memory", 1, "invertnet"),
        ("time", 1, ("plain", "invertnet")),
        ("memory", 2, "plain"),
        ("memory", 2, "invertnet"),
        ("time", 2, ("plain", "invertnet")),
    ]
    assert jobs == one_round * 3
    document = json.loads(out.read_text())
    assert document["settings"]["timing"] == "interleaved"
    for row in document["results"]:
        assert row["config"]["repeats"] == 2  # reported as asked, not as the memory run
        assert row["step_times_s"] == pytest.approx([1e-2] * 2 + [2e-2] * 2 + [3e-2] * 2)
        assert row["peak_bytes"] == 20 * 2**20
        assert row["warnings"] == ["round 1", "round 2", "round 3", "timed"]
    assert "6 steps (3 rounds, methods alternating)" in render_rst(document)


def _record_stepped_models(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """The models the benchmark's training steps run, in order, as they run."""
    stepped: list[torch.nn.Module] = []
    real_step = bench_measure.train_step

    def recording_step(model: torch.nn.Module, batch: Any, **kwargs: Any) -> None:
        stepped.append(model)
        real_step(model, batch, **kwargs)

    monkeypatch.setattr(bench_measure, "train_step", recording_step)
    return stepped


def test_time_interleaved_rotates_the_methods_and_survives_a_failing_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stepped = _record_stepped_models(monkeypatch)
    base = Config("additive-conv", 1, "plain", batch_size=2, repeats=4, warmup=1)
    configs = [base, replace(base, method="magic"), replace(base, method="invertnet")]
    plain, magic, light = bench_measure.time_interleaved(configs)
    assert magic.error is not None and "unknown method 'magic'" in magic.error
    assert not magic.step_times_s
    for result in (plain, light):
        assert result.error is None and len(result.step_times_s) == 4
        assert result.batch_size == 2 and result.parameters
    # Two untimed steps each (gradients, warm-up), then rounds in balanced orders:
    # for two methods, alternating.
    order = ["plain" if model.layers[0].disable else "invertnet" for model in stepped]
    timed = order[4:]
    assert timed == ["plain", "invertnet", "invertnet", "plain"] * 2


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_put_each_method_right_after_each_other_equally_often(n: int) -> None:
    orders = bench_measure._balanced_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows = Counter((order[k], order[k + 1]) for order in orders for k in range(n - 1))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1  # every pair equally often


def test_time_interleaved_gives_no_method_always_the_same_predecessor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With plain, checkpoint and invertnet rotated in one order, invertnet always ran
    # right after checkpoint.
    stepped = _record_stepped_models(monkeypatch)
    base = Config("additive-conv", 1, "plain", batch_size=2, repeats=6, warmup=0)
    methods = ("plain", "checkpoint", "invertnet")
    bench_measure.time_interleaved([replace(base, method=m) for m in methods])
    timed = [id(model) for model in stepped[len(methods) :]]
    rounds = [timed[k : k + 3] for k in range(0, len(timed), 3)]
    predecessors: dict[int, set[int]] = {}
    for one in rounds:
        for before, after in zip(one, one[1:]):
            predecessors.setdefault(after, set()).add(before)
    assert len(rounds) == 6 and all(len(set(one)) == 3 for one in rounds)
    assert all(len(found) == 2 for found in predecessors.values())


def test_time_interleaved_rejects_configurations_that_differ_beyond_the_method() -> None:
    base = Config("momentum-mlp", 1, "plain")
    with pytest.raises(ValueError, match="differ only in their method"):
        bench_measure.time_interleaved([base, replace(base, depth=2, method="invertnet")])
    with pytest.raises(ValueError, match="differ only in their method"):
        bench_measure.time_interleaved([base, base])
    with pytest.raises(ValueError, match="at least one configuration"):
        bench_measure.time_interleaved([])


def test_a_failed_memory_or_timing_run_fails_the_configuration() -> None:
    config = Config("momentum-mlp", 1, "plain")
    memory = Result(config=replace(config, repeats=0), peak_bytes=5, warnings=["a"])
    timing = Result(config=config, step_times_s=[1.0, 2.0], warnings=["b"])
    merged = with_times(memory, timing)
    assert merged.config == config and merged.step_times_s == [1.0, 2.0]
    assert merged.peak_bytes == 5 and merged.warnings == ["a", "b"]
    failed = with_times(memory, replace(timing, error="timed out after 9 s"))
    assert failed.error == "timed out after 9 s" and failed.step_times_s == []
    assert with_times(replace(memory, error="killed"), timing).error == "killed"


def test_a_failed_round_fails_the_configuration() -> None:
    config = Config("momentum-mlp", 1, "plain")
    good = Result(config=config, step_times_s=[1.0], peak_bytes=1)
    bad = Result(config=config, error="the benchmark worker exited with status 1")
    combined = combine_rounds([good, bad, good])
    assert combined.error == bad.error and combined.median_s is None


def test_combine_rounds_rejects_mixed_or_missing_results() -> None:
    with pytest.raises(ValueError, match="at least one result"):
        combine_rounds([])
    a, b = Config("momentum-mlp", 1, "plain"), Config("momentum-mlp", 2, "plain")
    with pytest.raises(ValueError, match="momentum-mlp/1/plain, momentum-mlp/2/plain"):
        combine_rounds([Result(config=a), Result(config=b)])


@pytest.mark.parametrize("rounds", ["0", "two"])
def test_bad_rounds_is_a_clear_error(rounds: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_bad(["--rounds", rounds], capsys)
    assert f"rounds must be a positive integer, got {rounds!r}" in err


def test_paired_timing_tool_alternates_methods_and_reports_ratios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tool = _load_tool("paired_timing")
    order: list[int] = []
    real_step = tool.train_step

    def recording_step(model: torch.nn.Module, batch: Any) -> None:
        order.append(id(model))
        real_step(model, batch)

    monkeypatch.setattr(tool, "train_step", recording_step)
    out = tmp_path / "paired.json"
    argv = ["--workloads", "momentum-mlp", "--depths", "1", "--batch-size", "2"]
    assert tool.main([*argv, "--pairs", "3", "--json", str(out)]) == 0
    timed = order[4:]  # after two warm-up steps per model
    first, second = timed[0], timed[1]
    assert first != second and timed == [first, second, second, first, first, second]
    document = json.loads(out.read_text())
    (row,) = document["rows"]
    assert len(row["ratios"]) == 3 and all(r > 0 for r in row["ratios"])
    assert row["q1"] <= row["median"] <= row["q3"]
    assert document["methods"] == ["checkpoint", "invertnet"]
    assert "momentum-mlp depth 1: invertnet / checkpoint = " in capsys.readouterr().out


def test_paired_timing_tool_rejects_zero_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    tool = _load_tool("paired_timing")
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--pairs", "0"])
    assert exit_.value.code == 2
    assert "--pairs and --depths must be positive integers" in capsys.readouterr().err


def test_ab_timing_tool_times_an_earlier_commit_beside_the_tree(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tool = _load_tool("ab_timing")
    argv = ["--before", "HEAD", "--size", "cpu", "--depths", "1", "--pairs", "2"]
    assert tool.main(argv) == 0
    assert "additive-conv cpu depth 1: after / before = " in capsys.readouterr().out
    # The earlier commit's package imported beside this one, under its own name.
    before = sys.modules["invertnet_before.wrappers.invertible"]
    assert before.InvertibleModuleWrapper is not invertnet.InvertibleModuleWrapper


def test_ab_timing_tool_refuses_an_unknown_commit(capsys: pytest.CaptureFixture[str]) -> None:
    tool = _load_tool("ab_timing")
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--before", "no-such-commit"])
    assert exit_.value.code == 2
    assert "cannot export 'no-such-commit'" in capsys.readouterr().err


def test_block_overhead_tool_runs_the_same_couplings_under_each_method(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tool = _load_tool("block_overhead")
    stacks = tool.build_stacks(depth=3, width=2, batch_norm=True)
    assert {"invertnet", "invertnet keep_input"} <= set(stacks)
    couplings = [w.module for w in stacks["invertnet"].layers]
    assert [w.module for w in stacks["invertnet keep_input"].layers] == couplings
    x = torch.randn(4, 4)
    expected = stacks["invertnet keep_input"](x)
    torch.testing.assert_close(stacks["invertnet"](x), expected, rtol=0, atol=0)
    if "revlib" in stacks:
        torch.testing.assert_close(stacks["revlib"](x), expected)
    assert tool.main(["--depth", "2", "--rounds", "1", "--number", "1"]) == 0
    printed = capsys.readouterr().out
    assert "invertnet keep_input" in printed and "us per block" in printed
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--batch-size", "1"])
    assert exit_.value.code == 2
    assert "--batch-size >= 2" in capsys.readouterr().err


# -- kept inputs and memory growth: flagged, never shown as flat ----------------
class _HoldInputs(torch.nn.Module):
    """Keeps a view of every input it sees: the wrapper after it cannot free them."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[torch.Tensor] = []

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Views share the storage: freeing the inputs would corrupt them.
        self.held.extend(x.unsqueeze(0) for x in xs)
        return xs

    def inverse(self, *ys: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ys


def _holding_additive_conv(
    depth: int, method: str, batch_size: int, dtype: torch.dtype, device: torch.device, sizes: Any
) -> tuple[torch.nn.Module, Any]:
    model, batch = bench_workloads._additive_conv(depth, method, batch_size, dtype, device, sizes)
    if method == "invertnet":  # every block's input is also held elsewhere
        # Called directly (disable=True), with the two streams the block gets.
        blocks = [
            m
            for block in model.layers
            for m in (invertnet.InvertibleModuleWrapper(_HoldInputs(), disable=True), block)
        ]
        model = invertnet.ReversibleSequential(*blocks)
    return model, batch


class _NoProbe(bench_memory.MemoryProbe):
    """Measures nothing: in-process tests must not retune this process's malloc."""

    method = "none"

    def start(self) -> None:
        pass

    def peak_bytes(self) -> int:
        return 0


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """measure_here in the test process, without the CPU probe's mallopt and clear_refs."""
    monkeypatch.setattr(bench_measure, "probe_for", lambda device: _NoProbe())


@pytest.fixture
def holding_workload(monkeypatch: pytest.MonkeyPatch, in_process: None) -> str:
    spec = replace(WORKLOADS["additive-conv"], name="holding", builder=_holding_additive_conv)
    monkeypatch.setitem(WORKLOADS, "holding", spec)
    return "holding"


def test_worker_counts_inputs_kept_from_the_first_step(holding_workload: str) -> None:
    config = Config(holding_workload, 3, "invertnet", batch_size=2, repeats=0, warmup=0)
    result = bench_measure.measure_here(config)
    assert result.error is None
    # One warning per wrapper, each at its first training step (the untimed first one).
    assert result.kept_inputs == 3
    assert any(w.startswith("InputKeptWarning: ") for w in result.warnings)
    clean = bench_measure.measure_here(replace(config, workload="additive-conv"))
    assert clean.kept_inputs == 0


def test_interleaved_timing_attributes_kept_inputs_to_their_method(holding_workload: str) -> None:
    base = Config(holding_workload, 2, "plain", batch_size=2, repeats=1, warmup=0)
    plain, light = bench_measure.time_interleaved([base, replace(base, method="invertnet")])
    assert plain.kept_inputs == 0 and light.kept_inputs == 2
    assert not any("InputKeptWarning" in w for w in plain.warnings)


def _result(workload: str, depth: int, method: str, mb: float, kept: int = 0) -> Result:
    config = Config(workload, depth, method)
    return Result(config=config, step_times_s=[0.01], peak_bytes=int(mb * 2**20), kept_inputs=kept)


def _document(results: list[Result], device: str = "cpu") -> dict:
    machine = {"device": device, "device_name": "test", "cpu_count": 2, "python": "3", "torch": "2"}
    settings = {"command": "invertnet bench", "repeats": 1, "dtype": "float32"}
    return bench_report.to_document(results, settings, machine)


def test_kept_inputs_are_flagged_in_summary_json_table_and_rst() -> None:
    # Memory that looks flat, but inputs were kept: the report must say so.
    results = [
        _result("additive-conv", 8, "plain", 10),
        _result("additive-conv", 8, "invertnet", 2),
        _result("additive-conv", 128, "plain", 160),
        _result("additive-conv", 128, "invertnet", 2, kept=128),
    ]
    document = _document(results)
    (alert,) = document["alerts"]
    assert alert["kind"] == "kept-inputs" and alert["method"] == "invertnet"
    assert alert["depths"] == [128] and alert["kept_inputs"] == 128
    summary = bench_report.format_summary(document)
    assert "WARNING: additive-conv invertnet: inputs were KEPT" in summary
    rows = {(r["config"]["depth"], r["config"]["method"]): r for r in document["results"]}
    assert rows[(128, "invertnet")]["notes"] == ["KEPT INPUTS (128)"]
    assert rows[(8, "invertnet")]["notes"] == [] and rows[(128, "plain")]["notes"] == []
    table = bench_report.format_table(document)
    assert "KEPT INPUTS (128)" in table
    rst = render_rst(document)
    assert "| note" in rst and "KEPT INPUTS (128)" in rst and "* WARNING:" in rst
    assert json.loads(json.dumps(document))["alerts"] == document["alerts"]


def test_memory_growing_with_depth_is_flagged_only_for_memory_saving_methods() -> None:
    results = [
        _result("additive-conv", 8, "plain", 10),
        _result("additive-conv", 8, "checkpoint", 5),
        _result("additive-conv", 8, "invertnet", 2),
        _result("additive-conv", 8, "revlib", 2),
        _result("additive-conv", 128, "plain", 160),
        _result("additive-conv", 128, "checkpoint", 40),  # grows: expected of checkpoint
        _result("additive-conv", 128, "invertnet", 40),  # grows like checkpoint: flagged
        _result("additive-conv", 128, "revlib", 5),  # +3 MB: within the CPU noise slack
    ]
    document = _document(results)
    (alert,) = document["alerts"]
    assert (alert["kind"], alert["method"], alert["depths"]) == (
        "memory-grows",
        "invertnet",
        [8, 128],
    )
    assert alert["growth"] == pytest.approx(20.0)
    assert "activation memory GROWS with depth" in bench_report.format_summary(document)
    notes = {(r["config"]["depth"], r["config"]["method"]): r["notes"] for r in document["results"]}
    assert notes[(128, "invertnet")] == ["MEMORY GROWS 20.00x"]
    # Without plain rows the slack is the noise floor alone; on CUDA the allocator
    # counts exactly, and the same 3 MB is growth there.
    no_plain = [r for r in results if r.config.method != "plain"]
    assert [a["method"] for a in _document(no_plain)["alerts"]] == ["invertnet"]
    cuda = _document(no_plain, device="cuda:0")
    assert [a["method"] for a in cuda["alerts"]] == ["invertnet", "revlib"]


def test_growth_slack_follows_plain_autograds_growth() -> None:
    # Plain adds 1000 MB from depth 8 to 128: 30 MB more for invertnet is 3% of that,
    # the allocator's noise at this scale, not a per-block activation kept.
    results = [
        _result("transformer", 8, "plain", 100),
        _result("transformer", 8, "invertnet", 20),
        _result("transformer", 128, "plain", 1100),
        _result("transformer", 128, "invertnet", 50),
    ]
    assert _document(results, device="cuda:0")["alerts"] == []
    results[-1] = _result("transformer", 128, "invertnet", 200)  # 18% of plain's growth
    assert [a["kind"] for a in _document(results, device="cuda:0")["alerts"]] == ["memory-grows"]


def test_a_clean_run_renders_no_note_column() -> None:
    results = [_result("additive-conv", d, m, 2) for d in (8, 128) for m in ("plain", "invertnet")]
    document = _document(results)
    assert document["alerts"] == []
    assert "| note" not in render_rst(document)
    assert "WARNING" not in bench_report.format_summary(document)


# -- sizes, autocast, peers ----------------------------------------------------
def test_sizes_build_the_networks_of_the_issues() -> None:
    large, batch = build("additive-conv", 1, "plain", size="cpu-large")
    assert tuple(batch.args[0].shape) == (16, 64, 32, 32)
    assert WORKLOADS["additive-conv"].default_depths("cpu-large") == (8, 32, 128)
    gpu = {name: spec.sizes["gpu"] for name, spec in WORKLOADS.items()}
    assert (gpu["additive-conv"]["channels"], gpu["additive-conv"]["batch_size"]) == (128, 128)
    assert {k: gpu["transformer"][k] for k in ("d_model", "heads", "ff", "seq", "batch_size")} == {
        "d_model": 512,
        "heads": 8,
        "ff": 2048,
        "seq": 512,
        "batch_size": 32,
    }
    assert gpu["transformer"]["depths"] == (12, 48)
    assert (gpu["momentum-mlp"]["width"], gpu["momentum-mlp"]["batch_size"]) == (1024, 4096)
    for spec in WORKLOADS.values():
        assert set(spec.sizes) == set(SIZES)
        for size in SIZES:
            assert "{" not in spec.describe(size)
    with pytest.raises(ValueError, match="unknown size 'huge'; known: cpu, cpu-large, gpu"):
        build("additive-conv", 1, "plain", size="huge")


def test_a_method_the_workload_lacks_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown method 'revlib' for workload 'momentum-mlp'"):
        build("momentum-mlp", 1, "revlib")


def test_gpu_size_defaults_to_fp32_and_bf16_autocast(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_cli, "Runner", _RecordingRunner)
    _RecordingRunner.calls = []
    out = tmp_path / "b.json"
    argv = ["--size", "gpu", "--workloads", "transformer", "--methods", "plain", "original"]
    assert main([*argv, "--timing", "separate", "--no-progress", "--json", str(out)]) == 0
    configs = _RecordingRunner.calls
    assert {(c.size, c.autocast, c.depth) for c in configs} == {
        ("gpu", a, d) for a in (None, "bf16") for d in (12, 48)
    }
    document = json.loads(out.read_text())
    assert document["settings"]["autocast"] == ["off", "bf16"]
    labels = {
        r["config"]["workload"] + "/" + str(r["config"]["autocast"]) for r in document["results"]
    }
    assert labels == {"transformer/None", "transformer/bf16"}
    table = format_table(document)
    assert "transformer+bf16" in table
    # Ratios compare within one autocast mode: plain is 1.00x in both.
    for row in document["results"]:
        if row["config"]["method"] == "plain":
            assert row["time_ratio"] == pytest.approx(1.0)
    assert "d_model 512" in document["workloads"]["transformer"]


def test_bad_size_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_bad(["--size", "huge"], capsys)
    assert "invalid choice: 'huge'" in err and "cpu-large" in err


def test_train_step_under_bf16_autocast_on_cpu() -> None:
    model, batch = build("transformer", 1, "original", batch_size=2)
    seen: list[torch.dtype] = []
    model.layers[0].linear1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    bench_measure.train_step(model, batch, autocast="bf16")
    assert seen == [torch.bfloat16]
    assert model.layers[0].linear1.weight.grad is not None


class _FakeEvent:
    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None

    def record(self) -> None:
        type(self).clock += 12.5  # milliseconds pass on the "device"
        self.at = type(self).clock

    def synchronize(self) -> None:
        assert self.at is not None

    def elapsed_time(self, end: _FakeEvent) -> float:
        assert self.at is not None and end.at is not None
        return end.at - self.at


def test_step_timer_uses_cuda_events_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    ran: list[int] = []
    seconds = bench_measure.StepTimer("cuda:0")(lambda: ran.append(1))
    assert ran == [1] and seconds == pytest.approx(0.0125)
    assert synced == [torch.device("cuda:0")]  # earlier work is not counted
    assert bench_measure.StepTimer("cpu")(lambda: None) < 1.0


def test_missing_peers_are_notes_not_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = bench_workloads.method_available

    def without_revlib(method: str) -> str | None:
        return (
            "revlib is not installed (pip install revlib)" if method == "revlib" else real(method)
        )

    monkeypatch.setattr(bench_cli, "method_available", without_revlib)
    monkeypatch.setattr(bench_cli, "Runner", _RecordingRunner)
    _RecordingRunner.calls = []
    out = tmp_path / "b.json"
    argv = ["--workloads", "additive-conv", "--depths", "1", "--methods", "plain", "revlib"]
    assert main([*argv, "--timing", "separate", "--no-progress", "--json", str(out)]) == 0
    assert [c.method for c in _RecordingRunner.calls] == ["plain"]
    document = json.loads(out.read_text())
    assert document["notes"] == [
        "revlib not measured on additive-conv: revlib is not installed (pip install revlib)"
    ]
    assert "note: revlib not measured on additive-conv" in format_table(document)


class _FailingPeerRunner(_RecordingRunner):
    def run(self, config: Config) -> Result:
        if config.method == "memcnn":
            return Result(config=config, error="AttributeError: memcnn cannot run here")
        return super().run(config)


def test_a_peer_that_cannot_run_is_a_note_and_not_a_failed_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_cli, "method_available", lambda method: None)
    monkeypatch.setattr(bench_cli, "Runner", _FailingPeerRunner)
    out = tmp_path / "b.json"
    argv = ["--workloads", "additive-conv", "--depths", "1", "--methods", "plain", "memcnn"]
    assert main([*argv, "--timing", "separate", "--no-progress", "--json", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["notes"] == [
        "memcnn could not run on additive-conv (see the failure above); "
        "a peer's failure is not the benchmark's"
    ]
    assert "failed: additive-conv depth 1 memcnn: AttributeError" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("workload", "method"),
    [
        (w, m)
        for w, spec in WORKLOADS.items()
        for m in spec.methods
        if METHOD_INFO[m].package is not None
    ],
)
def test_peers_train_in_the_worker(workload: str, method: str, in_process: None) -> None:
    if bench_workloads.method_available(method):
        pytest.skip(bench_workloads.method_available(method) or "")
    config = Config(workload, 2, method, batch_size=2, repeats=1, warmup=0)
    result = bench_measure.measure_here(config)
    assert result.error is None, result.error
    assert len(result.step_times_s) == 1 and result.peak_bytes is not None
    assert result.kept_inputs == 0


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
@pytest.mark.parametrize("method", CORE_METHODS)
def test_llama_workload_trains(method: str) -> None:
    model, batch = build("llama", 2, method, batch_size=2)
    assert batch.args[0].dtype == torch.long
    bench_measure.train_step(model, batch)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    if method == "invertnet":
        assert any(isinstance(m, invertnet.MomentumNet) for m in model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda_gpu_size_fp32_and_bf16(tmp_path: Path) -> None:
    out = tmp_path / "cuda.json"
    argv = ["--device", "cuda", "--size", "gpu", "--quick", "--no-progress", "--json", str(out)]
    argv += ["--workloads", "additive-conv", "momentum-mlp", "transformer"]
    argv += ["--methods", *CORE_METHODS, "original", "original-checkpoint"]  # peers: their own
    assert main(argv) == 0
    document = json.loads(out.read_text())
    assert "max_memory_allocated" in document["memory_method"]
    assert document["settings"]["autocast"] == ["off", "bf16"]
    assert not [a for a in document["alerts"] if a["kind"] == "kept-inputs"]
    for row in document["results"]:
        assert row["error"] is None and row["peak_bytes"] > 0


def test_gpu_check_script_uses_real_options_and_stops_clearly_without_cuda(
    tmp_path: Path,
) -> None:
    script = ROOT / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    # The options it passes to the benchmark exist.
    args = bench_cli.build_parser().parse_args(
        ["--device", "cuda", "--repeats", "5", "--no-progress", "--json", "a.json"]
        + ["--rst", "a.rst", "--plot", "a.png"]
    )
    assert args.device == "cuda" and args.rst == Path("a.rst")
    text = script.read_text()
    assert "--no-deps --no-build-isolation" in text and "-k cuda" in text
    assert "bench_cuda.json" in text and "${OUT:-docs/_static}" in text
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run the whole check")
    proc = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable},
    )
    assert proc.returncode == 2
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert "PyTorch with CUDA is needed" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_worker_server_refuses_to_fork_after_cuda_was_initialised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from invertnet.bench import _worker

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="initialised CUDA before forking"):
        _worker.main(["--serve"])


def test_methods_that_run_on_none_of_the_workloads_are_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _run_bad(["--workloads", "momentum-mlp", "--methods", "revlib"], capsys)
    assert "none of the methods asked for runs on these workloads" in err
    assert "momentum-mlp has plain, checkpoint, invertnet, momentumnet" in err


def test_help_lists_workloads_at_a_size_and_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out.split("workloads (at --size cpu):", 1)[1]
    assert "{" not in out  # descriptions filled in, not templates
    assert "32 channels, 16x16, batch 8" in out
    for method in METHOD_INFO:
        assert f"  {method} " in out
    assert "pip install revlib" in out


def _timed(method: str, times: list[float]) -> Result:
    return Result(config=Config("additive-conv", 8, method), step_times_s=times, peak_bytes=2**20)


@pytest.mark.parametrize("timing, expected", [("interleaved", "1.00x"), ("separate", "1.10x")])
def test_time_ratios_pair_the_steps_taken_side_by_side(timing: str, expected: str) -> None:
    # A slow spell doubles steps 2 and 3 of every method, taken side by side, and
    # invertnet's step 4 has a blip: the medians pick the blip up (1.1 against
    # 1.0), the ratios of steps side by side cancel the spell and ignore the blip.
    # Steps timed separately do not pair up.
    plain = _timed("plain", [1.0, 2.0, 2.0, 1.0, 1.0])
    light = _timed("invertnet", [1.0, 2.0, 2.0, 1.1, 1.0])
    peer = _timed("revlib", [1.0, 2.0, 2.0, 1.0, 1.0])
    machine = {"device": "cpu", "device_name": "test", "cpu_count": 2, "python": "3", "torch": "2"}
    settings = {"command": "invertnet bench", "repeats": 5, "timing": timing}
    document = bench_report.to_document([plain, light, peer], settings, machine)
    summary = bench_report.format_summary(document)
    assert f"invertnet / revlib time {expected} (depth 8)" in summary
    rows = {r["config"]["method"]: r for r in document["results"]}
    assert f"{rows['invertnet']['time_ratio']:.2f}x" == expected
