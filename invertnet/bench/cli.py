"""The ``invertnet bench`` command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from invertnet._optional import require
from invertnet.bench.measure import AUTOCAST, DTYPES, Config, Result, combine_rounds, with_times
from invertnet.bench.report import (
    format_summary,
    format_table,
    machine_info,
    render_rst,
    to_document,
    write_plot,
)
from invertnet.bench.runner import Runner
from invertnet.bench.workloads import METHOD_INFO, METHODS, SIZES, WORKLOADS, method_available

__all__ = ["build_parser", "main"]

#: ``--autocast`` value for no autocast.
AUTOCAST_OFF = "off"

#: Timed steps per configuration by default. Single steps on a shared two-core
#: machine vary by up to a fifth (ratios of steps taken side by side from 0.71 to
#: 1.16 within one run), so the median of three, the default until commit a567698,
#: moved by 5 to 10% from run to run: more than the differences the time targets
#: are about. Nine steps cost the main job about a minute more.
DEFAULT_REPEATS = 9

DESCRIPTION = """\
Train the same networks with plain autograd, torch.utils.checkpoint per block and
invertnet, side by side, and report the median training-step time and the peak
activation memory of each, with their ratios to plain autograd. Peers join where
installed: RevLib and memcnn on the coupling stacks, momentumnet on the MLP; the
Transformer also runs before conversion (original, original-checkpoint).

Sizes (--size): cpu, small networks, the default on CPU; cpu-large, the coupling
stacks at 64 channels, 32x32, batch 16; gpu, networks at the scale of GPU training
(RevNet 128 channels at batch 128, a d512 Transformer with sequence 512, a 1024-wide
MLP at batch 4096), the default with --device cuda, run in fp32 and under bf16
autocast. On CUDA steps are timed with CUDA events.

A memory-saving method that keeps inputs (InputKeptWarning, recorded from the
first step) or whose memory grows with depth (peak at the deepest depth above
1.25x that at the shallowest, plus a noise slack) is flagged: a WARNING line in
the summary, a note in its rows, and "alerts" in the JSON.

Every configuration (workload, depth, method) runs in a fresh process. Memory is the
peak of one training step above what the process held before it, after a first step
has allocated the model's gradients: on CPU the peak resident set (VmHWM, reset
through /proc/self/clear_refs, after glibc's malloc_trim, allocations of 128 KiB or
more mapped on their own) minus the resident set before; on CUDA
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
memory_allocated before. The bytes the forward pass saves for backward (counted with
torch.autograd.graph.saved_tensors_hooks, parameters excluded) are reported as a
cross-check. Time is the median step time with the methods of each workload and
depth built in one more fresh process and their steps alternating (--timing
interleaved), so that all see the same machine; a time ratio is then the median of
the ratios of steps taken side by side, in which a slow spell of the machine
cancels. Timings on a shared machine are
noisy: compare ratios within one run, and on a busy machine use --threads 1 (OpenMP
threads waiting for each other on oversubscribed cores can make steps many times
slower).
"""


def _positive_int(what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a positive integer, got {text!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{what} must be a positive integer, got {text!r}")
        return value

    return parse


def _names(known: Sequence[str], what: str) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                f"choose from {', '.join(known)}"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``invertnet bench``."""
    parser = argparse.ArgumentParser(
        prog="invertnet bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads (at --size cpu):\n"
        + "\n".join(f"  {w.name:<14} {w.describe('cpu')}" for w in WORKLOADS.values())
        + "\nmethods:\n"
        + "\n".join(
            f"  {m.name:<20} {m.description}{f' ({m.install})' if m.install else ''}"
            for m in METHOD_INFO.values()
        ),
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        type=_names(list(WORKLOADS), "workload"),
        metavar="NAME",
        help="workloads to run, space- or comma-separated (default: all available)",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        help="network sizes: cpu (small), cpu-large (coupling stacks at 64 channels, 32x32, "
        "batch 16), gpu (GPU scale) (default: gpu with --device cuda, else cpu)",
    )
    parser.add_argument(
        "--depths",
        nargs="+",
        type=_positive_int("depth"),
        metavar="N",
        help="network depths in blocks (default: each workload's at the size; 8 32 128 for most)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        type=_names(list(METHODS), "method"),
        metavar="NAME",
        help="methods to compare, where a workload has them (default: all of each "
        f"workload's whose package is installed; known: {' '.join(METHODS)}); ratios need "
        "plain",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int("batch size"),
        metavar="N",
        help="batch size for every workload (default: each workload's own)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="parameter and input dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--autocast",
        nargs="+",
        choices=(AUTOCAST_OFF, *AUTOCAST),
        metavar="MODE",
        help="run each workload under these torch.autocast modes: off, bf16, fp16 (default: "
        "off bf16 at --size gpu, else off)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int("repeats"),
        default=DEFAULT_REPEATS,
        metavar="N",
        help="measured steps per configuration; the median is reported (default: "
        "%(default)s: single steps on a shared machine vary by a fifth, and a median of "
        "three could not tell 5%% apart)",
    )
    parser.add_argument(
        "--rounds",
        type=_positive_int("rounds"),
        default=1,
        metavar="N",
        help="measure every configuration N times, one round of all configurations after "
        "another, each in a fresh process; step times are pooled and the peak memory is the "
        "median of the rounds, so that a slow spell of a shared machine is spread over all "
        "methods instead of landing on one (default: %(default)s)",
    )
    parser.add_argument(
        "--timing",
        choices=("interleaved", "separate"),
        default="interleaved",
        help="interleaved: time the methods of each workload and depth in one process, "
        "alternating their steps, so that all see the same machine (memory is still measured "
        "in a fresh process per configuration); separate: time each configuration in its own "
        "process, with its memory (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=_positive_int("warmup"),
        default=1,
        metavar="N",
        help="unmeasured steps before the timed ones (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int("threads"),
        metavar="N",
        help="torch.set_num_threads in each measuring process (default: torch's choice, "
        "which follows OMP_NUM_THREADS)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: depths 2 and 4, batch size 4, one repeat (overrides those options)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure as JSON")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="plot memory and time against depth"
    )
    parser.add_argument(
        "--rst", type=Path, metavar="FILE", help="write the README's reStructuredText table"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_int("timeout"),
        default=900,
        metavar="S",
        help="seconds after which one configuration is stopped (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    return parser


def _check_device(parser: argparse.ArgumentParser, text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device: {text!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        parser.error(f"--device: {device.type!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        parser.error(
            f"--device {text}: CUDA is not available on this machine "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        parser.error(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"


def _choose_workloads(
    parser: argparse.ArgumentParser, requested: list[list[str]] | None
) -> tuple[list[str], dict[str, str]]:
    """The workloads to run, and those left out of the default list with the reason."""
    skipped: dict[str, str] = {}
    if requested:
        names = list(dict.fromkeys(n for group in requested for n in group))
        for name in names:
            missing = WORKLOADS[name].missing()
            if missing:
                install = WORKLOADS[name].install
                parser.error(
                    f"workload {name!r} needs {', '.join(missing)}, which this installation "
                    f"does not provide{f' ({install})' if install else ''}"
                )
        return names, skipped
    names = []
    for name, workload in WORKLOADS.items():
        missing = workload.missing()
        if missing:
            install = f" ({workload.install})" if workload.install else ""
            skipped[name] = f"needs {', '.join(missing)}, not available{install}"
        else:
            names.append(name)
    return names, skipped


def _choose_methods(
    workloads: list[str], requested: list[list[str]] | None
) -> tuple[dict[str, list[str]], list[str]]:
    """Per workload, the methods to run; and notes on the methods left out.

    A peer whose package is not installed is left out with a note, not an error.
    """
    wanted = list(dict.fromkeys(m for group in requested for m in group)) if requested else None
    chosen: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}
    for name in workloads:
        methods = []
        for method in WORKLOADS[name].methods:
            if wanted is not None and method not in wanted:
                continue
            if method_available(method) is None:
                methods.append(method)
            else:
                missing.setdefault(method, []).append(name)
        chosen[name] = methods
    notes = [
        f"{method} not measured on {', '.join(names)}: {method_available(method)}"
        for method, names in missing.items()
    ]
    return chosen, notes


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, disable: bool) -> Any:
    if disable:
        return _NoProgress()
    tqdm = require("tqdm", "bench", "invertnet bench's progress bar (or pass --no-progress)")
    return tqdm.tqdm(total=total, unit="job", file=sys.stderr)


def _write(text: str, stream: Any = None) -> None:
    (stream or sys.stdout).write(text + "\n")


def _run_rounds(
    configs: list[Config], n_rounds: int, interleaved: bool, args: argparse.Namespace
) -> dict[Config, list[Result]]:
    """Measure every configuration ``n_rounds`` times, one round after another.

    With ``interleaved`` timing, each configuration's memory is measured in a
    process of its own, with no timed steps, and then the methods of each
    workload, autocast mode and depth are timed together
    (:meth:`Runner.run_interleaved`).
    """
    groups: dict[tuple[str, str | None, int], list[Config]] = {}
    for config in configs:
        groups.setdefault((config.workload, config.autocast, config.depth), []).append(config)
    rounds: dict[Config, list[Result]] = {config: [] for config in configs}
    jobs = len(configs) + (len(groups) if interleaved else 0)
    with Runner(timeout_s=args.timeout) as runner:
        progress = _progress(jobs * n_rounds, args.no_progress)
        for round_ in range(n_rounds):
            where = f"round {round_ + 1}/{n_rounds}"
            for (workload, autocast, depth), group in groups.items():
                label = f"{workload}+{autocast}" if autocast else workload
                measured = []
                for config in group:
                    progress.set_description(f"{where}: {label} depth {depth} {config.method}")
                    if interleaved:  # memory only: the time comes from the group's run
                        config_ = replace(config, repeats=0, warmup=0)
                        measured.append(runner.run(config_))
                    else:
                        rounds[config].append(runner.run(config))
                    progress.update()
                if interleaved:
                    progress.set_description(f"{where}: {label} depth {depth} timing")
                    timed = runner.run_interleaved(group)
                    for memory, timing in zip(measured, timed):
                        rounds[timing.config].append(with_times(memory, timing))
                    progress.update()
        progress.close()
    return rounds


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``invertnet bench``; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after ``bench`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every configuration was measured (a peer that could not run is a
        note, not a failure), 1 when one failed, 2 for bad options.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:  # argparse exits; the caller wants a status
        return int(exit_.code or 0)
    try:
        device = _check_device(parser, args.device)
        workloads, skipped = _choose_workloads(parser, args.workloads)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:  # before minutes of measuring, not after
        if not args.no_progress:
            require("tqdm", "bench", "invertnet bench's progress bar (or pass --no-progress)")
        if args.plot:
            require("matplotlib", "plot", "invertnet bench --plot")
    except ImportError as exc:
        _write(f"invertnet bench: {exc}", sys.stderr)
        return 2
    size = args.size or ("gpu" if device.startswith("cuda") else "cpu")
    modes = args.autocast or ([AUTOCAST_OFF, "bf16"] if size == "gpu" else [AUTOCAST_OFF])
    autocasts = [None if m == AUTOCAST_OFF else m for m in dict.fromkeys(modes)]
    methods, notes = _choose_methods(workloads, args.methods)
    repeats = 1 if args.quick else args.repeats
    batch_size = 4 if args.quick else args.batch_size

    for name, reason in skipped.items():
        _write(f"invertnet bench: skipping workload {name!r}: {reason}", sys.stderr)
    if args.methods and not any(methods.values()):
        _write(
            "invertnet bench: none of the methods asked for runs on these workloads: "
            + "; ".join(notes or [f"{w} has {', '.join(WORKLOADS[w].methods)}" for w in workloads]),
            sys.stderr,
        )
        return 2
    if not workloads:
        _write("invertnet bench: no workload is available to run", sys.stderr)
        return 1

    def depths_of(workload: str) -> list[int]:
        if args.quick:
            return [2, 4]
        return sorted(set(args.depths or WORKLOADS[workload].default_depths(size)))

    configs = [
        Config(
            workload=w,
            depth=d,
            method=m,
            batch_size=batch_size,
            dtype=args.dtype,
            device=device,
            repeats=repeats,
            warmup=args.warmup,
            threads=args.threads,
            size=size,
            autocast=a,
        )
        for w in workloads
        for a in autocasts
        for d in depths_of(w)
        for m in methods[w]
    ]
    rounds = _run_rounds(configs, args.rounds, args.timing == "interleaved", args)
    results = [combine_rounds(rounds[config]) for config in configs]
    peers_failed = sorted(
        {(r.config.method, r.config.workload) for r in results if r.error and _is_peer(r)}
    )
    notes += [
        f"{method} could not run on {workload} (see the failure above); a peer's failure "
        "is not the benchmark's"
        for method, workload in peers_failed
    ]

    settings = {
        "command": shlex.join(["invertnet", "bench", *args_list]),
        "size": size,
        "workloads": workloads,
        "depths": {w: depths_of(w) for w in workloads},
        "methods": {w: methods[w] for w in workloads},
        "batch_size": batch_size,
        "dtype": args.dtype,
        "autocast": [a or AUTOCAST_OFF for a in autocasts],
        "device": device,
        "repeats": repeats,
        "rounds": args.rounds,
        "timing": args.timing,
        "warmup": args.warmup,
        "threads": args.threads,
    }
    document = to_document(results, settings, machine_info(device), skipped, notes)
    _write(format_table(document))
    summary = format_summary(document)
    if summary:
        _write("\n" + summary)
    for name, reason in skipped.items():
        _write(f"skipped {name}: {reason}")
    where: dict[str, set[str]] = {}
    for r in results:
        for message in r.warnings:
            where.setdefault(message, set()).add(r.config.method)
    for message, methods_seen in sorted(where.items()):
        _write(
            f"warning in a measured run ({', '.join(sorted(methods_seen))}): {message}", sys.stderr
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        _write(f"wrote {args.json}")
    if args.plot:
        write_plot(document, args.plot)
        _write(f"wrote {args.plot}")
    if args.rst:
        args.rst.write_text(render_rst(document))
        _write(f"wrote {args.rst}")
    failed = [r for r in results if r.error and not _is_peer(r)]
    if failed:
        _write(f"invertnet bench: {len(failed)} configuration(s) failed", sys.stderr)
        return 1
    return 0


def _is_peer(result: Result) -> bool:
    info = METHOD_INFO.get(result.config.method)
    return bool(info and info.package)
