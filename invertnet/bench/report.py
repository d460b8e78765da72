"""Reports of a benchmark run: the text table, the JSON document, the plot, and
the reStructuredText table the README shows.

Every report is computed from the JSON document (:func:`to_document`), so the
README can be refreshed from a saved file without running the benchmark again.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from invertnet.bench.measure import Result
from invertnet.bench.workloads import METHODS, WORKLOADS

__all__ = [
    "SCHEMA",
    "format_summary",
    "format_table",
    "machine_info",
    "render_rst",
    "rows",
    "to_document",
    "write_plot",
]

#: Identifies the layout of the JSON document; bump it when the layout changes.
SCHEMA = "invertnet-bench/1"

MB = 1e6

#: Columns of the text table, in order.
COLUMNS = (
    "workload",
    "depth",
    "method",
    "step time",
    "time / plain",
    "peak act. memory",
    "memory / plain",
    "saved for backward",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """Describe the machine, the software versions and the device measured on.

    Parameters
    ----------
    device : str
        The ``--device`` the benchmark ran on.

    Returns
    -------
    dict
        JSON-ready facts: cpu model, core count, thread settings, versions, device.
    """
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu"]
    return info


def rows(results: Iterable[Result]) -> list[dict[str, Any]]:
    """One JSON-ready row per result, with its ratios to plain autograd.

    Ratios compare results of the same run, workload and depth: the plain row's
    median step time and peak memory are the denominators.
    """
    results = list(results)
    plain = {
        (r.config.workload, r.config.depth): r
        for r in results
        if r.config.method == "plain" and r.error is None
    }
    out = []
    for r in results:
        row = r.to_dict()
        base = plain.get((r.config.workload, r.config.depth))
        row["time_ratio"] = _ratio(r.median_s, base.median_s if base else None)
        row["memory_ratio"] = _ratio(r.peak_bytes, base.peak_bytes if base else None)
        out.append(row)
    return out


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def to_document(
    results: Sequence[Result],
    settings: dict[str, Any],
    machine: dict[str, Any],
    skipped: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON document of a run: every figure, the machine and the settings.

    Parameters
    ----------
    results : sequence of Result
        All measured configurations, in order.
    settings : dict
        The options the run used.
    machine : dict
        From :func:`machine_info`.
    skipped : dict, optional
        Workloads left out of the default list, with the reason.
    """
    return {
        "schema": SCHEMA,
        "settings": settings,
        "machine": machine,
        "workloads": {
            name: WORKLOADS[name].description
            for name in dict.fromkeys(r.config.workload for r in results)
            if name in WORKLOADS
        },
        "skipped": dict(skipped or {}),
        "memory_method": next((r.memory_method for r in results if r.memory_method), ""),
        "results": rows(results),
    }


# -- text --------------------------------------------------------------------
def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt_mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MB:.1f} MB"


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _cells(row: dict[str, Any]) -> list[str]:
    config = row["config"]
    head = [config["workload"], str(config["depth"]), config["method"]]
    if row.get("error"):
        return [*head, "failed (see below)", "", "", "", ""]
    return [
        *head,
        _fmt_time(row["median_s"]),
        _fmt_ratio(row["time_ratio"]),
        _fmt_mb(row["peak_bytes"]),
        _fmt_ratio(row["memory_ratio"]),
        _fmt_mb(row["saved_bytes"]),
    ]


def format_table(document: dict[str, Any]) -> str:
    """The results as an aligned text table with the :data:`COLUMNS`."""
    body = [_cells(row) for row in document["results"]]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(COLUMNS)]
    numeric = {1, 3, 4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    failures = [
        f"failed: {r['config']['workload']} depth {r['config']['depth']} "
        f"{r['config']['method']}: {r['error']}"
        for r in document["results"]
        if r.get("error")
    ]
    return "\n".join([line(COLUMNS), rule, *(line(r) for r in body), *failures])


def _by_key(document: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {
        (r["config"]["workload"], r["config"]["method"], r["config"]["depth"]): r
        for r in document["results"]
        if not r.get("error")
    }


def format_summary(document: dict[str, Any]) -> str:
    """Per workload: invertnet's time against checkpoint's, and memory growth with depth."""
    found = _by_key(document)
    lines = []
    for workload in dict.fromkeys(r["config"]["workload"] for r in document["results"]):
        depths = sorted({d for (w, _, d) in found if w == workload})
        if not depths:
            continue
        parts = []
        vs_ckpt = [
            f"{found[(workload, 'invertnet', d)]['median_s'] / found[(workload, 'checkpoint', d)]['median_s']:.2f}x"  # noqa: E501
            f" (depth {d})"
            for d in depths
            if (workload, "invertnet", d) in found and (workload, "checkpoint", d) in found
        ]
        if vs_ckpt:
            parts.append("invertnet / checkpoint time " + ", ".join(vs_ckpt))
        lo, hi = depths[0], depths[-1]
        growth = []
        for method in METHODS:
            a, b = found.get((workload, method, lo)), found.get((workload, method, hi))
            if a and b and a["peak_bytes"]:
                growth.append(f"{method} {b['peak_bytes'] / a['peak_bytes']:.2f}x")
        if growth and hi != lo:
            parts.append(f"memory at depth {hi} / depth {lo}: " + ", ".join(growth))
        if parts:
            lines.append(f"{workload}: " + "; ".join(parts))
    return "\n".join(lines)


# -- reStructuredText ----------------------------------------------------------
def _steps(settings: dict[str, Any]) -> str:
    """How many timed steps each median is over, in words."""
    repeats, rounds = settings.get("repeats"), settings.get("rounds", 1)
    details = [f"{rounds} rounds"] if rounds > 1 else []
    if settings.get("timing") == "interleaved":
        details.append("methods alternating")
    steps = f"{repeats * rounds} steps"
    return f"{steps} ({', '.join(details)})" if details else steps


def render_rst(document: dict[str, Any], command: str | None = None) -> str:
    """The README's benchmark block: a line on machine and command, and a grid table.

    Parameters
    ----------
    document : dict
        A JSON document from :func:`to_document`.
    command : str, optional
        The command that produced it; defaults to the one recorded in the settings.
    """
    machine = document["machine"]
    settings = document["settings"]
    command = command or settings.get("command", "invertnet bench")
    threads = machine.get("omp_num_threads") or "default"
    intro = (
        f"Measured with ``{command}`` on {machine['device_name']} "
        f"({machine['cpu_count']} cores, OMP_NUM_THREADS={threads}; device {machine['device']}, "
        f"{settings.get('dtype', 'float32')}), Python {machine['python']}, "
        f"PyTorch {machine['torch']}. Medians of {_steps(settings)}; memory is "
        "the peak above the model and its gradients."
    )
    header = ["workload", "depth", "method", "step time", "vs plain", "act. memory", "vs plain"]
    body = [_cells(r)[:7] for r in document["results"]]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    def rule(char: str) -> str:
        return "+" + "+".join(char * (w + 2) for w in widths) + "+"

    table = [rule("-"), line(header), rule("=")]
    for r in body:
        table += [line(r), rule("-")]
    summary = format_summary(document)
    summary_lines = ["", *(f"* {s}" for s in summary.splitlines())] if summary else []
    return "\n".join([intro, "", *table, *summary_lines]) + "\n"


# -- plot --------------------------------------------------------------------
def write_plot(document: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw peak activation memory and step time against depth, one line per method.

    One row of two panels per workload; written as PNG to ``path``.
    """
    # The object-oriented API with an explicit Agg canvas: no pyplot global state
    # and no backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    found = _by_key(document)
    workloads = list(dict.fromkeys(r["config"]["workload"] for r in document["results"]))
    if not workloads:
        raise ValueError("nothing to plot: the document has no results")
    figure = Figure(figsize=(10, 3.2 * len(workloads) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(workloads), 2, squeeze=False)
    styles = {"plain": "o-", "checkpoint": "s--", "invertnet": "^-"}
    for (mem_ax, time_ax), workload in zip(axes, workloads):
        for method in METHODS:
            points = sorted(
                (d, r) for (w, m, d), r in found.items() if (w, m) == (workload, method)
            )
            if not points:
                continue
            depths = [d for d, _ in points]
            mem_ax.plot(
                depths, [r["peak_bytes"] / MB for _, r in points], styles[method], label=method
            )
            time_ax.plot(depths, [r["median_s"] for _, r in points], styles[method], label=method)
        all_depths = sorted({d for (w, _, d) in found if w == workload})
        for ax, what in ((mem_ax, "peak activation memory (MB)"), (time_ax, "step time (s)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_depths, [str(d) for d in all_depths])
            ax.set_xlabel("depth (blocks)")
            ax.set_ylabel(what)
            ax.set_title(f"{workload}: {what.split(' (')[0]}")
            ax.grid(True, alpha=0.3)
            ax.legend()
    machine, settings = document["machine"], document["settings"]
    figure.suptitle(
        f"invertnet bench on {machine['device']} ({machine['device_name']}), "
        f"{settings.get('dtype', 'float32')}, median of {_steps(settings)}"
    )
    figure.savefig(path, format="png", dpi=100)
