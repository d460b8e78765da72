"""The settings of one training run, resolved from the command line and the recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunConfig"]


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; defaults come from :mod:`invertnet.train.recipes`.

    Attributes
    ----------
    model, dataset : str
        Registry names.
    model_kwargs : dict
        Extra model arguments (``gamma``, ``use_backprop`` for Momentum ResNets).
    optimizer : str
        ``'sgd'``, ``'adam'`` or ``'adamw'``.
    lr, momentum, weight_decay : float
        Optimiser settings.
    milestones : tuple of float
        Fractions of training after which the learning rate is divided by 10.
    batch_size : int
        Training batch size.
    epochs, iterations : int or None
        Length of training; exactly one is set.
    device : str
        ``'cpu'`` or ``'cuda'`` (already resolved from ``'auto'``).
    amp : bool
        Mixed precision (float16 on CUDA, bfloat16 on CPU).
    seed : int
        Seed of initialisation, data order and augmentation.
    data_dir, results_dir : pathlib.Path
        Where the data is and where results go.
    fresh : bool
        Discard earlier results in ``results_dir``.
    workers : int
        Data-loading worker processes.
    download : bool
        Download a missing CIFAR dataset.
    progress : bool
        Show a progress bar.
    """

    model: str
    dataset: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    milestones: tuple[float, ...]
    batch_size: int
    epochs: int | None
    iterations: int | None
    device: str
    amp: bool
    seed: int
    data_dir: Path
    results_dir: Path
    fresh: bool = False
    workers: int = 0
    download: bool = True
    progress: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-compatible values."""
        out = asdict(self)
        out["data_dir"] = str(self.data_dir)
        out["results_dir"] = str(self.results_dir)
        out["milestones"] = list(self.milestones)
        return out
