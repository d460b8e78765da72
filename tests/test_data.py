"""Datasets of the training command: the real torchvision CIFAR loading path, and the rings."""

from __future__ import annotations

import urllib.error

import cifar_on_disk as disk
import numpy as np
import pytest
import torch

from invertnet.train.data import (
    DatasetUnavailableError,
    available_datasets,
    load_dataset,
    make_rings,
)

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)


def _normalised(row: np.ndarray) -> torch.Tensor:
    image = torch.from_numpy(row.reshape(3, 32, 32).astype(np.float32) / 255.0)
    return (image - CIFAR10_MEAN) / CIFAR10_STD


def test_cifar10_loads_the_written_files(tmp_path, monkeypatch):
    disk.skip_md5_check(monkeypatch)
    written = disk.write_cifar10(tmp_path, per_batch=8, test=12)
    data = load_dataset("cifar10", tmp_path, download=False)
    assert (len(data.train), len(data.test), data.num_classes) == (40, 12, 10)
    assert data.input_kind == "image"
    train_labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"]["labels"]]
    assert [data.train[i][1] for i in range(40)] == train_labels
    # The test set is normalised and nothing else: every item equals its image exactly.
    test_rows = written["test_batch"]["data"]
    for i in range(12):
        image, label = data.test[i]
        assert label == written["test_batch"]["labels"][i]
        torch.testing.assert_close(image, _normalised(test_rows[i]))


def test_cifar10_augments_training_images_only(tmp_path, monkeypatch):
    disk.skip_md5_check(monkeypatch)
    written = disk.write_cifar10(tmp_path, per_batch=8, test=12)
    data = load_dataset("cifar10", tmp_path, download=False)
    plain = _normalised(written["data_batch_1"]["data"][0])
    torch.manual_seed(0)
    draws = [data.train[0][0] for _ in range(20)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    # Random crops of the padded image and flips: most draws differ from the plain image,
    # and the draws differ among themselves.
    assert sum(not torch.equal(d, plain) for d in draws) >= 10
    assert len({d.sum().item() for d in draws}) > 1
    # Each draw is a crop of the (normalised, zero-padded) image, possibly flipped.
    raw = torch.from_numpy(written["data_batch_1"]["data"][0].reshape(3, 32, 32).astype(np.float32))
    raw = torch.nn.functional.pad(raw / 255.0, (4, 4, 4, 4))
    for d in draws:
        pixels = d * CIFAR10_STD + CIFAR10_MEAN
        matches = [
            torch.allclose(pixels, img[:, r : r + 32, c : c + 32], atol=1e-5)
            for img in (raw, raw.flip(-1))
            for r in range(9)
            for c in range(9)
        ]
        assert any(matches)
    assert all(torch.equal(data.test[0][0], data.test[0][0]) for _ in range(3))


def test_cifar100_layout_and_fine_labels(tmp_path, monkeypatch):
    disk.skip_md5_check(monkeypatch)
    written = disk.write_cifar100(tmp_path, train=20, test=10)
    data = load_dataset("cifar100", tmp_path, download=False)
    assert (len(data.train), len(data.test), data.num_classes) == (20, 10, 100)
    assert [data.test[i][1] for i in range(10)] == written["test"]["fine_labels"]
    assert data.train[3][0].shape == (3, 32, 32)


def test_missing_cifar_without_download_names_the_expected_path(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar10", tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message


def test_failed_download_names_the_expected_path(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("cifar100", tmp_path, download=True)
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "could not be downloaded" in message and "unreachable" in message


def test_corrupt_cifar_file_is_reported(tmp_path):
    # With the real checksum check in place, files that are not the real CIFAR fail it.
    disk.write_cifar10(tmp_path)
    with pytest.raises(DatasetUnavailableError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path, download=False)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    for name in available_datasets():
        assert name in str(info.value)
    assert set(available_datasets()) == {"cifar10", "cifar100", "rings"}


def test_rings_geometry_and_labels():
    x, y = make_rings(300, generator=torch.Generator().manual_seed(3))
    assert x.shape == (1200, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    radius = x.norm(dim=1)
    for k in range(4):
        ring = radius[300 * k : 300 * (k + 1)]
        low, high = 3 * 0.5 * (k + 1), 3 * (0.5 * (k + 1) + 0.2)
        assert ring.min() >= low - 1e-5 and ring.max() <= high + 1e-5
        assert torch.all(y[300 * k : 300 * (k + 1)] == k % 2)
    # Points go all the way round each ring.
    angles = torch.atan2(x[:, 1], x[:, 0])
    assert angles.min() < -3.0 and angles.max() > 3.0


def test_rings_dataset_is_generated_reproducibly():
    a = load_dataset("rings", seed=5)
    b = load_dataset("rings", seed=5)
    c = load_dataset("rings", seed=6)
    assert (len(a.train), len(a.test), a.num_classes, a.input_kind) == (4000, 1000, 2, "points")
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert not torch.equal(a.train.tensors[0][:250], a.test.tensors[0][:250])


def test_make_rings_rejects_empty_rings():
    with pytest.raises(ValueError, match="points_per_ring"):
        make_rings(0)
