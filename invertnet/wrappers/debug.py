"""Checking reconstructed inputs, so that a wrong inverse fails loudly.

A wrapper that frees its input trusts the module's inverse to give it back. When
the inverse is wrong, or numerically unstable for the values at hand, the
gradients are silently wrong. Two checks guard against that:

* Always on: a reconstruction that contains NaN or Inf although the outputs it was
  computed from are finite raises :class:`ReconstructionError` when the backward
  pass ends. Its cost is one reduction (a sum) over each reconstructed input, and
  one read of the results on the host per backward pass, so a GPU is not made to
  wait once per block (:mod:`invertnet.wrappers._finite`). It can be turned off
  with :func:`set_finite_check`.
* Debug mode (:func:`debug_reconstruction` or :func:`set_debug_reconstruction`):
  every wrapper that frees an input during a forward pass in this mode keeps a copy
  of it, and its backward compares the reconstruction against the copy, raising
  :class:`ReconstructionError` with the module's name and the size of the error
  where they differ by more than the tolerance. This keeps the inputs in memory, so
  it is meant for tests and for hunting a bad gradient, not for training.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "DebugSettings",
    "ReconstructionError",
    "debug_reconstruction",
    "default_tolerances",
    "set_debug_reconstruction",
    "set_finite_check",
]


class ReconstructionError(RuntimeError):
    """A wrapper's reconstructed input is wrong.

    Attributes
    ----------
    module_name : str
        Which wrapper raised it (its name in the model given to the debug mode, or
        the wrapped module's class).
    input_index : int
        Which input of the wrapped call was wrong.
    max_abs_error : float
        Largest absolute difference from the original input (``nan`` when the
        original was not kept, outside debug mode).
    nonfinite : int
        Number of NaN or Inf elements that appeared in the reconstruction.
    """

    def __init__(
        self,
        message: str,
        *,
        module_name: str,
        input_index: int,
        max_abs_error: float,
        nonfinite: int,
    ) -> None:
        super().__init__(message)
        self.module_name = module_name
        self.input_index = input_index
        self.max_abs_error = max_abs_error
        self.nonfinite = nonfinite


#: Tolerances by dtype: wide enough for the rounding a correct inverse accumulates
#: over a few dozen blocks, tight enough to catch an inverse that is wrong.
_DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """Return the ``(atol, rtol)`` debug mode uses for ``dtype`` when none are given.

    Parameters
    ----------
    dtype : torch.dtype
        Dtype of the reconstructed input.

    Returns
    -------
    tuple of float
        ``(atol, rtol)``; ``(0.0, 0.0)`` (exact) for integer and boolean dtypes.

    Examples
    --------
    >>> import torch
    >>> default_tolerances(torch.float32)
    (1e-05, 0.0001)
    """
    if not (dtype.is_floating_point or dtype.is_complex):
        return (0.0, 0.0)
    return _DEFAULT_TOLERANCES.get(dtype, _DEFAULT_TOLERANCES[torch.float32])


@dataclass(frozen=True)
class DebugSettings:
    """Tolerances of debug mode and the names to report modules by.

    ``atol`` or ``rtol`` set to ``None`` means the dtype's default
    (:func:`default_tolerances`).
    """

    atol: float | None = None
    rtol: float | None = None
    names: dict[int, str] = field(default_factory=dict)

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        atol, rtol = default_tolerances(dtype)
        return (
            atol if self.atol is None else self.atol,
            rtol if self.rtol is None else self.rtol,
        )


_global_settings: DebugSettings | None = None
_finite_check = True
# The context manager overrides the global setting; _UNSET means "no override".
_UNSET = object()
_scoped_settings: contextvars.ContextVar[object] = contextvars.ContextVar(
    "invertnet_debug_reconstruction", default=_UNSET
)


def _validated(atol: float | None, rtol: float | None, model: nn.Module | None) -> DebugSettings:
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
        ):
            raise ValueError(f"{name} must be a non-negative number or None, got {value!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be the nn.Module whose sub-module names to report, got "
            f"{type(model).__name__}"
        )
    names = {}
    if model is not None:
        names = {id(m): (name or type(model).__name__) for name, m in model.named_modules()}
    return DebugSettings(
        None if atol is None else float(atol), None if rtol is None else float(rtol), names
    )


def current_settings() -> DebugSettings | None:
    """The debug settings in force, or ``None`` outside debug mode."""
    scoped = _scoped_settings.get()
    if scoped is not _UNSET:
        return scoped  # type: ignore[return-value]
    return _global_settings


@contextlib.contextmanager
def debug_reconstruction(
    atol: float | None = None, rtol: float | None = None, *, model: nn.Module | None = None
) -> Iterator[None]:
    """Check every reconstruction of inputs freed by forward passes run inside the block.

    Wrappers keep a copy of each input they free while the block is active; the
    backward pass, which may run after the block has exited, compares the
    reconstruction with the copy and raises :class:`ReconstructionError` where
    ``|reconstructed - original| > atol + rtol * |original|`` anywhere.

    Parameters
    ----------
    atol, rtol : float, optional
        Absolute and relative tolerance; by default per dtype
        (:func:`default_tolerances`).
    model : torch.nn.Module, optional
        The model containing the wrappers; errors then name the failing wrapper by
        its qualified name in it (such as ``'layers.3'``).

    Raises
    ------
    ValueError
        If a tolerance is negative or not a number.

    Examples
    --------
    >>> import torch
    >>> from invertnet import AdditiveCoupling, InvertibleModuleWrapper, debug_reconstruction
    >>> net = torch.nn.Sequential(InvertibleModuleWrapper(AdditiveCoupling(torch.nn.Linear(2, 2))))
    >>> x = torch.randn(3, 4, requires_grad=True)
    >>> with debug_reconstruction(model=net):
    ...     net(x).sum().backward()
    """
    token = _scoped_settings.set(_validated(atol, rtol, model))
    try:
        yield
    finally:
        _scoped_settings.reset(token)


def set_debug_reconstruction(
    enabled: bool,
    atol: float | None = None,
    rtol: float | None = None,
    *,
    model: nn.Module | None = None,
) -> None:
    """Turn debug mode on or off for the whole process (outside any :func:`debug_reconstruction`).

    Parameters
    ----------
    enabled : bool
        Whether forward passes keep freed inputs and backward checks them.
    atol, rtol, model
        As for :func:`debug_reconstruction`.
    """
    global _global_settings
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _global_settings = _validated(atol, rtol, model) if enabled else None


def set_finite_check(enabled: bool) -> None:
    """Turn the always-on NaN/Inf check of reconstructions on (the default) or off.

    Parameters
    ----------
    enabled : bool
        Whether backward checks that reconstructed inputs are finite wherever the
        outputs they were computed from are.
    """
    global _finite_check
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _finite_check = enabled


def finite_check_enabled() -> bool:
    """Whether the NaN/Inf check of reconstructions is on."""
    return _finite_check


def module_name(settings: DebugSettings | None, wrapper: nn.Module, wrapped: nn.Module) -> str:
    """How errors name ``wrapper``: its qualified name when known, else its class."""
    label = f"InvertibleModuleWrapper({type(wrapped).__name__})"
    if settings is not None and id(wrapper) in settings.names:
        return f"{label} '{settings.names[id(wrapper)]}'"
    return label


ADVICE = (
    "Check that the module's inverse really inverts its forward (test it with "
    "invertnet.is_invertible_module(module, input_shape)); if it does but loses precision "
    "for these values (small affine scales, a small momentum gamma, many blocks in low "
    "precision), pass keep_input=True to this wrapper or compute in a wider dtype"
)


def check_reconstruction(
    name: str,
    index: int,
    reconstructed: torch.Tensor,
    outputs: tuple[torch.Tensor, ...],
    original: torch.Tensor,
    settings: DebugSettings,
) -> None:
    """Raise :class:`ReconstructionError` if ``reconstructed`` differs from ``original``
    (kept by debug mode) by more than the settings' tolerances.

    Outside debug mode only NaN and Inf are looked for, once per backward pass
    (:mod:`invertnet.wrappers._finite`).
    """
    atol, rtol = settings.tolerances(original.dtype)
    r = reconstructed.detach()
    if r.shape != original.shape:
        raise ReconstructionError(
            f"{name}: reconstructed input {index} has shape {tuple(r.shape)}, but the "
            f"original input had shape {tuple(original.shape)}. {ADVICE}",
            module_name=name,
            input_index=index,
            max_abs_error=float("inf"),
            nonfinite=0,
        )
    # Compare in float64 so that the error reported is not itself rounded away.
    wide = torch.float64 if r.is_floating_point() else r.dtype
    r64, o64 = r.to(wide), original.to(wide)
    close = torch.isclose(r64, o64, rtol=rtol, atol=atol, equal_nan=True)
    if r.is_floating_point() and not _all_finite(outputs):
        # As outside debug mode: NaN/Inf the forward pass produced itself would
        # reach the gradients with plain autograd too; only finite values are checked.
        close |= ~torch.isfinite(r64)
    if bool(close.all()):
        return
    appeared = (
        int((~torch.isfinite(r64) & torch.isfinite(o64)).sum()) if r.is_floating_point() else 0
    )
    diff = (r64 - o64).abs().masked_fill(close, 0)
    finite_diff = diff.nan_to_num(nan=float("inf"))
    worst = int(finite_diff.flatten().argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), r.shape))
    max_abs = float(finite_diff.flatten()[worst])
    detail = (
        f"{appeared} NaN/Inf value(s) appeared where the original was finite, and "
        if appeared
        else ""
    )
    raise ReconstructionError(
        f"{name}: reconstructed input {index} differs from the original: {detail}"
        f"the largest error is {max_abs:.3g} at index {where} (original "
        f"{float(o64.flatten()[worst]):.6g}, reconstructed {float(r64.flatten()[worst]):.6g}; "
        f"tolerance atol={atol:g}, rtol={rtol:g}), {int((~close).sum())} of {r.numel()} "
        f"elements outside the tolerance. {ADVICE}",
        module_name=name,
        input_index=index,
        max_abs_error=max_abs,
        nonfinite=appeared,
    )


def _all_finite(tensors: tuple[torch.Tensor, ...]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
