"""Measure what the length of a stack's chains of blocks costs in time and in memory.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 python tools/chain_tradeoff.py --lengths 0 14 28 128 --depths 32 128

In training, :class:`invertnet.ReversibleSequential` runs consecutive blocks as
chains, one wrapper call each. A chain returns its parameters' gradients when its
backward ends, so it holds them meanwhile; the stack cuts a chain before that
would exceed half the stack input's bytes. Longer chains pay the wrapper's fixed
cost per chain fewer times, and hold more gradients.

For each chain length (0: the stack's own cut; ``n``: chains of ``n`` blocks,
the stack's cut replaced for the measurement), this reports on the benchmark's
``additive-conv`` workload, at the benchmark's size:

* invertnet's step time over RevLib's: both models in one process, their steps
  alternating (which goes first swaps every pair), the median of the pairs'
  ratios and its quartiles;
* invertnet's peak activation memory, measured as ``invertnet bench`` measures it,
  in a fresh process.

This is a tuning aid for the chain budget (``reversible_sequential._cut``, which it
patches); the library's behaviour is the stack's own cut.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# Use the invertnet of this checkout, also when another one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# tools/paired_timing.py, beside this file (a script's folder is on sys.path).
from paired_timing import paired_ratios  # noqa: E402

from invertnet import reversible_sequential  # noqa: E402
from invertnet._runtime.forward_state import submodules_and_trainable_parameters  # noqa: E402
from invertnet.bench.measure import Config, measure_here  # noqa: E402

WORKLOAD = "additive-conv"
_STACKS_OWN_CUT = reversible_sequential._cut


def use_chains_of(length: int) -> None:
    """Make every stack cut its runs of blocks into chains of ``length`` blocks (a
    shorter last one, none of a single block); 0 keeps the stack's own cut."""
    if length == 0:
        reversible_sequential._cut = _STACKS_OWN_CUT
        return

    def cut(
        layers: list, start: int, stop: int, budget: int, walks: dict | None = None
    ) -> list[tuple[int, int]]:
        if walks is not None:  # the walk the stack hands each chain
            for index in range(start, stop):
                fn = layers[index]._modules["_fn"]
                walks[index] = submodules_and_trainable_parameters(fn)
        spans = [(a, min(a + length, stop)) for a in range(start, stop, length)]
        return [(a, b) for a, b in spans if b - a >= 2]

    reversible_sequential._cut = cut  # type: ignore[assignment]


def peak_bytes_in_fresh_process(depth: int, length: int) -> int:
    """invertnet's peak activation memory, measured in a process of its own."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", str(depth), str(length)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[0, 14, 28, 128])
    parser.add_argument("--depths", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--pairs", type=int, default=14, help="timed pairs of steps")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--memory-of", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of is not None:  # the fresh process of peak_bytes_in_fresh_process
        depth, length = args.memory_of
        use_chains_of(length)
        result = measure_here(Config(WORKLOAD, depth, "invertnet", repeats=0))
        if result.error or result.peak_bytes is None:
            raise SystemExit(f"memory measurement failed: {result.error}")
        sys.stdout.write(f"{result.peak_bytes}\n")
        return 0
    if args.pairs < 2 or min(args.depths) < 1 or min(args.lengths) < 0:
        parser.error("expected --pairs >= 2, --depths >= 1 and --lengths >= 0")
    rows = []
    for length in args.lengths:
        use_chains_of(length)
        for depth in args.depths:
            ratios = paired_ratios(WORKLOAD, depth, ("revlib", "invertnet"), args.pairs)
            low, median, high = statistics.quantiles(ratios, n=4)
            peak = peak_bytes_in_fresh_process(depth, length)
            rows.append(
                {
                    "length": length,
                    "depth": depth,
                    "median": median,
                    "q1": low,
                    "q3": high,
                    "peak_bytes": peak,
                }
            )
            name = "stack's cut" if length == 0 else f"chains of {length}"
            sys.stdout.write(
                f"{name:14s} depth {depth:4d}: invertnet / revlib {median:.3f} "
                f"(quartiles {low:.3f} to {high:.3f}), peak {peak / 1e6:.2f} MB\n"
            )
            sys.stdout.flush()
    if args.json:
        command = " ".join(["python", "tools/chain_tradeoff.py", *(argv or sys.argv[1:])])
        args.json.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
