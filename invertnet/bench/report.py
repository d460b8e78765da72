"""Reports of a benchmark run: the text table, the JSON document, the plot, and
the reStructuredText table the README shows.

Every report is computed from the JSON document (:func:`to_document`), so the
README can be refreshed from a saved file without running the benchmark again.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

import invertnet
from invertnet._optional import require
from invertnet.bench.measure import Result
from invertnet.bench.workloads import METHOD_INFO, METHODS, WORKLOADS

__all__ = [
    "SCHEMA",
    "find_alerts",
    "format_summary",
    "format_table",
    "group_label",
    "machine_info",
    "render_rst",
    "rows",
    "to_document",
    "write_plot",
]

#: Identifies the layout of the JSON document; bump it when the layout changes.
SCHEMA = "invertnet-bench/2"

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
    "notes",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Packages whose versions the document records (peers and optional workloads).
_PEERS = ("revlib", "memcnn", "momentumnet", "transformers")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str) -> dict[str, Any]:
    """Describe the machine, the software versions and the device measured on.

    Parameters
    ----------
    device : str
        The ``--device`` the benchmark ran on.

    Returns
    -------
    dict
        JSON-ready facts: cpu model, core count, thread settings, versions (torch,
        invertnet, the peers; None where not installed), device.
    """
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "invertnet": getattr(invertnet, "__version__", None),
        "peers": {name: _version(name) for name in _PEERS},
        "device": device,
    }
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu"]
    return info


def group_label(config: dict[str, Any] | Any) -> str:
    """The name a configuration's group goes by in reports: the workload, with
    ``+bf16`` (or ``+fp16``) when it ran under autocast."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    autocast = get("autocast", None)
    return f"{get('workload')}+{autocast}" if autocast else str(get("workload"))


def time_ratio(times: Sequence[float], base: Sequence[float], paired: bool = True) -> float | None:
    """One method's step time over another's, both measured in the same run.

    With ``paired`` (interleaved timing), the median of the ratios of the steps
    taken side by side: the i-th timed steps of both, moments apart in one
    process. The slow spells of a shared machine, which last seconds, then hit
    both steps of a pair alike and cancel, where a ratio of medians picks them up
    whenever one method's median falls in a spell and the other's does not.
    Otherwise, or where the step counts differ (a method failed midway), the ratio
    of the medians.

    Examples
    --------
    >>> time_ratio([1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    1.0
    >>> time_ratio([1.1, 2.2, 4.4], [1.0, 2.0, 4.0])  # doctest: +ELLIPSIS
    1.1...
    """
    if not times or not base:
        return None
    if paired and len(times) == len(base):
        return statistics.median(t / b for t, b in zip(times, base))
    return statistics.median(times) / statistics.median(base)


def rows(results: Iterable[Result], paired: bool = True) -> list[dict[str, Any]]:
    """One JSON-ready row per result, with its ratios to plain autograd.

    Ratios compare results of the same run, workload (and autocast) and depth:
    the plain row's step times (:func:`time_ratio`, ``paired`` as there) and peak
    memory are the denominators.
    """
    results = list(results)
    plain = {
        (group_label(r.config), r.config.depth): r
        for r in results
        if r.config.method == "plain" and r.error is None
    }
    out = []
    for r in results:
        row = r.to_dict()
        base = plain.get((group_label(r.config), r.config.depth))
        row["time_ratio"] = time_ratio(r.step_times_s, base.step_times_s, paired) if base else None
        row["memory_ratio"] = _ratio(r.peak_bytes, base.peak_bytes if base else None)
        out.append(row)
    return out


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


# -- alerts --------------------------------------------------------------------
#: A memory-saving method is flagged when its peak at the deepest depth exceeds
#: GROWTH_LIMIT times its peak at the shallowest, plus a slack (below).
GROWTH_LIMIT = 1.25
#: The slack's floor: resident-set figures (CPU) move by a megabyte or two from
#: run to run with no trend in depth; CUDA's allocator counts exactly.
GROWTH_NOISE_BYTES = {"cpu": 4 * 2**20, "cuda": 2**20}
#: ... and its share of plain autograd's own growth over the same depths, where
#: plain was measured: a method that keeps a tenth of what plain adds per block
#: is not flat.
GROWTH_PLAIN_SHARE = 0.1


def _saves_memory(method: str) -> bool:
    info = METHOD_INFO.get(method)
    return bool(info and info.saves_memory)


def find_alerts(results: list[dict[str, Any]], device: str = "cpu") -> list[dict[str, Any]]:
    """What a reader must not miss: memory-saving methods that did not save memory.

    Two kinds, each a dictionary with ``kind``, ``workload`` (the group label),
    ``method``, ``depths`` and a ``message``:

    ``kept-inputs``
        A memory-saving method's run recorded :class:`invertnet.InputKeptWarning`:
        wrappers kept inputs they were asked to free (``kept_inputs`` of them), so
        its memory figures are not those of a freeing run, at any depth.
    ``memory-grows``
        A memory-saving method (:attr:`~invertnet.bench.workloads.Method.saves_memory`)
        peaks at its deepest depth above :data:`GROWTH_LIMIT` times its peak at the
        shallowest plus a slack: the larger of :data:`GROWTH_NOISE_BYTES` and
        :data:`GROWTH_PLAIN_SHARE` of plain autograd's growth over the same depths.

    Parameters
    ----------
    results : list of dict
        Rows as :func:`rows` makes them.
    device : str
        The device measured on (``cpu`` or ``cuda:N``), for the noise floor.

    Returns
    -------
    list of dict
        The alerts, in the order of the results.
    """
    alerts: list[dict[str, Any]] = []
    ok = [r for r in results if not r.get("error")]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((group_label(r["config"]), r["config"]["method"]), []).append(r)
    for (label, method), members in groups.items():
        if not _saves_memory(method):
            continue
        kept = [r for r in members if r.get("kept_inputs")]
        if kept:
            depths = sorted(r["config"]["depth"] for r in kept)
            most = max(r["kept_inputs"] for r in kept)
            alerts.append(
                {
                    "kind": "kept-inputs",
                    "workload": label,
                    "method": method,
                    "depths": depths,
                    "kept_inputs": most,
                    "message": f"{label} {method}: inputs were KEPT, not freed (up to {most} "
                    f"wrapper(s) warned InputKeptWarning at depth(s) "
                    f"{', '.join(map(str, depths))}): its memory figures are not those of a "
                    "memory-saving run",
                }
            )
        measured = sorted(
            (r["config"]["depth"], r["peak_bytes"])
            for r in members
            if not r.get("error") and r.get("peak_bytes") is not None
        )
        if len(measured) < 2 or measured[0][0] == measured[-1][0]:
            continue
        (lo, lo_peak), (hi, hi_peak) = measured[0], measured[-1]
        plain = {
            r["config"]["depth"]: r["peak_bytes"]
            for r in ok
            if group_label(r["config"]) == label and r["config"]["method"] == "plain"
        }
        noise = GROWTH_NOISE_BYTES["cuda" if device.startswith("cuda") else "cpu"]
        plain_growth = (plain.get(hi) or 0) - (plain.get(lo) or 0) if lo in plain else 0
        slack = max(noise, GROWTH_PLAIN_SHARE * plain_growth)
        if hi_peak > GROWTH_LIMIT * lo_peak + slack:
            growth = hi_peak / lo_peak if lo_peak else float("inf")
            alerts.append(
                {
                    "kind": "memory-grows",
                    "workload": label,
                    "method": method,
                    "depths": [lo, hi],
                    "growth": growth,
                    "message": f"{label} {method}: activation memory GROWS with depth, "
                    f"{_fmt_mb(lo_peak)} at depth {lo} to {_fmt_mb(hi_peak)} at depth {hi} "
                    f"({growth:.2f}x; flat means at most {GROWTH_LIMIT:.2f}x + "
                    f"{_fmt_mb(slack)})",
                }
            )
    return alerts


def _row_notes(row: dict[str, Any], alerts: list[dict[str, Any]]) -> list[str]:
    """Short notes for one row of the table, from the alerts that concern it."""
    label = group_label(row["config"])
    method, depth = row["config"]["method"], row["config"]["depth"]
    notes = []
    for a in alerts:
        if (a["workload"], a["method"]) != (label, method):
            continue
        if a["kind"] == "kept-inputs" and depth in a["depths"]:
            notes.append(f"KEPT INPUTS ({row.get('kept_inputs', 0)})")
        elif a["kind"] == "memory-grows" and depth == a["depths"][-1]:
            notes.append(f"MEMORY GROWS {a['growth']:.2f}x")
    return notes


def to_document(
    results: Sequence[Result],
    settings: dict[str, Any],
    machine: dict[str, Any],
    skipped: dict[str, str] | None = None,
    notes: Sequence[str] = (),
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
    notes : sequence of str
        Lines for the reader: peers not measured and why.

    Returns
    -------
    dict
        ``schema``, ``settings``, ``machine``, ``workloads`` (their descriptions at
        the run's size), ``skipped``, ``notes``, ``memory_method``, ``results`` (one
        row per configuration, with ``notes``) and ``alerts`` (:func:`find_alerts`).
    """
    size = settings.get("size", "cpu")
    table = rows(results, paired=_paired(settings))
    alerts = find_alerts(table, str(machine.get("device", "cpu")))
    for row in table:
        row["notes"] = _row_notes(row, alerts)
    return {
        "schema": SCHEMA,
        "settings": settings,
        "machine": machine,
        "workloads": {
            name: WORKLOADS[name].describe(size)
            for name in dict.fromkeys(r.config.workload for r in results)
            if name in WORKLOADS
        },
        "skipped": dict(skipped or {}),
        "notes": list(notes),
        "memory_method": next((r.memory_method for r in results if r.memory_method), ""),
        "results": table,
        "alerts": alerts,
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
    head = [group_label(config), str(config["depth"]), config["method"]]
    notes = "; ".join(row.get("notes", []))
    if row.get("error"):
        return [*head, "failed (see below)", "", "", "", "", notes]
    return [
        *head,
        _fmt_time(row["median_s"]),
        _fmt_ratio(row["time_ratio"]),
        _fmt_mb(row["peak_bytes"]),
        _fmt_ratio(row["memory_ratio"]),
        _fmt_mb(row["saved_bytes"]),
        notes,
    ]


def format_table(document: dict[str, Any]) -> str:
    """The results as an aligned text table with the :data:`COLUMNS`, failures and
    notes (peers not measured) below it."""
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
        f"failed: {group_label(r['config'])} depth {r['config']['depth']} "
        f"{r['config']['method']}: {r['error']}"
        for r in document["results"]
        if r.get("error")
    ]
    notes = [f"note: {n}" for n in document.get("notes", [])]
    return "\n".join([line(COLUMNS), rule, *(line(r) for r in body), *failures, *notes])


def _by_key(document: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {
        (group_label(r["config"]), r["config"]["method"], r["config"]["depth"]): r
        for r in document["results"]
        if not r.get("error")
    }


#: Methods invertnet's time is compared with in the summary, where measured.
_COMPARED = ("checkpoint", "original-checkpoint", "revlib", "memcnn", "momentumnet")


def _paired(settings: dict[str, Any]) -> bool:
    """Whether a run's step times pair up (:func:`time_ratio`): interleaved timing."""
    return settings.get("timing", "interleaved") == "interleaved"


def format_summary(document: dict[str, Any]) -> str:
    """Per workload: invertnet's time against checkpoint's (and the peers'), memory
    growth with depth; then one ``WARNING`` line per alert (:func:`find_alerts`)."""
    found = _by_key(document)
    paired = _paired(document.get("settings", {}))

    def ratio(label: str, other: str, depth: int) -> str:
        mine, theirs = found[(label, "invertnet", depth)], found[(label, other, depth)]
        value = time_ratio(mine["step_times_s"], theirs["step_times_s"], paired)
        return "n/a" if value is None else f"{value:.2f}x"

    lines = []
    for label in dict.fromkeys(group_label(r["config"]) for r in document["results"]):
        depths = sorted({d for (w, _, d) in found if w == label})
        if not depths:
            continue
        parts = []
        for other in _COMPARED:
            ratios = [
                f"{ratio(label, other, d)} (depth {d})"
                for d in depths
                if (label, "invertnet", d) in found and (label, other, d) in found
            ]
            if ratios:
                parts.append(f"invertnet / {other} time " + ", ".join(ratios))
        lo, hi = depths[0], depths[-1]
        growth = []
        for method in METHODS:
            a, b = found.get((label, method, lo)), found.get((label, method, hi))
            if a and b and a["peak_bytes"]:
                growth.append(f"{method} {b['peak_bytes'] / a['peak_bytes']:.2f}x")
        if growth and hi != lo:
            parts.append(f"memory at depth {hi} / depth {lo}: " + ", ".join(growth))
        if parts:
            lines.append(f"{label}: " + "; ".join(parts))
    lines += [f"WARNING: {a['message']}" for a in document.get("alerts", [])]
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


def _size_words(settings: dict[str, Any]) -> str:
    """``, size gpu, autocast off and bf16`` where the run recorded them (schema 2)."""
    words = f", size {settings['size']}" if "size" in settings else ""
    modes = [m for m in settings.get("autocast", []) if m != "off"]
    if modes:
        words += ", also under " + " and ".join(f"{m} autocast (rows +{m})" for m in modes)
    return words


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
        f"{settings.get('dtype', 'float32')}{_size_words(settings)}), Python {machine['python']}, "
        f"PyTorch {machine['torch']}. Medians of {_steps(settings)}; memory is "
        "the peak above the model and its gradients."
    )
    header = ["workload", "depth", "method", "step time", "vs plain", "act. memory", "vs plain"]
    cells = [_cells(r) for r in document["results"]]
    # The notes column only where a row has a note (a kept input, growing memory):
    # a table without it cannot be read as claiming what an alert contradicts.
    with_notes = any(c[-1] for c in cells)
    if with_notes:
        header.append("note")
    body = [c[:7] + ([c[-1]] if with_notes else []) for c in cells]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    def rule(char: str) -> str:
        return "+" + "+".join(char * (w + 2) for w in widths) + "+"

    table = [rule("-"), line(header), rule("=")]
    for r in body:
        table += [line(r), rule("-")]
    summary = format_summary(document)
    extra = [f"note: {n}" for n in document.get("notes", [])]
    bullets = [*summary.splitlines(), *extra] if summary else extra
    summary_lines = ["", *(f"* {s}" for s in bullets)] if bullets else []
    return "\n".join([intro, "", *table, *summary_lines]) + "\n"


# -- plot --------------------------------------------------------------------
def write_plot(document: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw peak activation memory and step time against depth, one line per method.

    One row of two panels per workload; written as PNG to ``path``.
    """
    # The object-oriented API with an explicit Agg canvas: no pyplot global state
    # and no backend switch in the caller's process.
    FigureCanvasAgg = require(
        "matplotlib.backends.backend_agg", "plot", "invertnet bench --plot"
    ).FigureCanvasAgg
    Figure = require("matplotlib.figure", "plot", "invertnet bench --plot").Figure

    found = _by_key(document)
    workloads = list(dict.fromkeys(group_label(r["config"]) for r in document["results"]))
    if not workloads:
        raise ValueError("nothing to plot: the document has no results")
    figure = Figure(figsize=(10, 3.2 * len(workloads) + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(workloads), 2, squeeze=False)
    styles = {
        "original": "x:",
        "original-checkpoint": "+:",
        "plain": "o-",
        "checkpoint": "s--",
        "invertnet": "^-",
        "revlib": "v-.",
        "memcnn": "D-.",
        "momentumnet": "P-.",
    }
    for (mem_ax, time_ax), workload in zip(axes, workloads):
        for method in METHODS:
            points = sorted(
                (d, r) for (w, m, d), r in found.items() if (w, m) == (workload, method)
            )
            if not points:
                continue
            depths = [d for d, _ in points]
            mem_ax.plot(
                depths,
                [(r["peak_bytes"] or 0) / MB for _, r in points],
                styles.get(method, "o-"),
                label=method,
            )
            time_ax.plot(
                depths,
                [r["median_s"] or 0 for _, r in points],
                styles.get(method, "o-"),
                label=method,
            )
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
