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
from collections.abc import Iterator

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
    gradients may differ in their last bits (the loops add in another order).

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


def _typed(dtype: torch.dtype) -> bool:
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
    _native.step(
        head.data_ptr(),
        velocity.data_ptr(),
        position.data_ptr(),
        y.data_ptr(),
        out.data_ptr(),
        head.numel(),
        float(n),
        float(d),
        mix_units,
        unit,
        residual,
        _typed(y.dtype),
    )


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
    _native.unstep_position(
        velocity.data_ptr(),
        position.data_ptr(),
        grad_velocity.data_ptr(),
        out.data_ptr(),
        grad_y.data_ptr(),
        velocity.numel(),
        unit,
        mix,
        _typed(out.dtype),
    )


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
    _native.unstep_velocity(
        head.data_ptr(),
        velocity.data_ptr(),
        position.data_ptr(),
        y.data_ptr(),
        head.numel(),
        float(n),
        float(d),
        mix_units,
        residual,
        _typed(y.dtype),
    )


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
    _native.accumulate(
        grad_x.data_ptr(),
        grad_v.data_ptr(),
        0 if found is None else found.data_ptr(),
        grad_x.numel(),
        keep,
        mix,
        residual,
        _typed(dtype),
    )
