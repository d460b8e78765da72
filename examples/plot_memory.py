"""Figure 2 of the Momentum ResNets paper: training memory against depth.

The same network of MLP blocks is trained for a step at several depths, once with
backpropagation as a ResNet is (``MomentumNet(..., use_backprop=True)``: autograd
stores every layer's activations) and once as a memory-saving Momentum ResNet
(``use_backprop=False``: no per-layer activations, exact reconstruction in
backward). Each configuration runs in a fresh process and its peak activation
memory is measured with invertnet's own benchmark code (:mod:`invertnet.bench`), as
``invertnet bench`` does. The Momentum ResNet's remaining growth with depth is the
transient of returning all layers' parameter gradients at once, about the size of
the parameters; its fixed cost is the exact integer state and its temporaries.

Run ``python examples/plot_memory.py [--quick] [--out FILE.png]``.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from invertnet.bench.measure import Config
from invertnet.bench.runner import Runner

METHODS = {
    "plain": "backpropagation (use_backprop=True)",
    "invertnet": "Momentum ResNet (use_backprop=False)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer depths, smaller batch")
    parser.add_argument("--out", default="memory_vs_depth.png", help="where to write the figure")
    args = parser.parse_args(argv)
    depths, batch = ([2, 4, 8], 64) if args.quick else ([4, 8, 16, 32, 64], 1024)

    memory: dict[str, list[float]] = {m: [] for m in METHODS}
    saved: dict[str, list[float]] = {m: [] for m in METHODS}
    with Runner(timeout_s=300) as runner:
        for method in METHODS:
            for depth in depths:
                config = Config("momentum-mlp", depth, method, batch_size=batch, repeats=1)
                result = runner.run(config)
                if result.error:
                    raise SystemExit(f"{method} at depth {depth} failed: {result.error}")
                memory[method].append((result.peak_bytes or 0) / 2**20)
                saved[method].append((result.saved_bytes or 0) / 2**20)
                print(f"{method:>9} depth {depth:3d}: peak {memory[method][-1]:7.1f} MiB")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method, label in METHODS.items():
        ax1.plot(depths, memory[method], "o-", label=label)
        ax2.plot(depths, saved[method], "o-", label=label)
    ax1.set(xlabel="depth", ylabel="peak activation memory (MiB)", title="Measured peak")
    ax2.set(xlabel="depth", ylabel="MiB saved for backward", title="Saved by autograd in forward")
    for ax in (ax1, ax2):
        ax.legend()
    fig.suptitle(f"MLP blocks of width 256, batch {batch}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
