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
  Every comparison is also recorded, within the tolerance or not, in the
  :class:`ReconstructionReport` that :func:`debug_reconstruction` yields: the
  largest absolute and relative error of each wrapper's reconstruction, to find
  where floating-point drift builds up in a model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "DebugSettings",
    "ReconstructionError",
    "ReconstructionRecord",
    "ReconstructionReport",
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
class ReconstructionRecord:
    """One reconstructed input compared with its original in debug mode.

    Attributes
    ----------
    module_name : str
        The wrapper, named as :class:`ReconstructionError` names it.
    input_index : int
        Which input of the wrapped call.
    max_abs_error : float
        Largest ``|reconstructed - original|`` over the elements finite in both.
    rel_error : float
        ``max_abs_error`` relative to the original's largest finite magnitude
        (``max|original|``); elementwise relative errors are meaningless near 0.
        ``0`` for an exact reconstruction, ``inf`` for an error on an all-zero
        original.
    nonfinite : int
        Number of NaN or Inf elements in the reconstruction where the original
        was finite.
    within_tolerance : bool
        Whether the reconstruction passed the check (see
        :func:`debug_reconstruction`).
    dtype : torch.dtype
        Dtype of the input.
    """

    module_name: str
    input_index: int
    max_abs_error: float
    rel_error: float
    nonfinite: int
    within_tolerance: bool
    dtype: torch.dtype


class ReconstructionReport:
    """The reconstruction errors debug mode measured, to find where drift builds up.

    :func:`debug_reconstruction` yields one (and :func:`set_debug_reconstruction`
    returns one); each backward pass through a wrapper whose forward ran in debug
    mode appends a :class:`ReconstructionRecord` per freed input, in the order
    backward reaches them (the last block first). Records accumulate over backward
    passes until :meth:`clear`.

    Examples
    --------
    >>> import torch
    >>> from invertnet import AffineAdapterNaive, AffineCoupling, InvertibleModuleWrapper
    >>> from invertnet import debug_reconstruction
    >>> _ = torch.manual_seed(0)
    >>> def block():
    ...     coupling = AffineCoupling(torch.nn.Linear(2, 2), adapter=AffineAdapterNaive)
    ...     return InvertibleModuleWrapper(coupling)
    >>> net = torch.nn.Sequential(block(), block(), block())
    >>> x = torch.randn(3, 4, requires_grad=True) * 1.0
    >>> with debug_reconstruction(model=net) as report:
    ...     y = net(x)
    >>> y.sum().backward()
    >>> len(report)  # one record per freed input, the last block first
    3
    >>> next(iter(report.by_module()))
    "InvertibleModuleWrapper(AffineCoupling) '2'"
    >>> report.max_rel_error < 1e-5
    True
    """

    def __init__(self) -> None:
        self._records: list[ReconstructionRecord] = []

    def add(self, record: ReconstructionRecord) -> None:
        """Append a record (called by the wrappers' backward)."""
        self._records.append(record)

    def clear(self) -> None:
        """Forget the records so far."""
        self._records.clear()

    @property
    def records(self) -> list[ReconstructionRecord]:
        """All records, in the order backward made them."""
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[ReconstructionRecord]:
        return iter(list(self._records))

    def by_module(self) -> dict[str, ReconstructionRecord]:
        """The worst record (largest ``rel_error``) of each wrapper, by its name.

        Returns
        -------
        dict of str to ReconstructionRecord
            In the order backward first reached each wrapper.
        """
        worst: dict[str, ReconstructionRecord] = {}
        for record in self._records:
            seen = worst.get(record.module_name)
            if seen is None or _severity(record) > _severity(seen):
                worst[record.module_name] = record
        return worst

    def worst(self) -> ReconstructionRecord | None:
        """The record with the largest relative error, or ``None`` if there is none."""
        return max(self._records, key=_severity, default=None)

    @property
    def max_abs_error(self) -> float:
        """The largest absolute error over all records (``0.0`` if none)."""
        return max((r.max_abs_error for r in self._records), default=0.0)

    @property
    def max_rel_error(self) -> float:
        """The largest relative error over all records (``0.0`` if none)."""
        return max((r.rel_error for r in self._records), default=0.0)

    def table(self) -> str:
        """The worst record of each wrapper as a Markdown table, worst first."""
        lines = [
            "| module | input | max abs error | rel error | NaN/Inf | within tolerance |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(self.by_module().values(), key=_severity, reverse=True):
            lines.append(
                f"| {r.module_name} | {r.input_index} | {r.max_abs_error:.3g} | "
                f"{r.rel_error:.3g} | {r.nonfinite} | {'yes' if r.within_tolerance else 'no'} |"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ReconstructionReport({len(self._records)} records, "
            f"max_abs_error={self.max_abs_error:.3g}, max_rel_error={self.max_rel_error:.3g})"
        )


def _severity(record: ReconstructionRecord) -> tuple[int, float, float]:
    return (record.nonfinite, record.rel_error, record.max_abs_error)


@dataclass(frozen=True)
class DebugSettings:
    """Tolerances of debug mode, the names to report modules by, and its report.

    ``atol`` or ``rtol`` set to ``None`` means the dtype's default
    (:func:`default_tolerances`). ``raise_errors=False`` records every comparison
    in ``report`` without raising.
    """

    atol: float | None = None
    rtol: float | None = None
    names: dict[int, str] = field(default_factory=dict)
    raise_errors: bool = True
    report: ReconstructionReport = field(
        default_factory=ReconstructionReport, compare=False, repr=False
    )

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


def _validated(
    atol: float | None, rtol: float | None, model: nn.Module | None, raise_errors: Any = True
) -> DebugSettings:
    if not isinstance(raise_errors, bool):
        raise TypeError(f"raise_errors must be a bool, got {type(raise_errors).__name__}")
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
        None if atol is None else float(atol),
        None if rtol is None else float(rtol),
        names,
        raise_errors,
    )


def current_settings() -> DebugSettings | None:
    """The debug settings in force, or ``None`` outside debug mode."""
    scoped = _scoped_settings.get()
    if scoped is not _UNSET:
        return scoped  # type: ignore[return-value]
    return _global_settings


@contextlib.contextmanager
def debug_reconstruction(
    atol: float | None = None,
    rtol: float | None = None,
    *,
    model: nn.Module | None = None,
    raise_errors: bool = True,
) -> Iterator[ReconstructionReport]:
    """Check every reconstruction of inputs freed by forward passes run inside the block.

    Wrappers keep a copy of each input they free while the block is active; the
    backward pass, which may run after the block has exited, compares the
    reconstruction with the copy and raises :class:`ReconstructionError` where
    ``|reconstructed - original| > atol + rtol * |original|`` anywhere. Every
    comparison, within the tolerance or not, is recorded in the
    :class:`ReconstructionReport` the block yields: read it after backward to see
    how far each wrapper's reconstruction drifted.

    Parameters
    ----------
    atol, rtol : float, optional
        Absolute and relative tolerance; by default per dtype
        (:func:`default_tolerances`).
    model : torch.nn.Module, optional
        The model containing the wrappers; errors and records then name each
        wrapper by its qualified name in it (such as ``'layers.3'``; the blocks of
        a :class:`~invertnet.Flow` by the names of the blocks it runs).
    raise_errors : bool
        ``False`` only records: backward runs to the end whatever the errors, and
        the report shows every wrapper's (``within_tolerance`` says which failed).

    Yields
    ------
    ReconstructionReport
        Filled in by the backward passes of the forward passes run in the block.

    Raises
    ------
    ValueError
        If a tolerance is negative or not a number.
    TypeError
        If ``model`` is not a module or ``raise_errors`` not a bool.

    Examples
    --------
    >>> import torch
    >>> from invertnet import AdditiveCoupling, InvertibleModuleWrapper, debug_reconstruction
    >>> net = torch.nn.Sequential(InvertibleModuleWrapper(AdditiveCoupling(torch.nn.Linear(2, 2))))
    >>> x = torch.randn(3, 4, requires_grad=True)
    >>> with debug_reconstruction(model=net) as report:
    ...     net(x).sum().backward()
    >>> report.max_abs_error < 1e-6
    True
    """
    settings = _validated(atol, rtol, model, raise_errors)
    token = _scoped_settings.set(settings)
    try:
        yield settings.report
    finally:
        _scoped_settings.reset(token)


def set_debug_reconstruction(
    enabled: bool,
    atol: float | None = None,
    rtol: float | None = None,
    *,
    model: nn.Module | None = None,
    raise_errors: bool = True,
) -> ReconstructionReport | None:
    """Turn debug mode on or off for the whole process (outside any :func:`debug_reconstruction`).

    Parameters
    ----------
    enabled : bool
        Whether forward passes keep freed inputs and backward checks them.
    atol, rtol, model, raise_errors
        As for :func:`debug_reconstruction`.

    Returns
    -------
    ReconstructionReport or None
        The report the backward passes fill in, when ``enabled``.
    """
    global _global_settings
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _global_settings = _validated(atol, rtol, model, raise_errors) if enabled else None
    return None if _global_settings is None else _global_settings.report


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


_NO_NAMES: dict[int, str] = {}


def module_name(settings: DebugSettings | None, wrapper: nn.Module, wrapped: nn.Module) -> str:
    """How errors name ``wrapper``: its qualified name when known, else its class.

    A wrapped module that is not itself in the model (such as the runs of blocks
    a :class:`~invertnet.Flow` wraps) may name itself with a method
    ``reconstruction_label(names) -> str``, given the ``id(module) -> name`` map.
    """
    label = f"InvertibleModuleWrapper({type(wrapped).__name__})"
    names = _NO_NAMES if settings is None else settings.names
    if id(wrapper) in names:
        return f"{label} '{names[id(wrapper)]}'"
    describe = getattr(type(wrapped), "reconstruction_label", None)
    if describe is not None:
        return f"{label} {describe(wrapped, names)}"
    return label


ADVICE = (
    "Check that the module's inverse really inverts its forward (test it with "
    "invertnet.is_invertible_module(module, input_shape)); if it does but loses precision "
    "for these values (small affine scales, a small momentum gamma, many blocks in low "
    "precision), pass keep_input=True to this wrapper (keep_every=N to a Flow, to "
    "bound the drift) or compute in a wider dtype"
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

    Every comparison is recorded in ``settings.report`` first; with
    ``settings.raise_errors`` false nothing is raised. Outside debug mode only NaN
    and Inf are looked for, once per backward pass
    (:mod:`invertnet.wrappers._finite`).
    """
    atol, rtol = settings.tolerances(original.dtype)
    r = reconstructed.detach()
    if r.shape != original.shape:
        settings.report.add(
            ReconstructionRecord(name, index, float("inf"), float("inf"), 0, False, original.dtype)
        )
        if not settings.raise_errors:
            return
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
    within = bool(close.all())
    settings.report.add(_record(name, index, r, original, within))
    if within or not settings.raise_errors:
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


def _record(
    name: str, index: int, r: torch.Tensor, original: torch.Tensor, within: bool
) -> ReconstructionRecord:
    """The errors of one reconstruction, measured in float64 (complex128 for complex)."""
    wide = torch.complex128 if r.is_complex() or original.is_complex() else torch.float64
    rw, ow = r.to(wide), original.to(wide)
    finite_r, finite_o = torch.isfinite(rw), torch.isfinite(ow)
    nonfinite = int((~finite_r & finite_o).sum())
    if r.numel() == 0:
        return ReconstructionRecord(name, index, 0.0, 0.0, nonfinite, within, original.dtype)
    diff = torch.where(finite_r & finite_o, (rw - ow).abs(), 0.0)
    max_abs = float(diff.max())
    scale = float(torch.where(finite_o, ow.abs(), 0.0).max())
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return ReconstructionRecord(name, index, max_abs, rel, nonfinite, within, original.dtype)


def _all_finite(tensors: tuple[torch.Tensor, ...]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())
