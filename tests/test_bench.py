"""``invertnet bench``: the table, the JSON document, the plot, and bad options.

One tiny run (depths 1 and 2, batch 2, one repeat) is shared by the tests that
read its outputs; timings are never asserted, only structure and the counted
bytes, which are deterministic.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import invertnet
from invertnet.bench import cli as bench_cli
from invertnet.bench import main
from invertnet.bench import measure as bench_measure
from invertnet.bench._worker import measure_config_line
from invertnet.bench import workloads as bench_workloads
from invertnet.bench.measure import Config, Result, combine_rounds, with_times
from invertnet.bench.report import COLUMNS, SCHEMA, format_table, render_rst
from invertnet.bench.workloads import CORE_METHODS, METHOD_INFO, SIZES, WORKLOADS, build

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
    assert names == ["additive-conv", "affine-conv"]
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
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_time_interleaved_rotates_the_methods_and_survives_a_failing_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []
    real_step = bench_measure.train_step

    def recording_step(model: torch.nn.Module, batch: Any, **kwargs: Any) -> None:
        order.append("plain" if model[0].disable else "invertnet")
        real_step(model, batch, **kwargs)

    monkeypatch.setattr(bench_measure, "train_step", recording_step)
    base = Config("additive-conv", 1, "plain", batch_size=2, repeats=4, warmup=1)
    configs = [base, replace(base, method="magic"), replace(base, method="invertnet")]
    plain, magic, light = bench_measure.time_interleaved(configs)
    assert magic.error is not None and "unknown method 'magic'" in magic.error
    assert not magic.step_times_s
    for result in (plain, light):
        assert result.error is None and len(result.step_times_s) == 4
        assert result.batch_size == 2 and result.parameters
    # Two untimed steps each (gradients, warm-up), then rounds that start one later.
    timed = order[4:]
    assert timed == ["plain", "invertnet", "invertnet", "plain"] * 2


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
