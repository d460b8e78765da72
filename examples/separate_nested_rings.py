"""Figure 5 of the Momentum ResNets paper: separating nested rings.

Points on four nested rings carry alternating labels. Both networks below act on
the 2-D points themselves (15 residual tanh-MLP layers) and end in a linear
classifier, so the layers must move the rings until a straight line separates them.
A ResNet with small steps is a continuous deformation of the plane and cannot pull a
ring through its neighbour: it gets there only by squashing the plane onto curves
with large steps. A Momentum ResNet, being second order, carries points past each
other with its velocity. The script trains both (with exact, activation-free
backward) and plots where each sends the test points, with its test accuracy.

Run ``python examples/separate_nested_rings.py [--quick] [--out FILE.png]``.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from invertnet.models.rings import RingsMomentumNet
from invertnet.train.data import make_rings


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        for batch in torch.randperm(len(x)).split(256):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and epochs")
    parser.add_argument("--out", default="nested_rings.png", help="where to write the figure")
    parser.add_argument("--gamma", type=float, default=0.9, help="momentum of the Momentum ResNet")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    per_ring, epochs = (200, 8) if args.quick else (1000, 20)
    x_train, y_train = make_rings(per_ring, generator=generator)
    x_test, y_test = make_rings(per_ring // 4, generator=generator)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    axes[0].scatter(*x_test.T, c=y_test, cmap="coolwarm", s=6)
    axes[0].set(title="input: nested rings", aspect="equal")
    for ax, gamma, name in ((axes[1], 0.0, "ResNet"), (axes[2], args.gamma, "Momentum ResNet")):
        model = RingsMomentumNet(num_classes=2, gamma=gamma)
        train(model, x_train, y_train, epochs)
        with torch.no_grad():
            features = model.flow(x_test)
            accuracy = (model.fc(features).argmax(1) == y_test).float().mean().item()
        ax.scatter(*features.T, c=y_test, cmap="coolwarm", s=6)
        ax.set(title=f"{name} ($\\gamma$ = {gamma:g}) output\ntest accuracy {accuracy:.1%}")
        print(f"{name}: test accuracy {accuracy:.3f}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
