"""Shared test fixtures.

The suite runs with ``--import-mode=importlib``, under which test modules cannot
import their neighbours; the helper modules they share are registered here once.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def _register(name: str) -> None:
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_register("cifar_on_disk")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one intra-op thread, restoring the previous count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["native", "tensor-ops"])
def exact_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once with the C loops of the exact iteration and once without."""
    from invertnet.momentum.kernels import native_kernels

    with native_kernels(request.param == "native"):
        yield request.param
