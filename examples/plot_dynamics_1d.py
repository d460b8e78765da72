"""Figure 1 of the Momentum ResNets paper: 1-D dynamics of a ResNet and a Momentum ResNet.

The same residual function drives both networks. A ResNet's layer-to-layer map is a
discretised first-order flow, so trajectories of different inputs never cross and
their order is preserved; a Momentum ResNet is second order (it carries a velocity),
so trajectories can cross: it can represent maps that a ResNet of the same width
cannot. The script plots the position ``x_t`` of a set of 1-D inputs against depth.

Run ``python examples/plot_dynamics_1d.py [--quick] [--out FILE.png]``.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from invertnet import MomentumNet


class Field(nn.Module):
    """A fixed 1-D residual function ``f(x) = -k * x^3 / depth`` (a stable well)."""

    def __init__(self, depth: int, strength: float = 4.0) -> None:
        super().__init__()
        self.scale = strength / depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.scale * x**3 * restoring_gain(x)


def restoring_gain(x: torch.Tensor) -> torch.Tensor:
    # A mild restoring term keeps the cubic from stalling near zero.
    return 1.0 + 0.5 / (1.0 + x**2)


def trajectories(net: MomentumNet, x0: torch.Tensor) -> torch.Tensor:
    """Positions ``x_0 .. x_L`` of every input, recorded with a forward pre-hook."""
    states = []
    handle = net.functions[0].register_forward_pre_hook(
        lambda module, args: states.append(args[0].detach().clone())
    )
    with torch.no_grad():
        final = net(x0)
    handle.remove()
    # The functions repeat one module, so the hook fired once per layer.
    return torch.stack([*states, final]).squeeze(-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer layers and inputs")
    parser.add_argument("--out", default="dynamics_1d.png", help="where to write the figure")
    parser.add_argument("--gamma", type=float, default=0.9, help="momentum of the Momentum ResNet")
    args = parser.parse_args(argv)
    depth, n_inputs = (20, 9) if args.quick else (60, 21)
    x0 = torch.linspace(-2.0, 2.0, n_inputs, dtype=torch.float64).unsqueeze(-1)
    f = Field(depth)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, gamma, title in (
        (axes[0], 0.0, "ResNet ($\\gamma = 0$)"),
        (axes[1], args.gamma, f"Momentum ResNet ($\\gamma = {args.gamma:g}$)"),
    ):
        path = trajectories(MomentumNet([f] * depth, gamma=gamma), x0)
        for i in range(n_inputs):
            ax.plot(range(depth + 1), path[:, i], color=plt.cm.coolwarm(i / (n_inputs - 1)))
        crossings = int((path[-1].argsort() != torch.arange(n_inputs)).sum())
        ax.set(xlabel="depth t", title=f"{title}\n{crossings} inputs change rank")
    axes[0].set_ylabel("$x_t$")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
