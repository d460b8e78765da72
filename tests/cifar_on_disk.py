"""Write tiny datasets in torchvision's on-disk CIFAR layout, for the data and training tests.

torchvision reads ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
and ``cifar-100-python/{train, test, meta}``: pickled dicts holding ``data`` (uint8
rows of 3072 values, channel-major 32x32 images) and ``labels`` (CIFAR-10) or
``fine_labels``/``coarse_labels`` (CIFAR-100).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"


def _batch(rng: np.random.Generator, n: int, num_classes: int, fine: bool) -> dict:
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    batch = {"data": data, "filenames": [f"img{i}.png" for i in range(n)]}
    if fine:
        batch["fine_labels"] = labels
        batch["coarse_labels"] = [v // 5 for v in labels]
    else:
        batch["labels"] = labels
    return batch


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 8, test: int = 12, seed: int = 0) -> dict:
    """Five training batches of ``per_batch`` images and a test batch; returns them."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR10_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i in range(1, 6):
        written[f"data_batch_{i}"] = _batch(rng, per_batch, 10, fine=False)
        _dump(folder / f"data_batch_{i}", written[f"data_batch_{i}"])
    written["test_batch"] = _batch(rng, test, 10, fine=False)
    _dump(folder / "test_batch", written["test_batch"])
    _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return written


def write_cifar100(root: Path, train: int = 20, test: int = 10, seed: int = 0) -> dict:
    """CIFAR-100's ``train``, ``test`` and ``meta`` files; returns the batches."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / CIFAR100_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = {"train": _batch(rng, train, 100, True), "test": _batch(rng, test, 100, True)}
    _dump(folder / "train", written["train"])
    _dump(folder / "test", written["test"])
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )
    return written


def skip_md5_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand in for torchvision's MD5 comparison against the real CIFAR files.

    ``check_integrity(path, md5)`` is the one function both of the dataset's file
    checks go through; the replacement keeps its "is the file there" part and
    drops only the checksum, which no file but the real one can match.
    """
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
