"""The "native" backend: the four phases as fused C loops, on the CPU.

The reference backend costs about ten elementwise ``float64`` passes per phase.
Each pass runs at memory speed, and on one thread for tensors of up to 32768
elements (ATen's grain size), so for cheap functions they, not the functions, set
the cost of ``MomentumNet(use_backprop=False)``. The optional C extension
``invertnet.momentum.backends._native`` (``_native.c``) does each phase in one
loop, vectorised, and gives bit for bit the states the tensor operations give
(the arithmetic is on whole numbers below :math:`2^{50}`, and the one rounding is
the same).

The loops serve CPU tensors of ``float32`` or ``float64`` whose elements lie in
the same order in memory (contiguous, or all ``channels_last``), with functions
that return their input's dtype. :data:`NATIVE` tells whether the extension was
built (it needs a C compiler at installation). The forward step returns the
largest magnitudes it reached as numbers: the range check then reads nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from invertnet.momentum.backends.base import Backend, Peaks, walks
from invertnet.momentum.fixed_point import Constants, MomentumState, largest_magnitude

try:
    import invertnet.momentum.backends._native as _native
except ImportError:  # installed without a C compiler: the reference serves
    _native = None

__all__ = ["NATIVE", "PARALLEL_GRAIN", "NativeBackend"]

#: Whether the C extension is built and importable.
NATIVE: bool = _native is not None

# The dtypes the loops are compiled for (the functions' dtype; the state is float64).
_DTYPES = (torch.float32, torch.float64)

#: Elements per thread below which a loop runs on the calling thread alone: a
#: shorter range does not repay handing it to another thread (tens of
#: microseconds), and the state of a few layers of that size still fits in cache.
PARALLEL_GRAIN = 1 << 18

_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _executor(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads - 1`` workers, the caller being the last thread.

    One per process: a forked child (a DataLoader worker) inherits the parent's
    pool object but not its threads, so it makes its own.
    """
    global _pool
    if _pool is None or _pool[:2] != (os.getpid(), threads):
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown(wait=False)
        _pool = (os.getpid(), threads, ThreadPoolExecutor(threads - 1, "invertnet-kernels"))
    return _pool[2]


def _launch(
    loop: Callable[..., Any], tensors: tuple[torch.Tensor | None, ...], *scalars: object
) -> list[Any]:
    """Run ``loop(*addresses, size, *scalars)`` over the elements of ``tensors``.

    Large tensors are cut into one contiguous range per intra-op thread
    (:func:`torch.get_num_threads`); the loops release the GIL, so the ranges run
    in parallel. A None tensor is passed as the null address. Returns what
    ``loop`` returned for each range.
    """
    size = next(t for t in tensors if t is not None).numel()
    threads = torch.get_num_threads()
    tasks = min(threads, size // PARALLEL_GRAIN)
    bases = [(0, 0) if t is None else (t.data_ptr(), t.element_size()) for t in tensors]
    if tasks <= 1:
        return [loop(*(base for base, _ in bases), size, *scalars)]
    cuts = [size * k // tasks for k in range(tasks + 1)]

    def run(k: int) -> Any:
        addresses = (base + cuts[k] * width for base, width in bases)
        return loop(*addresses, cuts[k + 1] - cuts[k], *scalars)

    pending = [_executor(threads).submit(run, k) for k in range(1, tasks)]
    return [run(0), *(future.result() for future in pending)]


def _is_double(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


class NativeBackend(Backend):
    """The C loops of ``_native.c``, on the CPU, where the extension is built."""

    name = "native"

    def serves(
        self,
        dtype: torch.dtype,
        doubles: tuple[torch.Tensor, ...],
        typed: tuple[torch.Tensor, ...] = (),
    ) -> bool:
        if _native is None or dtype not in _DTYPES or doubles[0].device.type != "cpu":
            return False
        # One dtype for the functions' inputs and outputs: each loop is compiled for one.
        return walks(doubles, typed, (dtype,))

    def advance(
        self, c: Constants, state: MomentumState, y: torch.Tensor, residual: bool, split: bool
    ) -> tuple[torch.Tensor, Peaks]:
        assert _native is not None
        out = torch.empty_like(state.position, dtype=c.fixed.dtype)
        parts = _launch(
            _native.advance,
            (state.store.head, state.velocity, state.position, y.detach(), out),
            float(c.n), float(c.d), c.mix_units, c.fixed.unit, residual, split,
            _is_double(y.dtype),
        )  # fmt: skip
        # One range but for large tensors; else the largest of each magnitude.
        peaks = parts[0] if len(parts) == 1 else map(largest_magnitude, zip(*parts))
        return out, Peaks(*peaks)

    def retreat_position(
        self, c: Constants, state: MomentumState, grad_velocity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert _native is not None
        out = torch.empty_like(state.position, dtype=c.fixed.dtype)
        grad_y = torch.empty_like(out)
        _launch(
            _native.retreat_position,
            (state.velocity, state.position, grad_velocity, out, grad_y),
            c.fixed.unit, c.mix, _is_double(out.dtype),
        )  # fmt: skip
        return out, grad_y

    def retreat_velocity(
        self, c: Constants, state: MomentumState, y: torch.Tensor, residual: bool, split: bool
    ) -> None:
        assert _native is not None
        _launch(
            _native.retreat_velocity,
            (state.store.head, state.velocity, state.position, y.detach()),
            float(c.n), float(c.d), c.mix_units, residual, split, _is_double(y.dtype),
        )  # fmt: skip

    def backpropagate(
        self,
        c: Constants,
        grad_x: torch.Tensor,
        grad_velocity: torch.Tensor,
        grad_input: torch.Tensor | None,
        residual: bool,
    ) -> None:
        assert _native is not None
        _launch(
            _native.backpropagate,
            (grad_x, grad_velocity, grad_input),
            c.keep, c.mix, residual, _is_double(c.fixed.dtype),
        )  # fmt: skip
