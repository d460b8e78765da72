"""Measure the floating-point drift of a memory-saving ``Flow`` against plain autograd.

A memory-saving :class:`invertnet.Flow` (``keep_input=False``) rebuilds every
block's input from its output in backward; each inverse rounds, and the next block
down is rebuilt from the rounded value, so the rebuilt inputs drift from the
originals as the flow gets deeper, and the gradients with them. This script
measures both, for a RealNVP-style flow of ``depth`` steps, each an
:class:`~invertnet.ActNorm`, a random :class:`~invertnet.Permutation` and an
:class:`~invertnet.AffineCoupling` (two-sided, scale ``sigmoid(h + 2)``) whose
two conditioners are MLPs ``Linear(32, H)``, activation, ``Linear(H, H)``,
activation, ``Linear(H, 64)``, on 64-dimensional data: scikit-learn's digits
(``load_digits``, shipped with scikit-learn, dequantised and scaled to [0, 1])
when scikit-learn is installed, else a deterministic synthetic data set of the
same shape (``--synthetic`` forces it).

For each depth, dtype, activation and seed it reports, for ``-log_prob(x).mean()``
on one batch (by default the whole data set, 1797 samples) at initialisation
(after ActNorm's data-dependent initialisation; ``--train-steps`` trains first):

* grad: ``max_p ||g_p - ref_p|| / ||ref_p||``, the relative L2 difference
  between the gradient of the memory-saving flow and that of ``keep_input=True``
  (plain autograd, same dtype), for the worst parameter tensor ``p`` (a ReLU that
  a rebuilt input flips shows most in a bias's gradient); the JSON record also
  has the difference of all gradients concatenated (``grad_all``);
* recon: the largest relative reconstruction error over the flow's wrappers,
  ``max|rebuilt - original| / max|original|`` per rebuilt input, read from
  :func:`invertnet.debug_reconstruction`'s report;

for ``keep_every=None`` and for each ``--keep-every N`` (the input of every N-th
block kept; 3 blocks make one step). The figure per cell is the largest over the
seeds. The table is printed in Markdown; ``--json FILE`` also writes every
measurement.

Run ``python tools/flow_drift.py`` (four to six minutes on one CPU thread); ``--help``
lists the options, e.g. ``--depths 8 32 --dtypes float32 --activations relu``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import invertnet
from invertnet import ActNorm, AffineAdapterSigmoid, AffineCoupling, Flow, Permutation

DTYPES = {"float32": torch.float32, "float64": torch.float64}
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
FEATURES = 64


def load_data(n: int, seed: int, synthetic: bool = False) -> tuple[torch.Tensor, str]:
    """``n`` samples of 64 features in float64, and the name of their source.

    Parameters
    ----------
    n : int
        Number of samples (at most 1797 for the digits).
    seed : int
        Seeds the choice of samples and the dequantisation noise.
    synthetic : bool
        Use the synthetic data set even when scikit-learn is installed.

    Returns
    -------
    tuple of torch.Tensor and str
        The ``(n, 64)`` batch and ``"digits"`` or ``"synthetic"``.
    """
    generator = torch.Generator().manual_seed(seed)
    source = "synthetic"
    if not synthetic:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            pass
        else:
            digits = torch.as_tensor(load_digits().data, dtype=torch.float64)
            order = torch.randperm(len(digits), generator=generator)[:n]
            noise = torch.rand(len(order), FEATURES, generator=generator, dtype=torch.float64)
            return (digits[order] + noise) / 17.0, "digits"
    # Correlated, skewed, partly saturated features: a low-rank mix of normals
    # through a softplus, as pixel intensities are.
    mixing = torch.randn(8, FEATURES, generator=generator, dtype=torch.float64)
    latent = torch.randn(n, 8, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(n, FEATURES, generator=generator, dtype=torch.float64)
    return nn.functional.softplus(latent @ mixing + noise - 1.0), source


def conditioner(hidden: int, activation: str) -> nn.Module:
    """An MLP mapping half the features to a scale and a shift for the other half."""
    act = ACTIVATIONS[activation]
    half = FEATURES // 2
    return nn.Sequential(
        nn.Linear(half, hidden),
        act(),
        nn.Linear(hidden, hidden),
        act(),
        nn.Linear(hidden, 2 * half),
    )


def realnvp_blocks(depth: int, hidden: int, activation: str, seed: int) -> list[nn.Module]:
    """``depth`` steps of ActNorm, Permutation and AffineCoupling, in float32."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [
            ActNorm(FEATURES),
            Permutation(FEATURES, generator=generator),
            AffineCoupling(
                conditioner(hidden, activation),
                conditioner(hidden, activation),
                adapter=AffineAdapterSigmoid,
            ),
        ]
    return blocks


def train(blocks: Sequence[nn.Module], data: torch.Tensor, steps: int, seed: int) -> None:
    """Fit the blocks to ``data`` by maximum likelihood: Adam, batches of 256.

    In float32 with plain autograd (``keep_input=True``); ActNorm initialises on
    the first batch.
    """
    flow = Flow(blocks, (FEATURES,), keep_input=True)
    data = data.float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        flow(data[torch.randperm(len(data), generator=generator)[:256]])
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = data[torch.randperm(len(data), generator=generator)[:256]]
        optimizer.zero_grad(set_to_none=True)
        (-flow.log_prob(batch).mean()).backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 100.0)
        optimizer.step()


def parameter_gradients(flow: Flow, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of ``-flow.log_prob(x).mean()`` for each parameter, in float64."""
    flow.zero_grad(set_to_none=True)
    (-flow.log_prob(x).mean()).backward()
    return [p.grad.double() for p in flow.parameters()]


def relative_difference(a: torch.Tensor, reference: torch.Tensor) -> float:
    """``||a - reference|| / ||reference||`` (0 where both are 0)."""
    norm = float(reference.norm())
    diff = float((a - reference).norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def gradient_differences(
    grads: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
) -> tuple[float, float]:
    """The worst parameter tensor's relative difference, and that of all together."""
    worst = max(relative_difference(g, r) for g, r in zip(grads, reference))
    flat = relative_difference(
        torch.cat([g.reshape(-1) for g in grads]), torch.cat([r.reshape(-1) for r in reference])
    )
    return worst, flat


def measure(
    blocks: Sequence[nn.Module], x: torch.Tensor, keep_every: Sequence[int | None]
) -> dict[str, dict[str, float]]:
    """Gradient difference and reconstruction error of each ``keep_every`` setting.

    Parameters
    ----------
    blocks : sequence of torch.nn.Module
        The (initialised) blocks, in the dtype of ``x``.
    x : torch.Tensor
        The batch.
    keep_every : sequence of int or None
        The settings of :class:`~invertnet.Flow`'s ``keep_every`` to measure.

    Returns
    -------
    dict
        ``{str(setting): {"grad": ..., "grad_all": ..., "recon": ..., "rebuilt": ...}}``.
    """
    reference = parameter_gradients(Flow(blocks, (FEATURES,), keep_input=True), x)
    results: dict[str, dict[str, float]] = {}
    for every in keep_every:
        flow = Flow(blocks, (FEATURES,), keep_every=every)
        with invertnet.debug_reconstruction(model=flow, raise_errors=False) as report:
            grads = parameter_gradients(flow, x)
        worst, flat = gradient_differences(grads, reference)
        results[str(every)] = {
            "grad": worst,
            "grad_all": flat,
            "recon": report.max_rel_error,
            "rebuilt": len(report),
        }
    return results


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Every measurement the arguments ask for, and the data's source."""
    settings: list[int | None] = [None, *args.keep_every]
    rows: list[dict[str, Any]] = []
    source = ""
    for depth in args.depths:
        for activation in args.activations:
            for seed in args.seeds:
                data, source = load_data(args.samples, seed, args.synthetic)
                base = realnvp_blocks(depth, args.hidden, activation, seed)
                train(base, data, args.train_steps, seed)
                batch = data[: args.batch]
                for dtype_name in args.dtypes:
                    dtype = DTYPES[dtype_name]
                    blocks = [copy.deepcopy(b).to(dtype) for b in base]
                    results = measure(blocks, batch.to(dtype), settings)
                    rows.append(
                        {
                            "depth": depth,
                            "blocks": len(blocks),
                            "dtype": dtype_name,
                            "activation": activation,
                            "seed": seed,
                            "results": results,
                        }
                    )
    return rows, source


def table(rows: list[dict[str, Any]], keep_every: Sequence[int]) -> str:
    """A Markdown table of the largest figures over the seeds."""
    settings = ["None", *map(str, keep_every)]
    header = "| steps | dtype | activation | " + " | ".join(
        f"keep_every={s}: grad / recon" for s in settings
    )
    lines = [header + " |", "| --- " * (3 + len(settings)) + "|"]
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["depth"], row["dtype"], row["activation"]), []).append(row)
    for (depth, dtype, activation), members in groups.items():
        cells = []
        for s in settings:
            grad = max(m["results"][s]["grad"] for m in members)
            recon = max(m["results"][s]["recon"] for m in members)
            cells.append(f"{grad:.1e} / {recon:.1e}")
        lines.append(f"| {depth} | {dtype} | {activation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 48])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--activations", nargs="+", choices=sorted(ACTIVATIONS), default=["relu", "silu"]
    )
    parser.add_argument(
        "--keep-every",
        type=int,
        nargs="*",
        default=[3, 12],
        help="Flow keep_every settings to measure besides None, in blocks (3 per step)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=1797, help="samples measured on")
    parser.add_argument("--samples", type=int, default=1797, help="size of the data set")
    parser.add_argument(
        "--train-steps", type=int, default=0, help="Adam steps (batch 256) before measuring"
    )
    parser.add_argument("--hidden", type=int, default=64, help="width of the conditioners")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--synthetic", action="store_true", help="do not use scikit-learn")
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args(argv)
    for name in ("depths", "keep_every", "seeds"):
        if any(v < (0 if name == "seeds" else 1) for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} takes positive ints")
    if min(args.batch, args.samples) < 2 or args.hidden < 1 or args.threads < 1:
        parser.error("--batch and --samples must be at least 2, --hidden and --threads 1")
    if args.train_steps < 0:
        parser.error("--train-steps takes a non-negative int")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, source = run(args)
    print(
        f"Flow drift, data: {source}, batch {min(args.batch, args.samples)}, hidden "
        f"{args.hidden}, {args.train_steps} training steps, seeds "
        f"{args.seeds} (largest shown), torch {torch.__version__}, {args.threads} thread(s)\n"
    )
    print(table(rows, args.keep_every))
    if args.json:
        record = {
            "command": " ".join(["python", "tools/flow_drift.py", *(argv or sys.argv[1:])]),
            "data": source,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "args": vars(args),
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=lambda v: None if v is None else str(v))
    worst = max(r["grad"] for row in rows for r in row["results"].values())
    return 0 if math.isfinite(worst) else 1


if __name__ == "__main__":
    sys.exit(main())
