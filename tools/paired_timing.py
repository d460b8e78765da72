"""Time two benchmark methods against each other with interleaved steps in one process.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 python tools/paired_timing.py --workloads momentum-mlp transformer

``invertnet bench`` measures every configuration in a fresh process, which memory
needs, so the methods compared are timed minutes apart. On a shared machine whose
speed changes in spells of seconds (30% here), that noise is larger than the 5%
the time target resolves. This tool builds both methods' models for a workload and
depth in one process and alternates their training steps (in swapped order every
other pair), so that each pair of steps sees the same machine; it reports the median
of the per-pair ratios and their quartiles. It times only; memory is the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Use the invertnet of this checkout, also when another one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from invertnet.bench.measure import train_step  # noqa: E402
from invertnet.bench.workloads import METHODS, SIZES, WORKLOADS, build  # noqa: E402


def paired_ratios(
    workload: str,
    depth: int,
    methods: tuple[str, str],
    pairs: int,
    batch_size: int | None = None,
    warmup: int = 2,
    size: str = "cpu",
) -> list[float]:
    """Step time of ``methods[1]`` over that of ``methods[0]``, for each of ``pairs`` pairs."""
    models = {m: build(workload, depth, m, batch_size=batch_size, size=size) for m in methods}
    for model, batch in models.values():
        for _ in range(warmup):
            train_step(model, batch)
    ratios = []
    for i in range(pairs):
        seconds = {}
        # Alternate which goes first, so that neither always follows the other.
        for method in methods if i % 2 == 0 else methods[::-1]:
            model, batch = models[method]
            start = time.perf_counter()
            train_step(model, batch)
            seconds[method] = time.perf_counter() - start
        ratios.append(seconds[methods[1]] / seconds[methods[0]])
    return ratios


def _summary(ratios: list[float]) -> dict[str, float]:
    low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": low, "q3": high}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=["momentum-mlp"])
    parser.add_argument("--depths", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument(
        "--methods",
        nargs=2,
        choices=list(METHODS),
        default=["checkpoint", "invertnet"],
        metavar=("BASE", "OTHER"),
        help="the ratio is OTHER / BASE (default: checkpoint invertnet); peers such as "
        "revlib where the workload has them",
    )
    parser.add_argument("--size", choices=SIZES, default="cpu", help="as invertnet bench's")
    parser.add_argument("--pairs", type=int, default=15, help="timed pairs of steps")
    parser.add_argument("--batch-size", type=int, help="default: each workload's own")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the ratios as JSON")
    args = parser.parse_args(argv)
    if args.pairs < 1 or min(args.depths) < 1:
        parser.error("--pairs and --depths must be positive integers")
    base, other = args.methods
    rows = []
    for workload in args.workloads:
        for depth in args.depths:
            ratios = paired_ratios(
                workload, depth, (base, other), args.pairs, args.batch_size, size=args.size
            )
            row = {"workload": workload, "depth": depth, "ratios": ratios, **_summary(ratios)}
            rows.append(row)
            sys.stdout.write(
                f"{workload} depth {depth}: {other} / {base} = {row['median']:.3f} "
                f"(quartiles {row['q1']:.3f} to {row['q3']:.3f}, {args.pairs} pairs)\n"
            )
            sys.stdout.flush()
    if args.json:
        document = {
            "command": " ".join(["python", "tools/paired_timing.py", *(argv or sys.argv[1:])]),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "methods": [base, other],
            "size": args.size,
            "rows": rows,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
