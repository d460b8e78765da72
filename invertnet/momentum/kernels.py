"""Fused CPU loops for the exact momentum iteration, where they apply.

The exact iteration of :mod:`invertnet.momentum.exact` costs, in tensor
operations, about ten elementwise ``float64`` passes per layer forward and as many
in backward. Each pass runs at memory speed, and on one thread for tensors of up
to 32768 elements (ATen's grain size), so for cheap functions they, not the
functions, set the cost of ``MomentumNet(use_backprop=False)``. The optional C
extension ``invertnet.momentum._kernels`` does each phase (a forward step; a
backward step before and after the function is evaluated; the gradient update)
in one loop, vectorised, and gives bit for bit the states the tensor operations
give (the arithmetic is on whole numbers below :math:`2^{50}`, and the one
rounding is the same).

The loops serve CPU tensors of ``float32`` or ``float64`` whose elements lie in
the same order in memory (contiguous, or all ``channels_last``); everything else
(CUDA, half precision, other layouts, the rare steps that need the split form of
the product) takes the tensor operations, which remain the reference.
:data:`NATIVE` tells whether the extension was built (it needs a C compiler at
installation); :func:`native_kernels` turns the loops off, to compare or debug.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

try:
    from invertnet.momentum import _kernels as _native
except ImportError:  # installed without a C compiler: the tensor operations serve
    _native = None

__all__ = ["NATIVE", "native_kernels"]

#: Whether the C extension is built and importable.
NATIVE: bool = _native is not None

_enabled = True

# The dtypes the loops are compiled for (the functions' dtype; the state is float64).
_DTYPES = (torch.float32, torch.float64)

_LAYOUTS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


@contextlib.contextmanager
def native_kernels(enabled: bool) -> Iterator[None]:
    """Use the C loops, where they apply, only if ``enabled``, inside the ``with`` block.

    Both ways give the same states bit for bit, and so the same outputs; the
    gradients may differ in their last bits (the loops add in another order). The
    setting is process-wide, not per thread.

    Parameters
    ----------
    enabled : bool
        ``False`` makes every step take the tensor operations.

    Raises
    ------
    RuntimeError
        If ``enabled`` is true and the extension was not built (:data:`NATIVE`).

    Examples
    --------
    >>> import torch
    >>> from invertnet import MomentumNet
    >>> net = MomentumNet([torch.nn.Tanh()] * 3, gamma=0.9, use_backprop=False)
    >>> with native_kernels(False):
    ...     out = net(torch.ones(2, 4, requires_grad=True))
    """
    global _enabled
    if enabled and not NATIVE:
        raise RuntimeError(
            "native_kernels(True): the C extension invertnet.momentum._kernels is not "
            "built (it needs a C compiler when invertnet is installed); reinstall with one"
        )
    before, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = before


def usable(
    dtype: torch.dtype, doubles: tuple[torch.Tensor, ...], typed: tuple[torch.Tensor, ...]
) -> bool:
    """Whether the loops can run on ``doubles`` (``float64``) and ``typed`` (``dtype``).

    All must be plain CPU tensors of one shape whose elements lie in the same
    order in memory, with no gaps: the loops walk them by a single index.
    """
    if _native is None or not _enabled or dtype not in _DTYPES:
        return False
    reference = doubles[0]
    shape, strides = reference.shape, reference.stride()
    if not any(reference.is_contiguous(memory_format=layout) for layout in _LAYOUTS):
        return False
    for tensors, wanted in ((doubles, torch.float64), (typed, dtype)):
        for t in tensors:
            if (
                type(t) is not torch.Tensor
                or t.dtype != wanted
                or t.device.type != "cpu"
                or t.shape != shape
                or t.stride() != strides
            ):
                return False
    return True


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
    loop: Callable[..., None], tensors: tuple[torch.Tensor | None, ...], *scalars: object
) -> None:
    """Run ``loop(*addresses, size, *scalars)`` over the elements of ``tensors``.

    Large tensors are cut into one contiguous range per intra-op thread
    (:func:`torch.get_num_threads`); the loops release the GIL, so the ranges run
    in parallel. A None tensor is passed as the null address.
    """
    size = next(t for t in tensors if t is not None).numel()
    threads = torch.get_num_threads()
    tasks = min(threads, size // PARALLEL_GRAIN)
    bases = [(0, 0) if t is None else (t.data_ptr(), t.element_size()) for t in tensors]
    if tasks <= 1:
        loop(*(base for base, _ in bases), size, *scalars)
        return
    cuts = [size * k // tasks for k in range(tasks + 1)]

    def run(k: int) -> None:
        addresses = (base + cuts[k] * width for base, width in bases)
        loop(*addresses, cuts[k + 1] - cuts[k], *scalars)

    pending = [_executor(threads).submit(run, k) for k in range(1, tasks)]
    run(0)
    for future in pending:
        future.result()


def _is_double(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


def step(
    head: torch.Tensor,
    velocity: torch.Tensor,
    position: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    n: int,
    d: int,
    mix_units: float,
    unit: float,
    residual: bool,
) -> None:
    """A forward step in place (see ``ExactMomentum.step``); ``out`` gets the new position."""
    assert _native is not None
    _launch(
        _native.step,
        (head, velocity, position, y, out),
        float(n), float(d), mix_units, unit, residual, _is_double(y.dtype),
    )  # fmt: skip


def unstep_position(
    velocity: torch.Tensor,
    position: torch.Tensor,
    grad_velocity: torch.Tensor,
    out: torch.Tensor,
    grad_y: torch.Tensor,
    unit: float,
    mix: float,
) -> None:
    """``x <- x - v`` in place, ``out = x`` and ``grad_y = mix * grad_velocity`` in their dtype."""
    assert _native is not None
    _launch(
        _native.unstep_position,
        (velocity, position, grad_velocity, out, grad_y),
        unit, mix, _is_double(out.dtype),
    )  # fmt: skip


def unstep_velocity(
    head: torch.Tensor,
    velocity: torch.Tensor,
    position: torch.Tensor,
    y: torch.Tensor,
    n: int,
    d: int,
    mix_units: float,
    residual: bool,
) -> None:
    """Undo a step's velocity and store digits in place (see ``ExactMomentum.unstep_velocity``)."""
    assert _native is not None
    _launch(
        _native.unstep_velocity,
        (head, velocity, position, y),
        float(n), float(d), mix_units, residual, _is_double(y.dtype),
    )  # fmt: skip


def accumulate(
    grad_x: torch.Tensor,
    grad_v: torch.Tensor,
    found: torch.Tensor | None,
    dtype: torch.dtype,
    keep: float,
    mix: float,
    residual: bool,
) -> None:
    """The gradient update of ``ExactMomentum.backpropagate``, in place (``found`` may be None)."""
    assert _native is not None
    _launch(_native.accumulate, (grad_x, grad_v, found), keep, mix, residual, _is_double(dtype))
