"""Fine-tune a tiny Llama converted to a Momentum Transformer, without storing activations.

A Llama-style decoder is built from a random ``transformers`` configuration (no
download) and its decoder layers are turned into one momentum stage with
``transform_to_momentumnet(..., use_backprop=False)``: training keeps no per-layer
activations, backward rebuilds each layer's input exactly. The model is then
trained on generated token sequences (arithmetic progressions modulo the
vocabulary, so the next token is predictable), and the loss falls.

Memory is counted as the bytes autograd saves for backward during one forward
pass (:class:`invertnet.bench.memory.SavedBytes`, parameters excluded), for the
original model, the original with ``gradient_checkpointing_enable()`` and the
converted model, on the same batch.

Run ``python examples/finetune_tiny_llama.py [--quick] [--out FILE.png]``; needs
``pip install ".[hf,plot]"``.
"""

from __future__ import annotations

import argparse
import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from invertnet import transform_to_momentumnet
from invertnet.bench.memory import SavedBytes


def progressions(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Token sequences ``start, start + step, start + 2 step, ...`` modulo ``vocab``."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 6, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab


def saved_mib(model: nn.Module, tokens: torch.Tensor) -> float:
    """MiB that autograd saves for backward in one training forward pass of ``model``."""
    counter = SavedBytes(model)
    model.train()
    with counter.counting():
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.nbytes / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer steps")
    parser.add_argument(
        "--out", default="finetune_tiny_llama.png", help="where to write the figure"
    )
    args = parser.parse_args(argv)
    layers, hidden, seq, batch, steps = (4, 64, 32, 8, 40) if args.quick else (16, 256, 256, 8, 200)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        use_cache=False,
    )
    original = LlamaForCausalLM(config)
    model = transform_to_momentumnet(
        original, sub_layers="model.layers", keep_first_layer=False, gamma=0.9, use_backprop=False
    )
    generator = torch.Generator().manual_seed(1)
    probe = progressions(batch, seq, config.vocab_size, generator)

    checkpointed = copy.deepcopy(original)
    # transformers 5 renamed gradient_checkpointing_enable (kept, deprecated).
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    (enable or checkpointed.gradient_checkpointing_enable)()
    memory = {
        "original": saved_mib(original, probe),
        "original, checkpointed": saved_mib(checkpointed, probe),
        "momentum, use_backprop=False": saved_mib(model, probe),
    }
    print(f"Llama, {layers} layers, hidden {hidden}, sequence {seq}, batch {batch}")
    for name, mib in memory.items():
        print(f"  saved for backward, {name:<29}: {mib:8.2f} MiB")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(steps):
        tokens = progressions(batch, seq, config.vocab_size, generator)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  step {step:4d}: loss {losses[-1]:.3f}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss fell from {first:.3f} to {last:.3f}")
    if not last < first:
        raise SystemExit("the loss did not fall")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(losses)
    ax1.set(xlabel="step", ylabel="cross-entropy", title="Fine-tuning, use_backprop=False")
    ax2.barh(list(memory), list(memory.values()))
    ax2.set(xlabel="MiB saved for backward (one forward pass)", title="Activation memory")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
