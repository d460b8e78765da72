"""Datasets of the training command: CIFAR-10, CIFAR-100 and the nested rings."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from invertnet._optional import require
from invertnet.train.errors import TrainingError

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetUnavailableError",
    "LoadedData",
    "available_datasets",
    "default_data_dir",
    "load_dataset",
    "make_rings",
]


class DatasetUnavailableError(TrainingError):
    """The dataset is not on disk and could not be downloaded."""


@dataclass(frozen=True)
class LoadedData:
    """A dataset ready for training.

    Attributes
    ----------
    train, test : torch.utils.data.Dataset
        ``(input, label)`` pairs; only ``train`` is augmented.
    num_classes : int
        Number of labels.
    input_kind : str
        ``'image'`` or ``'points'``, matched against the model's.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_kind: str


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset the training command knows.

    Attributes
    ----------
    name : str
        Command-line name.
    description : str
        One line for ``--help``.
    load : callable
        ``load(data_dir, download, seed)`` returns :class:`LoadedData`.
    input_kind : str
        ``'image'`` or ``'points'``, known before loading.
    """

    name: str
    description: str
    load: Callable[[Path, bool, int], LoadedData]
    input_kind: str = "image"


def default_data_dir() -> Path:
    """``$INVERTNET_DATA_DIR``, else ``~/.cache/invertnet/datasets``."""
    env = os.environ.get("INVERTNET_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "invertnet" / "datasets"


# Per-channel statistics of the training images (computed over the 50,000 images).
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}


def _cifar_transforms(name: str) -> tuple[Callable, Callable]:
    transforms = require("torchvision.transforms", "train", "loading CIFAR")

    mean, std = _CIFAR_STATS[name]
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    # Augmentation (random crop with 4-pixel padding, horizontal flip) is for training
    # only: the test set is evaluated on the images as they are.
    train = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *normalize]
    )
    return train, transforms.Compose(normalize)


def _load_cifar(name: str, data_dir: Path, download: bool) -> LoadedData:
    datasets = require("torchvision.datasets", "train", "loading CIFAR")

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    train_tf, test_tf = _cifar_transforms(name)
    expected = data_dir / _CIFAR_FOLDERS[name]

    def build(train: bool, transform: Callable, allow_download: bool) -> Dataset:
        return cls(str(data_dir), train=train, transform=transform, download=allow_download)

    try:
        train_set = build(True, train_tf, False)
    except RuntimeError:
        if not download:
            raise DatasetUnavailableError(
                f"{name} was not found (or is incomplete) at {expected} and downloading is off; "
                f"extract {_CIFAR_URLS[name]} into {data_dir} or pass another --data-dir"
            ) from None
        try:
            train_set = build(True, train_tf, True)
        except (OSError, RuntimeError) as failed:
            raise DatasetUnavailableError(
                f"{name} was not found at {expected} and could not be downloaded "
                f"({type(failed).__name__}: {failed}); extract {_CIFAR_URLS[name]} into "
                f"{data_dir} or pass another --data-dir"
            ) from None
    test_set = build(False, test_tf, False)
    return LoadedData(train_set, test_set, len(train_set.classes), "image")


def make_rings(
    points_per_ring: int, num_rings: int = 4, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the nested-rings problem of the Momentum ResNets paper.

    Ring ``k`` (from 0) holds points at radius ``3 * (0.5 * (k + 1) + 0.2 * u)``,
    ``u`` uniform in ``[0, 1)``, at uniform angles; rings alternate between labels 0
    and 1, so no straight line, and no continuous deformation of the plane at small
    steps, separates the classes.

    Parameters
    ----------
    points_per_ring : int
        Points sampled on each ring.
    num_rings : int
        Number of rings.
    generator : torch.Generator, optional
        Source of randomness.

    Returns
    -------
    points : torch.Tensor
        ``(num_rings * points_per_ring, 2)`` float32.
    labels : torch.Tensor
        ``(num_rings * points_per_ring,)`` int64 in ``{0, 1}``.

    Examples
    --------
    >>> x, y = make_rings(100, generator=torch.Generator().manual_seed(0))
    >>> x.shape, y.unique().tolist()
    (torch.Size([400, 2]), [0, 1])
    """
    if points_per_ring < 1 or num_rings < 1:
        raise ValueError(
            f"points_per_ring and num_rings must be >= 1, got {points_per_ring} and {num_rings}"
        )
    points, labels = [], []
    for k in range(num_rings):
        radius = 3.0 * (0.5 * (k + 1) + 0.2 * torch.rand(points_per_ring, generator=generator))
        angle = 2.0 * math.pi * torch.rand(points_per_ring, generator=generator)
        points.append(torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1))
        labels.append(torch.full((points_per_ring,), k % 2, dtype=torch.int64))
    return torch.cat(points), torch.cat(labels)


#: Points per ring in the training and test sets of the ``rings`` dataset.
RINGS_TRAIN_PER_RING = 1000
RINGS_TEST_PER_RING = 250


def _load_rings(data_dir: Path, download: bool, seed: int) -> LoadedData:
    generator = torch.Generator().manual_seed(seed)
    train = TensorDataset(*make_rings(RINGS_TRAIN_PER_RING, generator=generator))
    test = TensorDataset(*make_rings(RINGS_TEST_PER_RING, generator=generator))
    return LoadedData(train, test, 2, "points")


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10",
        "CIFAR-10 through torchvision (50,000/10,000 images, 10 classes)",
        lambda root, download, seed: _load_cifar("cifar10", root, download),
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        "CIFAR-100 through torchvision (50,000/10,000 images, 100 classes)",
        lambda root, download, seed: _load_cifar("cifar100", root, download),
    ),
    "rings": DatasetInfo(
        "rings",
        f"nested rings, generated in process ({4 * RINGS_TRAIN_PER_RING}/"
        f"{4 * RINGS_TEST_PER_RING} 2-D points, 2 classes)",
        _load_rings,
        input_kind="points",
    ),
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(DATASETS)


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True, seed: int = 0
) -> LoadedData:
    """Load a dataset by name.

    Parameters
    ----------
    name : str
        One of :func:`available_datasets`.
    data_dir : path, optional
        Where the CIFAR folders are (or will be downloaded); defaults to
        :func:`default_data_dir`.
    download : bool
        Download a missing CIFAR dataset.
    seed : int
        Seed of the generated ``rings`` points.

    Returns
    -------
    LoadedData
        Training and test sets.

    Raises
    ------
    ValueError
        If ``name`` is unknown; the message lists the known names.
    DatasetUnavailableError
        If the data is neither on disk nor downloadable; the message names the
        expected path.
    """
    try:
        info = DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(available_datasets())}"
        ) from None
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    return info.load(root, download, seed)
