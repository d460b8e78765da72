"""Soak test: train a small RevNet for many steps and check that memory stays flat.

Every step frees activations in forward and restores them in backward, snapshots
BatchNorm buffers, and records and replays RNG states; anything among these that
leaked would make the resident set grow step after step. The script measures the
peak resident set during step ``--check-step`` and during the last step (``VmHWM``
in ``/proc/self/status``, reset before each by writing 5 to
``/proc/self/clear_refs``), less the resident set before training, and fails (exit
status 1) if the latter exceeds the former by more than ``--tolerance``. It also
counts live tensors, which must not grow either.

Run it as (Linux only)::

    OMP_NUM_THREADS=1 python tools/soak.py --steps 1000

or through pytest, where it is excluded from the default run::

    OMP_NUM_THREADS=1 python -m pytest -m soak
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from invertnet import AdditiveCoupling, InvertibleModuleWrapper  # noqa: E402

CHANNELS = 16


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


def _stable_allocator() -> bool:
    """Make glibc return freed tensor memory to the system at once.

    By default glibc raises its mmap threshold after the first large free, after
    which tensor buffers come from the heap, whose freed pages it keeps: the
    resident set then creeps up by a few MB over hundreds of steps with nothing
    leaked (``malloc_trim`` gives it all back). A fixed threshold of 64 KiB serves
    every tensor buffer from its own mapping, so the resident set follows the
    memory actually in use. Returns whether that was possible (glibc only).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(
        libc.mallopt(m_trim_threshold, 128 * 1024)
    )


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current resident set (Linux).
    Path("/proc/self/clear_refs").write_text("5")


def _live_tensors() -> int:
    gc.collect()
    # issubclass(type(o)) rather than isinstance(o): isinstance reads __class__,
    # which some lazily imported torch objects answer with a deprecation warning.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _branch() -> nn.Module:
    half = CHANNELS // 2
    return nn.Sequential(
        nn.Conv2d(half, half, 3, padding=1),
        nn.BatchNorm2d(half),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Conv2d(half, half, 3, padding=1),
    )


def revnet(depth: int) -> nn.Module:
    """A RevNet: stem, ``depth`` wrapped additive couplings (BatchNorm, dropout), head."""
    blocks = [
        InvertibleModuleWrapper(AdditiveCoupling(_branch()), preserve_rng_state=True)
        for _ in range(depth)
    ]
    return nn.Sequential(
        nn.Conv2d(3, CHANNELS, 3, padding=1),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(CHANNELS, 10),
    )


def soak(steps: int, check_step: int, depth: int, batch: int, size: int) -> dict:
    """Train for ``steps`` steps; return the memory figures at the checkpoints."""
    stable = _stable_allocator()
    torch.manual_seed(0)
    model = revnet(depth)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 10, (batch,))
    checkpoints = sorted({check_step, steps, *range(0, steps + 1, max(steps // 10, 1))} - {0})
    record = []
    gc.collect()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if step in checkpoints:
            _reset_peak()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        if step in checkpoints:
            # Read the peak of this step before counting tensors, which allocates.
            peak, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
            record.append(
                {
                    "step": step,
                    "peak_rss_kib": peak,
                    "rss_kib": rss,
                    "live_tensors": _live_tensors(),
                    "loss": round(loss.item(), 4),
                }
            )
    return {
        "steps": steps,
        "check_step": check_step,
        "depth": depth,
        "batch": batch,
        "size": size,
        "seconds": round(time.perf_counter() - start, 1),
        "baseline_rss_kib": baseline,
        "fixed_mmap_threshold": stable,
        "record": record,
    }


def verdict(result: dict, tolerance: float) -> list[str]:
    """What went wrong (empty if memory stayed flat)."""
    by_step = {r["step"]: r for r in result["record"]}
    early, late = by_step[result["check_step"]], by_step[result["steps"]]
    base = result["baseline_rss_kib"]
    problems = []
    # Training memory is the peak above the resident set before the first step;
    # the whole process's peak would hide a leak behind torch's own footprint.
    early_kib, late_kib = early["peak_rss_kib"] - base, late["peak_rss_kib"] - base
    growth = late_kib / max(early_kib, 1) - 1
    if growth > tolerance:
        problems.append(
            f"peak training memory (peak RSS above the {base} KiB before training) grew by "
            f"{100 * growth:.1f}% from step {early['step']} ({early_kib} KiB) to step "
            f"{late['step']} ({late_kib} KiB), more than {100 * tolerance:.0f}%"
        )
    if late["live_tensors"] > early["live_tensors"]:
        problems.append(
            f"live tensors grew from {early['live_tensors']} at step {early['step']} to "
            f"{late['live_tensors']} at step {late['step']}"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--check-step", type=int, default=10)
    parser.add_argument("--depth", type=int, default=8, help="number of RevNet blocks")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--tolerance", type=float, default=0.05)
    args = parser.parse_args(argv)
    if not 1 <= args.check_step < args.steps:
        parser.error("--check-step must be at least 1 and less than --steps")
    result = soak(args.steps, args.check_step, args.depth, args.batch, args.size)
    result["problems"] = verdict(result, args.tolerance)
    sys.stdout.write(json.dumps(result) + "\n")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
