"""Fine-tune a tiny Llama converted to a Momentum Transformer, without storing activations.

A Llama-style decoder is built from a random ``transformers`` configuration (no
download) and its decoder layers are turned into one momentum stage with
``transform_to_momentumnet(..., use_backprop=False)``: training keeps no per-layer
activations, backward rebuilds each layer's input exactly. The model is then
trained on generated token sequences (arithmetic progressions modulo the
vocabulary, so the next token is predictable), and the loss falls.

With ``--lora`` the converted model's weights stay frozen and only LoRA adapters
on the attention's ``q_proj`` and ``v_proj`` train (``peft.get_peft_model`` over
the converted model, as one would over a converted pretrained checkpoint); the
adapters inside the momentum stage get their gradients from the recomputation in
backward.

Memory is counted as the bytes autograd saves for backward during one forward
pass (:class:`invertnet.bench.memory.SavedBytes`, parameters excluded), for the
original model, the original with ``gradient_checkpointing_enable()`` and the
converted model, on the same batch (with ``--lora``, each with the same adapters).
``tools/lora_memory.py`` measures the peak memory of the three at a larger size.

Run ``python examples/finetune_tiny_llama.py [--quick] [--lora] [--out FILE.png]``;
needs ``pip install ".[hf,plot]"`` (``peft``, for ``--lora``, is in the ``hf`` extra).
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


def lora_adapters(model: nn.Module) -> nn.Module:
    """``model`` with LoRA adapters on ``q_proj`` and ``v_proj``, its own weights frozen."""
    try:
        import peft
    except ImportError as exc:
        raise SystemExit(
            f'--lora needs peft ({exc}); install it with: pip install "invertnet[hf]" '
            "(or pip install peft)"
        ) from None
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(model, config)


def saved_mib(model: nn.Module, tokens: torch.Tensor) -> float:
    """MiB that autograd saves for backward in one training forward pass of ``model``."""
    counter = SavedBytes(model)
    model.train()
    with counter.counting():
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    # A memory figure is worth something only if every trainable parameter got its gradient.
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise SystemExit(f"no gradient reached {missing[0]} (and {len(missing) - 1} more)")
    model.zero_grad(set_to_none=True)
    return counter.nbytes / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer steps")
    parser.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters on q_proj and v_proj (peft) over the frozen converted model",
    )
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
    suffix = ""
    if args.lora:
        # Adapters over the converted model: peft finds q_proj and v_proj inside the stage.
        original, checkpointed, model = (lora_adapters(m) for m in (original, checkpointed, model))
        suffix = " + LoRA"
    memory = {
        f"original{suffix}": saved_mib(original, probe),
        f"original, checkpointed{suffix}": saved_mib(checkpointed, probe),
        f"momentum, use_backprop=False{suffix}": saved_mib(model, probe),
    }
    print(f"Llama, {layers} layers, hidden {hidden}, sequence {seq}, batch {batch}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    print(f"  training {sum(p.numel() for p in trainable):,} of {total:,} parameters")
    for name, mib in memory.items():
        print(f"  saved for backward, {name:<36}: {mib:8.2f} MiB")

    # Adapters start at zero (LoRA's B) and learn from a small signal: a larger rate.
    optimizer = torch.optim.AdamW(trainable, lr=1e-2 if args.lora else 3e-3)
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
    title = "LoRA fine-tuning" if args.lora else "Fine-tuning"
    ax1.set(xlabel="step", ylabel="cross-entropy", title=f"{title}, use_backprop=False")
    ax2.barh(list(memory), list(memory.values()))
    ax2.set(xlabel="MiB saved for backward (one forward pass)", title="Activation memory")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
