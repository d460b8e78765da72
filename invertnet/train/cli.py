"""Command line of ``invertnet train`` (also ``python -m invertnet.train``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from invertnet.models import available_models, model_entry
from invertnet.train.config import RunConfig
from invertnet.train.data import DATASETS, available_datasets, default_data_dir
from invertnet.train.errors import TrainingError
from invertnet.train.loop import Summary, run_training
from invertnet.train.recipes import RECIPES

__all__ = ["build_parser", "main", "resolve_config"]

PROG = "invertnet train"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _gamma(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"gamma must be in [0, 1), got {text}")
    return value


def _epilog() -> str:
    lines = ["models:"]
    lines += [f"  {name:<14}{model_entry(name).description}" for name in available_models()]
    lines += ["", "datasets:"]
    lines += [f"  {name:<14}{info.description}" for name, info in DATASETS.items()]
    lines += [
        "",
        "default recipes (each option above overrides its part):",
        f"  resnet32..164, revnet38..164: {RECIPES['memcnn'].describe()}",
        f"  (m)resnet18..152: {RECIPES['momentumnet'].describe()}",
        f"  mresnet_rings: {RECIPES['rings'].describe()}",
        f"  revvit, vit: {RECIPES['vit'].describe()}",
        "",
        "CIFAR images are augmented (random 32x32 crop of the 4-pixel padded image,",
        "horizontal flip) for training only; both sets are normalised per channel.",
        "",
        "results (in --results-dir): checkpoint.pt (after each epoch, written atomically),",
        "metrics.jsonl (one JSON line per epoch), run.json, summary.json. A run resumes",
        "from checkpoint.pt unless --fresh is given.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``invertnet train``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train the models of memcnn's and momentumnet's experiments. Defaults "
            "reproduce each paper's recipe (listed below)."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="model name (listed below)")
    parser.add_argument("dataset", metavar="DATASET", help="cifar10, cifar100 or rings")
    parser.add_argument(
        "--gamma",
        type=_gamma,
        help="momentum term of Momentum ResNets, in [0, 1) (default: 0.9)",
    )
    parser.add_argument(
        "--use-backprop",
        action="store_true",
        help="Momentum ResNets: store activations as usual instead of recomputing them "
        "from the exact inverse in backward (faster, more memory; same function)",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, help="epochs to train")
    length.add_argument(
        "--iterations", type=_positive_int, help="optimisation steps to train (instead of epochs)"
    )
    parser.add_argument("--batch-size", type=_positive_int, help="training batch size")
    parser.add_argument("--lr", type=_positive_float, help="initial learning rate")
    parser.add_argument("--weight-decay", type=_non_negative_float, help="L2 weight decay")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train; auto picks cuda when available (default: auto)",
    )
    parser.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision: float16 with loss scaling on CUDA, bfloat16 on CPU",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation and data (default: 0)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"where datasets are stored or downloaded to (default: $INVERTNET_DATA_DIR "
        f"or {default_data_dir()})",
    )
    parser.add_argument(
        "--no-download", action="store_true", help="fail instead of downloading missing data"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="where checkpoints and metrics go (default: runs/MODEL_DATASET)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard earlier results in the results directory instead of resuming",
    )
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        help="data-loading worker processes (default: 0 for rings, else min(4, CPUs))",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _resolve_device(requested: str) -> str:
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        reason = (
            "this PyTorch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA device is visible (torch.cuda.is_available() is False)"
        )
        raise TrainingError(f"--device cuda was requested but {reason}; use --device cpu or auto")
    if requested == "auto":
        return "cuda" if available else "cpu"
    return requested


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Check the parsed arguments and fill in the recipe's defaults.

    Raises
    ------
    TrainingError
        For an unknown model or dataset (listing the known ones), options that do
        not apply to the model, or a CUDA device that is not there.
    """
    if args.model not in available_models():
        raise TrainingError(
            f"unknown model {args.model!r}; known models: {', '.join(available_models())}"
        )
    if args.dataset not in available_datasets():
        raise TrainingError(
            f"unknown dataset {args.dataset!r}; known datasets: {', '.join(available_datasets())}"
        )
    entry = model_entry(args.model)
    recipe = RECIPES[entry.family]
    model_kwargs: dict[str, object] = {}
    if entry.momentum:
        model_kwargs = {
            "gamma": recipe.gamma if args.gamma is None else args.gamma,
            "use_backprop": bool(args.use_backprop),
        }
    elif args.gamma is not None or args.use_backprop:
        raise TrainingError(
            f"--gamma and --use-backprop apply to Momentum ResNets only; {args.model!r} has "
            "no momentum (use mresnet18..152 or mresnet_rings)"
        )
    if args.epochs is None and args.iterations is None:
        epochs, iterations = recipe.epochs, recipe.iterations
    else:
        epochs, iterations = args.epochs, args.iterations
    workers = args.workers
    if workers is None:
        workers = 0 if args.dataset == "rings" else min(4, os.cpu_count() or 1)
    return RunConfig(
        model=args.model,
        dataset=args.dataset,
        optimizer=recipe.optimizer,
        lr=recipe.lr if args.lr is None else args.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay if args.weight_decay is None else args.weight_decay,
        milestones=recipe.milestones,
        batch_size=recipe.batch_size if args.batch_size is None else args.batch_size,
        epochs=epochs,
        iterations=iterations,
        device=_resolve_device(args.device),
        amp=bool(args.amp),
        seed=args.seed,
        data_dir=args.data_dir if args.data_dir is not None else default_data_dir(),
        results_dir=(
            args.results_dir
            if args.results_dir is not None
            else Path("runs") / f"{args.model}_{args.dataset}"
        ),
        fresh=bool(args.fresh),
        workers=workers,
        download=not args.no_download,
        progress=not args.no_progress,
        model_kwargs=model_kwargs,
    )


def _mib(value: float) -> str:
    """A memory figure, or ``unavailable`` where the platform gave none (NaN)."""
    return "unavailable" if math.isnan(value) else f"{value:.1f} MiB"


def _report(summary: Summary, config: RunConfig) -> str:
    return "\n".join(
        [
            f"finished {config.model} on {config.dataset}: {summary.epochs} epochs, "
            f"{summary.steps} steps",
            f"  final test accuracy: {summary.test_acc:.2f}% (loss {summary.test_loss:.4f})",
            f"  peak memory:         {_mib(summary.peak_memory_mb)} ({summary.memory_kind})",
            f"  wall time:           {summary.wall_time_s:.1f} s this invocation, "
            f"{summary.train_time_s:.1f} s training in total",
            f"  results:             {config.results_dir}",
        ]
    )


def _echo(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # keep the order of stdout and stderr lines in a terminal or log


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``invertnet train``; returns the exit status (0 success, 1 failure, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help, or a malformed option (argparse has printed why)
        return int(exit_.code or 0)
    try:
        config = resolve_config(args)
        summary = run_training(config, echo=_echo)
    except TrainingError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted; rerun the same command to resume\n")
        return 130
    sys.stdout.write(_report(summary, config) + "\n")
    return 0
