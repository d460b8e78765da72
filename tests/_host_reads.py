"""Counting the reads of tensor values on the host, which make the host wait for the device.

A :class:`~torch.overrides.TorchFunctionMode` would not see reads made inside
autograd's backward (modes are not active there), so the methods themselves are
patched on :class:`torch.Tensor` for the duration of the block.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator

import torch

#: Tensor methods that return a tensor's value to Python.
HOST_READS = (
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
)


@contextlib.contextmanager
def count_host_reads() -> Iterator[Counter[str]]:
    """Count calls of :data:`HOST_READS` inside the block, by method name."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name: str):
        original = originals[name]

        @functools.wraps(original)
        def read(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
