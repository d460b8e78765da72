"""Fused loops for the exact momentum iteration, where they apply: C on the CPU, Triton on CUDA.

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
the same order in memory (contiguous, or all ``channels_last``).
:data:`NATIVE` tells whether the extension was built (it needs a C compiler at
installation); :func:`native_kernels` turns the loops off, to compare or debug.

On CUDA the same phases run as Triton kernels (``invertnet.momentum._triton``),
for inputs of ``float32`` or ``float64`` whose functions return any floating
dtype (``bfloat16`` under autocast, for one), laid out as the C loops need.
Triton is optional: it is imported when a CUDA tensor first asks for a kernel,
and where it is missing the tensor operations serve. :func:`triton_kernels` turns the kernels off.

Everything else (half precision on the CPU, other layouts, ``gamma`` 0 or 1)
takes the tensor operations, which remain the reference. No path reads a
tensor's value on the host: the forward step returns (C) or writes on the device
(Triton) the largest magnitudes it reached, which
:class:`~invertnet.momentum.exact.RangeCheck` checks once per forward pass.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from invertnet.momentum.exact import RangeCheck

try:
    from invertnet.momentum import _kernels as _native
except ImportError:  # installed without a C compiler: the tensor operations serve
    _native = None

__all__ = ["NATIVE", "native_kernels", "triton_available", "triton_kernels"]

#: Whether the C extension is built and importable.
NATIVE: bool = _native is not None

_enabled = True

# The dtypes the loops are compiled for (the functions' dtype; the state is float64).
_DTYPES = (torch.float32, torch.float64)

_LAYOUTS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)

# The dtypes the Triton kernels handle: of the functions' inputs (the state's
# conversions, proven bit for bit in Triton's interpreter, whose conversions to
# 16-bit floats do not round as CUDA's do), and of their outputs (only read).
_TRITON_DTYPES = (torch.float32, torch.float64)
_TRITON_OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_triton_enabled = True

# The kernels module, once imported; False where Triton is missing or fails to load.
_triton: ModuleType | bool | None = None

# The device types the Triton kernels serve. Tests add "cpu" to run them in Triton's
# interpreter (TRITON_INTERPRET=1), which walks CPU tensors.
_TRITON_DEVICES: tuple[str, ...] = ("cuda",)


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


@contextlib.contextmanager
def triton_kernels(enabled: bool) -> Iterator[None]:
    """Use the Triton kernels on CUDA, where they apply, only if ``enabled``, inside the block.

    Both ways give the same states bit for bit; the gradients may differ in
    their last bits. The setting is process-wide, not per thread. Turning the
    kernels on where Triton is not installed is no error: the tensor operations
    serve (see :func:`triton_available`).

    Parameters
    ----------
    enabled : bool
        ``False`` makes every CUDA step take the tensor operations.

    Examples
    --------
    >>> import torch
    >>> from invertnet import MomentumNet
    >>> net = MomentumNet([torch.nn.Tanh()] * 3, gamma=0.9, use_backprop=False)
    >>> with triton_kernels(False):
    ...     out = net(torch.ones(2, 4, requires_grad=True))
    """
    global _triton_enabled
    before, _triton_enabled = _triton_enabled, bool(enabled)
    try:
        yield
    finally:
        _triton_enabled = before


def triton_available() -> bool:
    """Whether the Triton kernels can be loaded (Triton is installed and imports).

    Imports Triton on the first call.
    """
    return _triton_module() is not None


def _triton_module() -> ModuleType | None:
    global _triton
    if _triton is None:
        _triton = False
        if importlib.util.find_spec("triton") is not None:
            try:
                from invertnet.momentum import _triton as module
            except Exception:  # a Triton that does not load here: the tensor operations serve
                module = None
            _triton = module if module is not None else False
    return _triton or None


def _same_layout(reference: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``tensors`` are plain tensors on ``reference``'s device, shape and strides."""
    shape, strides, device = reference.shape, reference.stride(), reference.device
    return all(
        type(t) is torch.Tensor
        and t.device == device
        and t.shape == shape
        and t.stride() == strides
        for t in tensors
    )


def usable(
    dtype: torch.dtype, doubles: tuple[torch.Tensor, ...], typed: tuple[torch.Tensor, ...]
) -> bool:
    """Whether a fused loop can run on ``doubles`` (``float64``) and ``typed`` (``dtype``).

    All must be plain tensors on one device, of one shape, whose elements lie in
    the same order in memory, with no gaps: the loops walk them by a single
    index. On the CPU the C loops need ``typed`` to be of ``dtype``; on CUDA the
    Triton kernels take functions' outputs of each of the four floating dtypes.
    """
    reference = doubles[0]
    device = reference.device.type
    if device == "cpu" and "cpu" not in _TRITON_DEVICES:
        if _native is None or not _enabled or dtype not in _DTYPES:
            return False
        if any(t.dtype != dtype for t in typed):
            return False
    elif device in _TRITON_DEVICES:
        if not _triton_enabled or dtype not in _TRITON_DTYPES:
            return False
        if any(t.dtype not in _TRITON_OUTPUT_DTYPES for t in typed) or _triton_module() is None:
            return False
    else:
        return False
    if any(t.dtype != torch.float64 for t in doubles):
        return False
    if not any(reference.is_contiguous(memory_format=layout) for layout in _LAYOUTS):
        return False
    return _same_layout(reference, doubles) and _same_layout(reference, typed)


def _uses_triton(t: torch.Tensor) -> bool:
    return t.device.type in _TRITON_DEVICES


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


def _largest(a: float, b: float) -> float:
    """The larger of two magnitudes, NaN if either is."""
    return a if a != a or a > b else b


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
    split: bool,
    checks: RangeCheck,
    names: tuple[str, str, str],
    scale: float,
) -> float | None:
    """A forward step in place (see ``ExactMomentum.step``); ``out`` gets the new position.

    The product ``n v + r`` is computed in the split form if ``split`` (the
    Triton kernels always use it), else in one product. The largest magnitudes
    of the update, the new position and the new velocity go to ``checks`` under
    ``names`` (the position's times ``scale``, in units). Returns the velocity's,
    where the host has it without reading a tensor (the C loops), else None.
    """
    update_name, position_name, velocity_name = names
    if _uses_triton(head):
        module = _triton_module()
        assert module is not None
        peaks = checks.slots(3, head.device)
        module.step(head, velocity, position, y, out, peaks, n, d, mix_units, unit, residual)
        checks.written(update_name, peaks[0])
        checks.written(position_name, peaks[1], scale)
        checks.written(velocity_name, peaks[2])
        return None
    assert _native is not None
    peaks = _launch(
        _native.step,
        (head, velocity, position, y, out),
        float(n), float(d), mix_units, unit, residual, split, _is_double(y.dtype),
    )  # fmt: skip
    largest = [0.0, 0.0, 0.0]
    for part in peaks:
        largest = [_largest(a, b) for a, b in zip(largest, part)]
    checks.known(update_name, largest[0])
    checks.known(position_name, largest[1], scale)
    checks.known(velocity_name, largest[2])
    return largest[2]


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
    if _uses_triton(velocity):
        module = _triton_module()
        assert module is not None
        module.unstep_position(velocity, position, grad_velocity, out, grad_y, unit, mix)
        return
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
    split: bool,
) -> None:
    """Undo a step's velocity and store digits in place (see ``ExactMomentum.unstep_velocity``).

    ``split`` as the step was computed (the Triton kernels always use the split form).
    """
    if _uses_triton(head):
        module = _triton_module()
        assert module is not None
        module.unstep_velocity(head, velocity, position, y, n, d, mix_units, residual)
        return
    assert _native is not None
    _launch(
        _native.unstep_velocity,
        (head, velocity, position, y),
        float(n), float(d), mix_units, residual, split, _is_double(y.dtype),
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
    if _uses_triton(grad_x):
        module = _triton_module()
        assert module is not None
        module.accumulate(grad_x, grad_v, found, keep, mix, residual)
        return
    assert _native is not None
    _launch(_native.accumulate, (grad_x, grad_v, found), keep, mix, residual, _is_double(dtype))
