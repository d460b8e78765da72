"""Time invertnet at an earlier commit against the working tree, in one process.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 python tools/ab_timing.py --before c0d7364 --depths 32 128

A change that must cost nothing in speed is checked side by side: the earlier
commit's package is exported (``git archive``) to a temporary folder under another
name (``invertnet_before``, every import rewritten), so that both versions import
in one process. Each builds the same benchmark workload with the same weights, and
their training steps alternate, in swapped order every other pair, so that each
pair sees the same machine; the median of the per-pair ratios (after / before) and
its quartiles are reported. It times only; memory is the benchmark's.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
# Use the invertnet of this checkout, also when another one is installed.
sys.path.insert(0, str(ROOT))

BEFORE = "invertnet_before"


def export_before(commit: str, into: Path) -> None:
    """Write ``commit``'s ``invertnet`` package to ``into``/invertnet_before."""
    archive = subprocess.run(
        ["git", "archive", commit, "invertnet"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "invertnet").rename(into / BEFORE)
    for path in (into / BEFORE).rglob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\binvertnet\b", BEFORE, text))


def _copy_weights(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Give ``new`` the weights of ``old``: by name, or in order where a commit
    renamed the modules (a stack's ``blocks`` became ``layers``) but kept the shapes."""
    before, after = old.state_dict(), new.state_dict()
    if list(before) == list(after):
        new.load_state_dict(before)
        return
    shapes_before = [t.shape for t in before.values()]
    shapes_after = [t.shape for t in after.values()]
    if shapes_before != shapes_after:
        raise SystemExit(
            "ab_timing: the two commits build models with different weights "
            f"({len(shapes_before)} tensors before, {len(shapes_after)} after); "
            "they cannot be timed on the same weights"
        )
    new.load_state_dict(dict(zip(after, before.values())))


def paired_ratios(
    before: tuple[ModuleType, ModuleType],
    after: tuple[ModuleType, ModuleType],
    workload: str,
    depth: int,
    size: str,
    pairs: int,
) -> list[float]:
    """Step time after / before, for each of ``pairs`` alternating pairs of steps."""
    (workloads_b, measure_b), (workloads_a, measure_a) = before, after
    old = workloads_b.build(workload, depth, BEFORE, size=size)
    new = workloads_a.build(workload, depth, "invertnet", size=size)
    _copy_weights(old[0], new[0])
    runs = {"before": (measure_b.train_step, old), "after": (measure_a.train_step, new)}
    for step, (model, batch) in runs.values():
        for _ in range(2):
            step(model, batch)
    ratios = []
    for i in range(pairs):
        seconds = {}
        for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
            step, (model, batch) = runs[name]
            start = time.perf_counter()
            step(model, batch)
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["after"] / seconds["before"])
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--workload", default="additive-conv")
    parser.add_argument("--size", default="cpu-large", choices=["cpu", "cpu-large", "gpu"])
    parser.add_argument("--depths", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--pairs", type=int, default=12, help="timed pairs of steps")
    args = parser.parse_args(argv)
    if args.pairs < 2 or min(args.depths) < 1:
        parser.error("--pairs must be at least 2 and --depths positive")
    with tempfile.TemporaryDirectory() as folder:
        try:
            export_before(args.before, Path(folder))
        except subprocess.CalledProcessError as error:
            parser.error(f"cannot export {args.before!r}: {error.stderr.decode().strip()}")
        sys.path.insert(0, folder)
        before = tuple(
            importlib.import_module(f"{BEFORE}.bench.{name}") for name in ("workloads", "measure")
        )
        after = tuple(
            importlib.import_module(f"invertnet.bench.{name}") for name in ("workloads", "measure")
        )
        for depth in args.depths:
            ratios = paired_ratios(before, after, args.workload, depth, args.size, args.pairs)
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            sys.stdout.write(
                f"{args.workload} {args.size} depth {depth}: after / before = "
                f"{statistics.median(ratios):.3f} (quartiles {q1:.3f} to {q3:.3f}, "
                f"{args.pairs} pairs)\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
