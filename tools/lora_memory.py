"""Memory of LoRA fine-tuning: a converted Llama beside the original, plain and checkpointed.

Usage (from the repository root)::

    python tools/lora_memory.py --layers 12 --hidden 512 --seq 256 --batch 2

Builds a ``LlamaForCausalLM`` from a random configuration (no download) and puts
peft LoRA adapters on ``q_proj`` and ``v_proj`` over a frozen base, three ways:

``original``
    the model as it is;
``checkpointed``
    the model with ``gradient_checkpointing_enable()`` (non-reentrant);
``momentum``
    the model converted with ``transform_to_momentumnet(..., keep_first_layer=False,
    gamma=0.9, use_backprop=False)`` before the adapters are added.

Each runs in a fresh Python process (nothing left over from another) and takes
AdamW steps on the adapters (the first two allocate the gradients and the optimizer
state, which are then part of the baseline). Reported per method:

* the peak memory of one training step (forward, loss, backward, optimizer step)
  above the memory in use before it: on the CPU the resident set's high-water
  mark (``VmHWM``) minus the resident set before the step, as
  :class:`invertnet.bench.memory.MemoryProbe` measures it; on CUDA
  ``max_memory_allocated``;
* the bytes autograd saves for backward during the forward pass
  (:class:`invertnet.bench.memory.SavedBytes`, parameters excluded), the cross-check;
* the median step time: on the CPU the process's CPU time (``time.process_time``,
  so that time stolen by other processes on a shared machine does not count), on
  CUDA the wall time. Each method runs in its own process, not interleaved with the
  others: compare the times loosely.

The output ends with a reStructuredText table (``--format rst``, the default) or a
Markdown one (``--format md``). Needs ``pip install "invertnet[hf]"``
(``transformers`` and ``peft``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Use the invertnet of this checkout, also when another one is installed.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

METHODS = ("original", "checkpointed", "momentum")
DESCRIPTIONS = {
    "original": "original + LoRA",
    "checkpointed": "original, gradient_checkpointing_enable() + LoRA",
    "momentum": "converted, use_backprop=False + LoRA",
}
GAMMA = 0.9


def build(method: str, sizes: dict[str, int], seed: int = 0) -> nn.Module:
    """The Llama of ``sizes`` with LoRA adapters, prepared as ``method`` says.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    sizes : dict
        ``layers``, ``hidden``, ``heads``, ``vocab``, ``seq`` and ``rank`` (LoRA's ``r``).
    seed : int
        Seeds the random weights: every method starts from the same model.

    Returns
    -------
    torch.nn.Module
        A ``peft`` model whose only trainable parameters are the adapters.
    """
    import peft
    import transformers

    from invertnet import transform_to_momentumnet

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    torch.manual_seed(seed)
    hidden = sizes["hidden"]
    config = transformers.LlamaConfig(
        vocab_size=sizes["vocab"],
        hidden_size=hidden,
        intermediate_size=(8 * hidden) // 3,
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        num_key_value_heads=max(1, sizes["heads"] // 2),
        max_position_embeddings=sizes["seq"],
        use_cache=False,
    )
    model: nn.Module = transformers.LlamaForCausalLM(config)
    if method == "checkpointed":
        kwargs = {"use_reentrant": False}
        # transformers 5 renamed the method; the old name warns there.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif method == "momentum":
        model = transform_to_momentumnet(
            model,
            sub_layers="model.layers",
            keep_first_layer=False,
            gamma=GAMMA,
            use_backprop=False,
        )
    lora = peft.LoraConfig(
        r=sizes["rank"], lora_alpha=2 * sizes["rank"], target_modules=["q_proj", "v_proj"]
    )
    return peft.get_peft_model(model, lora)


def measure(method: str, sizes: dict[str, int], batch: int, steps: int) -> dict[str, Any]:
    """Measure ``method`` in this process (call it in a fresh one).

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    sizes : dict
        See :func:`build`.
    batch : int
        Sequences per step.
    steps : int
        Timed steps after the measured one.

    Returns
    -------
    dict
        ``peak_bytes``, ``saved_bytes``, ``step_s`` (median), ``trainable`` and
        ``parameters`` (counts), ``loss`` (of the first step), ``memory_method`` and
        ``clock`` (how the step time was taken).
    """
    from invertnet.bench.memory import SavedBytes, probe_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = probe_for(device)
    probe.prepare()
    model = build(method, sizes).to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, sizes["vocab"], (batch, sizes["seq"]), generator=generator)
    tokens = tokens.to(device)
    counter = SavedBytes(model)

    def step(counting: bool = False) -> float:
        if counting:
            with counter.counting():
                loss = model(input_ids=tokens, labels=tokens).loss
        else:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss.item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Two steps allocate the gradients and AdamW's state: model memory, not activations.
    first_loss = step(counting=True)
    step()
    sync()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(f"{method}: adapters without a gradient: {missing[:3]}")
    probe.start()
    step()
    sync()
    peak = probe.peak_bytes()
    probe.finish()
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(steps):
        sync()
        start = clock()
        step()
        sync()
        times.append(clock() - start)
    return {
        "method": method,
        "peak_bytes": peak,
        "saved_bytes": counter.nbytes,
        "step_s": statistics.median(times) if times else float("nan"),
        "trainable": sum(p.numel() for p in trainable),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss": first_loss,
        "memory_method": probe.method,
        "clock": "wall time" if device.type == "cuda" else "process CPU time",
    }


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    return {
        "layers": args.layers,
        "hidden": args.hidden,
        "heads": args.heads,
        "vocab": args.vocab,
        "seq": args.seq,
        "rank": args.rank,
    }


def _run_fresh(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure` ``method`` in a new Python process."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", method, *_passed(args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=os.environ)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _passed(args: argparse.Namespace) -> list[str]:
    options = [*(f"--{k}={v}" for k, v in _sizes(args).items())]
    return [*options, f"--batch={args.batch}", f"--steps={args.steps}"]


def table(results: list[dict[str, Any]], fmt: str = "rst") -> str:
    """The results as a table, with ratios to the original's.

    Parameters
    ----------
    results : list of dict
        From :func:`measure`, the original's first.
    fmt : {"rst", "md"}
        reStructuredText (a simple table) or Markdown.

    Returns
    -------
    str
        The table, one row per method.
    """
    base = results[0]
    header = ["model", "peak MiB", "saved for backward MiB", "step s"]
    rows = []
    for r in results:
        peak = r["peak_bytes"] / 2**20
        saved = r["saved_bytes"] / 2**20
        ratio_peak = r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan")
        ratio_saved = r["saved_bytes"] / base["saved_bytes"]
        rows.append(
            [
                DESCRIPTIONS[r["method"]],
                f"{peak:.1f} ({ratio_peak:.2f}x)",
                f"{saved:.1f} ({ratio_saved:.2f}x)",
                f"{r['step_s']:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    rule = "  ".join("=" * w for w in widths)
    fmt_row = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [rule, fmt_row.format(*header).rstrip(), rule]
    lines += [fmt_row.format(*row).rstrip() for row in rows]
    lines.append(rule)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: measure every method in a fresh process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8, help="LoRA's r")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--format", choices=("rst", "md"), default="rst")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:  # the fresh process of one method
        print(json.dumps(measure(args.one, _sizes(args), args.batch, args.steps)))
        return 0
    results = [_run_fresh(method, args) for method in METHODS]
    first = results[0]
    print(
        f"LlamaForCausalLM (random), {args.layers} layers, hidden {args.hidden}, "
        f"{args.heads} heads, vocabulary {args.vocab}, sequence {args.seq}, batch {args.batch}; "
        f"LoRA r={args.rank} on q_proj, v_proj ({first['trainable']:,} of "
        f"{first['parameters']:,} parameters trained); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"memory: {first['memory_method']}; step time: median {first['clock']}")
    print(table(results, args.format))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
