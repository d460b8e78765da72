"""Measure what each method costs per block beyond the arithmetic: Python, dispatch,
autograd bookkeeping.

Usage (from the repository root)::

    python tools/block_overhead.py --depth 32 --width 2 --batch-norm

A coupling stack of tiny blocks (``Linear(width, width)``, optionally followed by
``BatchNorm1d``, as F and G) costs almost nothing in arithmetic, so its training
step is the methods' own overhead. Each method (invertnet, invertnet with
``keep_input=True``, RevLib when installed) takes training steps in turn, and each
is timed by the thread's CPU time (``time.thread_time``): a shared machine's
stolen time does not count, where it swamps wall time at this scale. The best of
many timings is reported, per block, in microseconds.

At realistic sizes this overhead is paid once per block on top of the arithmetic;
its difference between two methods, times the depth, is their difference in step
time that no kernel can explain.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path

# Use the invertnet of this checkout, also when another one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import invertnet  # noqa: E402
from invertnet.bench.workloads import _RequiresGrad  # noqa: E402


def _function(width: int, batch_norm: bool) -> nn.Module:
    layer = nn.Linear(width, width)
    return nn.Sequential(layer, nn.BatchNorm1d(width)) if batch_norm else layer


def build_stacks(depth: int, width: int, batch_norm: bool) -> dict[str, nn.Module]:
    """The same couplings (the very modules) under each method available."""
    couplings = [
        invertnet.AdditiveCoupling(_function(width, batch_norm), _function(width, batch_norm))
        for _ in range(depth)
    ]
    stacks: dict[str, nn.Module] = {
        "invertnet": invertnet.ReversibleSequential(*couplings),
        "invertnet keep_input": invertnet.ReversibleSequential(*couplings, keep_input=True),
    }
    if find_spec("revlib") is not None:
        import revlib

        stacks["revlib"] = nn.Sequential(
            _RequiresGrad(),
            revlib.ReversibleSequential(*(m for c in couplings for m in (c.Fm, c.Gm))),
        )
    return stacks


def best_step_cpu_us(
    steps: dict[str, Callable[[], None]], rounds: int, number: int
) -> dict[str, float]:
    """The least thread CPU time of ``number`` steps, over ``rounds`` rounds taken in
    turn by every method, per step, in microseconds."""
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            timer = timeit.Timer(step, timer=time.thread_time)
            best[name] = min(best[name], min(timer.repeat(number=number, repeat=3)) / number)
    return {name: seconds * 1e6 for name, seconds in best.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--width", type=int, default=2, help="features per half")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batch-norm", action="store_true", help="F and G end in BatchNorm1d")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--number", type=int, default=10, help="steps per timing")
    args = parser.parse_args(argv)
    if args.depth < 1 or args.width < 1 or args.batch_size < 2:
        parser.error("expected --depth >= 1, --width >= 1 and --batch-size >= 2")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stacks = build_stacks(args.depth, args.width, args.batch_norm)
    x = torch.randn(args.batch_size, 2 * args.width)

    def step_of(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            model(x).square().mean().backward()

        return step

    steps = {name: step_of(model) for name, model in stacks.items()}
    for step in steps.values():  # gradients allocated, caches warm
        step()
        step()
    per_step = best_step_cpu_us(steps, args.rounds, args.number)
    for name, us in per_step.items():
        print(f"{name:22s} {us / args.depth:8.1f} us per block")
    if "revlib" in per_step:
        extra = (per_step["invertnet"] - per_step["revlib"]) / args.depth
        print(f"invertnet - revlib     {extra:8.1f} us per block")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
