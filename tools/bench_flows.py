"""Train the same Glow-like flow with invertnet and with the flow libraries, side by side.

The flow: a squeeze (3x32x32 -> 12x16x16), then K steps of ActNorm, a 1x1
convolution and a two-sided affine coupling whose two networks are
conv3x3-ReLU-conv1x1-ReLU-conv3x3 with ``--hidden`` channels and scale
``sigmoid(h + 2)``. Methods:

* ``invertnet-keep``: ``invertnet.Flow(..., keep_input=True)``, plain autograd;
* ``invertnet``: ``invertnet.Flow(..., keep_input=False)``, memory-saving;
* ``freia``: FrEIA's ``SequenceINN`` of ``IRevNetDownsampling``, ``ActNorm``,
  ``Fixed1x1Conv`` (FrEIA has no learned 1x1 convolution) and
  ``GLOWCouplingBlock`` (its scale is ``exp`` of a soft-clamped ``h``);
* ``normflows``: normflows' ``Squeeze``, ``ActNorm``, ``Invertible1x1Conv``
  (LU) and two one-sided ``AffineCouplingBlock`` (``channel``, then
  ``channel_inv``, which together make one two-sided coupling).

A step is ``loss = -log_prob(x).mean()`` and ``loss.backward()`` (gradients
set to ``None`` before it; no optimizer, the same for every method).

Time: for each depth one fresh process builds every method, warms each up, then
runs ``--repeats`` rounds of one step per method, the methods' order rotating from
round to round, so that a slow spell of a shared machine hits them all alike; the
median per method is reported. Steps are timed by the CPU time of the process
(``--clock cpu``, the default), which a shared machine's other processes do not
inflate as they do wall time; with ``--threads 1`` it is the step's compute time.
Memory: a fresh process per method and depth reads the peak resident set of one
step above the resident set before it (after a warm-up step has allocated the
gradients), with the helpers of
:mod:`invertnet.bench.memory`, and counts the bytes the forward pass saves for
backward (:class:`invertnet.bench.memory.SavedBytes`) as a cross-check.

Run ``python tools/bench_flows.py [--depths 8 16 32 64] [--json FILE]``; ``--help``
lists the options. FrEIA and normflows are optional (``pip install FrEIA
normflows``, or ``pip install -e ".[flow-peers]"``); a method whose library is
missing is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import invertnet
from invertnet.bench.memory import SavedBytes, probe_for

METHODS = ("invertnet-keep", "invertnet", "freia", "normflows")
# "cpu" (the default) is the CPU time of the process: on a shared machine, time spent
# waiting for a core while another process runs is not counted, as wall time is.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
PEERS = ("freia", "normflows")
_LIBRARY = {"freia": "FrEIA", "normflows": "normflows"}


def available(method: str) -> bool:
    library = _LIBRARY.get(method)
    return library is None or importlib.util.find_spec(library) is not None


def subnet(c_in: int, c_out: int, hidden: int) -> nn.Module:
    """Glow's coupling network: conv3x3, ReLU, conv1x1, ReLU, conv3x3."""
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(),
        nn.Conv2d(hidden, c_out, 3, padding=1),
    )


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    d = z[0].numel()
    return -0.5 * z.flatten(1).square().sum(1) - 0.5 * d * math.log(2 * math.pi)


Model = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]


def build_invertnet(depth: int, shape: tuple[int, int, int], hidden: int, keep: bool) -> Model:
    c = 4 * shape[0]
    blocks: list[nn.Module] = [invertnet.Squeeze()]
    for _ in range(depth):
        blocks += [
            invertnet.ActNorm(c),
            invertnet.InvertibleConv1x1(c),
            invertnet.AffineCoupling(
                subnet(c // 2, c, hidden),
                subnet(c // 2, c, hidden),
                adapter=invertnet.AffineAdapterSigmoid,
            ),
        ]
    flow = invertnet.Flow(blocks, shape, keep_input=keep)
    return flow, lambda x: -flow.log_prob(x).mean()


def build_freia(depth: int, shape: tuple[int, int, int], hidden: int) -> Model:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    c = 4 * shape[0]
    inn = Ff.SequenceINN(*shape)
    inn.append(Fm.IRevNetDownsampling)
    for _ in range(depth):
        rotation = torch.linalg.qr(torch.randn(c, c))[0]
        inn.append(Fm.ActNorm)
        inn.append(Fm.Fixed1x1Conv, M=rotation)
        inn.append(
            Fm.GLOWCouplingBlock,
            subnet_constructor=lambda i, o: subnet(i, o, hidden),
            clamp=2.0,
        )

    def loss(x: torch.Tensor) -> torch.Tensor:
        z, log_det = inn(x)
        return -(standard_normal_log_prob(z) + log_det).mean()

    return inn, loss


def build_normflows(depth: int, shape: tuple[int, int, int], hidden: int) -> Model:
    import normflows as nf

    c = 4 * shape[0]
    data_to_base: list[nn.Module] = [nf.flows.Squeeze()]
    for _ in range(depth):
        data_to_base += [
            nf.flows.ActNorm((c, 1, 1)),
            nf.flows.Invertible1x1Conv(c, use_lu=True),
            nf.flows.AffineCouplingBlock(subnet(c // 2, c, hidden), scale_map="sigmoid"),
            nf.flows.AffineCouplingBlock(
                subnet(c // 2, c, hidden), scale_map="sigmoid", split_mode="channel_inv"
            ),
        ]
    latent = (c, shape[1] // 2, shape[2] // 2)
    base = nf.distributions.DiagGaussian(latent, trainable=False)
    # normflows lists its flows from base to data; training runs them inverted.
    model = nf.NormalizingFlow(base, list(reversed(data_to_base)))
    return model, model.forward_kld


def build(method: str, depth: int, shape: tuple[int, int, int], hidden: int, seed: int) -> Model:
    torch.manual_seed(seed)
    if method == "invertnet-keep":
        return build_invertnet(depth, shape, hidden, keep=True)
    if method == "invertnet":
        return build_invertnet(depth, shape, hidden, keep=False)
    if method == "freia":
        return build_freia(depth, shape, hidden)
    if method == "normflows":
        return build_normflows(depth, shape, hidden)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def train_step(model: Model, x: torch.Tensor, counter: SavedBytes | None = None) -> float:
    module, loss_fn = model
    for p in module.parameters():
        p.grad = None
    if counter is None:
        loss = loss_fn(x)
    else:
        with counter.counting():
            loss = loss_fn(x)
    loss.backward()
    return loss.item()


def batch(args: argparse.Namespace) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed + 1)
    return torch.rand((args.batch, *args.shape), generator=generator) - 0.5


# -- workers (run in fresh processes) ---------------------------------------------


def worker_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak activation memory and saved bytes of one step of one method at one depth."""
    (method,) = args.methods
    (depth,) = args.depths
    probe = probe_for(torch.device("cpu"))
    probe.prepare()
    model = build(method, depth, args.shape, args.hidden, args.seed)
    x = batch(args)
    counter = SavedBytes(model[0])
    train_step(model, x, counter)  # initialises ActNorm, allocates the gradients
    train_step(model, x)
    probe.start()
    train_step(model, x)
    peak = probe.peak_bytes()
    probe.finish()
    return {
        "method": method,
        "depth": depth,
        "peak_bytes": peak,
        "saved_bytes": counter.nbytes,
    }


def worker_timing(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median step time of every method at one depth, their steps interleaved."""
    (depth,) = args.depths
    x = batch(args)
    models = {m: build(m, depth, args.shape, args.hidden, args.seed) for m in args.methods}
    for model in models.values():
        for _ in range(1 + args.warmup):
            train_step(model, x)
    times: dict[str, list[float]] = {m: [] for m in models}
    order = list(models)
    clock = CLOCKS[args.clock]
    for r in range(args.repeats):
        for method in order[r % len(order) :] + order[: r % len(order)]:
            start = clock()
            train_step(models[method], x)
            times[method].append(clock() - start)
    return [
        {"method": m, "depth": depth, "median_s": statistics.median(t), "times_s": t}
        for m, t in times.items()
    ]


def run_worker(kind: str, args: argparse.Namespace, methods: list[str], depth: int) -> Any:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--methods",
        *methods,
        "--depths",
        str(depth),
        "--batch",
        str(args.batch),
        "--shape",
        *map(str, args.shape),
        "--hidden",
        str(args.hidden),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--clock",
        args.clock,
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"worker {kind} {methods} depth {depth} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    header = (
        f"Glow-like flow, {args.shape[0]}x{args.shape[1]}x{args.shape[2]}, batch {args.batch}, "
        f"hidden {args.hidden}; torch {torch.__version__}, "
        f"{args.threads or torch.get_num_threads()} threads, {platform.machine()}"
    )
    method = (
        f"time: median {args.clock} time of interleaved steps (forward + backward); memory: "
        "peak RSS of a step above the RSS before it, fresh process each"
    )
    columns = (
        f"{'depth':>5}  {'method':<15} {'step time':>10} {'vs best peer':>13} "
        f"{'act. memory':>12} {'vs best peer':>13} {'saved':>10}"
    )
    lines = [header, method, "", columns]
    for depth in sorted({r["depth"] for r in rows}):
        here = [r for r in rows if r["depth"] == depth]
        peers = [r for r in here if r["method"] in PEERS]
        best_time = min((r["median_s"] for r in peers), default=None)
        best_memory = min((r["peak_bytes"] for r in peers), default=None)
        for r in here:
            t_ratio = f"{r['median_s'] / best_time:.2f}x" if best_time else "-"
            m_ratio = f"{r['peak_bytes'] / best_memory:.2f}x" if best_memory else "-"
            lines.append(
                f"{depth:>5}  {r['method']:<15} {1e3 * r['median_s']:>8.1f}ms {t_ratio:>13} "
                f"{r['peak_bytes'] / 2**20:>9.1f} MB {m_ratio:>13} "
                f"{r['saved_bytes'] / 2**20:>7.1f} MB"
            )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--depths", type=int, nargs="+", help="default 8 16 32 64")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"))
    parser.add_argument("--hidden", type=int, default=64, help="channels of the coupling networks")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="time steps by the process's CPU time (default; robust on a shared machine, "
        "best with --threads 1) or by wall time",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-memory", action="store_true", help="measure time only")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument(
        "--quick", action="store_true", help="batch 4, 16x16, 2 repeats, depths 2 and 4"
    )
    parser.add_argument("--worker", choices=["memory", "timing"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.shape, args.repeats, args.warmup = 4, [3, 16, 16], 2, 1
    if args.depths is None:
        args.depths = [2, 4] if args.quick else [8, 16, 32, 64]
    args.shape = tuple(args.shape)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker == "memory":
        print(json.dumps(worker_memory(args)))
        return
    if args.worker == "timing":
        print(json.dumps(worker_timing(args)))
        return
    methods = [m for m in args.methods if available(m)]
    for m in sorted(set(args.methods) - set(methods)):
        print(f"skipping {m}: {_LIBRARY[m]} is not installed", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for depth in args.depths:
        timing = {r["method"]: r for r in run_worker("timing", args, methods, depth)}
        for method in methods:
            row = dict(timing[method])
            if args.skip_memory:
                row.update(peak_bytes=0, saved_bytes=0)
            else:
                row.update(run_worker("memory", args, [method], depth))
            rows.append(row)
            print(
                f"depth {depth:>3} {method:<15} {1e3 * row['median_s']:8.1f} ms "
                f"{row['peak_bytes'] / 2**20:8.1f} MB",
                file=sys.stderr,
                flush=True,
            )
    print(report(rows, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
