"""Momentum ResNets are a drop-in replacement: convert a torchvision ResNet and an nn.Transformer.

Each model is converted with :func:`invertnet.transform_to_momentumnet`, keeping its
weights. With ``gamma = 0`` the converted model computes the original's function
(checked below); with ``gamma > 0`` and ``use_backprop=False`` it trains without
storing the activations of the converted stages. The figure compares the bytes
autograd keeps after a training forward pass for the original and converted models.

Run ``python examples/drop_in_replacement.py [--quick] [--out FILE.png]``.
"""

from __future__ import annotations

import argparse
import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torchvision.models import resnet18, resnet34

import invertnet
from invertnet.bench.memory import SavedBytes


def saved_bytes(model: nn.Module, *inputs: torch.Tensor, **kwargs: object) -> int:
    """Bytes autograd saves for backward in one training forward pass, parameters excluded."""
    counter = SavedBytes(model)
    with counter.counting():
        out = model(*inputs, **kwargs)
    out.float().square().mean().backward()
    return counter.nbytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and models")
    parser.add_argument(
        "--out", default="drop_in_replacement.png", help="where to write the figure"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    size, layers = (32, 2) if args.quick else (96, 6)
    results: dict[str, tuple[int, int]] = {}

    for name, build in (("resnet18", resnet18), ("resnet34", resnet34)):
        original = build(weights=None)  # weights="IMAGENET1K_V1" for pretrained ones
        image = torch.randn(2, 3, size, size)
        same = invertnet.transform_to_momentumnet(original, gamma=0.0).eval()
        with torch.no_grad():
            gap = (same(image) - original.eval()(image)).abs().max().item()
        print(f"{name}: gamma=0 conversion reproduces the original (max |diff| {gap:.1e})")
        momentum = invertnet.transform_to_momentumnet(original, gamma=0.9, use_backprop=False)
        results[name] = (
            saved_bytes(original.train(), image),
            saved_bytes(momentum.train(), image),
        )

    transformer = nn.Transformer(
        d_model=64,
        nhead=4,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        dim_feedforward=256,
        dropout=0.0,
        batch_first=True,
    )
    converted = invertnet.transform_to_momentumnet(
        transformer,
        sub_layers=["encoder.layers", "decoder.layers"],
        gamma=0.9,
        use_backprop=False,
        keep_first_layer=False,
    )
    src, tgt = torch.randn(4, 48, 64), torch.randn(4, 40, 64)
    mask = nn.Transformer.generate_square_subsequent_mask(40)
    results[f"Transformer ({layers}+{layers} layers)"] = (
        saved_bytes(copy.deepcopy(transformer), src, tgt, tgt_mask=mask, tgt_is_causal=True),
        saved_bytes(converted, src, tgt, tgt_mask=mask, tgt_is_causal=True),
    )

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(results)
    positions = torch.arange(len(names), dtype=torch.float64)
    for offset, label, column in ((-0.2, "original", 0), (0.2, "Momentum (use_backprop=False)", 1)):
        heights = [results[n][column] / 2**20 for n in names]
        ax.bar(positions + offset, heights, width=0.4, label=label)
    ax.set_xticks(positions, names)
    ax.set(ylabel="MiB saved by autograd in forward", title="Activation memory after conversion")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    for n in names:
        before, after = results[n]
        print(f"{n}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
