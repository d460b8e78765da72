"""The block contract: what the memory-saving layers may ask of an invertible module.

:class:`~invertnet.InvertibleModuleWrapper` and :class:`~invertnet.Flow` know a block
only through this contract; the couplings and the flow blocks implement it. An
invertible block is an :class:`torch.nn.Module` with

* ``forward(*x, **context)`` and ``inverse(*y, **context)`` (:class:`Invertible`):
  ``inverse(forward(x)) == x`` up to rounding, deterministic given the parameters
  (and the random state); one tensor in or out is returned bare, several as a
  tuple. ``context`` keywords (an attention mask) are passed unchanged, and get no
  gradient.

and optionally

* ``inverse_and_vjp(outputs, grad_outputs, params, *, out=None, grad_log_det=None,
  inputs_need_grad=None, **context)`` (:class:`FusedInverse`): the fused backward,
  which rebuilds the inputs from the outputs and back-propagates ``grad_outputs``
  in one pass; see :meth:`FusedInverse.inverse_and_vjp` for what each argument
  asks. A wrapper then costs one extra forward instead of an inverse and a
  forward;
* ``forward_and_log_det(*x) -> (y, log_det)`` (:class:`LogDet`): the output and
  the per-sample ``log|det dy/dx|``, of shape ``(batch,)``, which makes the block a
  flow block (with ``output_shape(event_shape)`` where it changes the shape of a
  sample);
* ``reconstruction_keeps_finite() -> bool``: ``True`` where the inverse of finite
  outputs is finite by construction, so that the wrapper's NaN/Inf check of
  reconstructions may skip the block.

:class:`InvertibleBlock` is an optional base class that gives a block the
contract's defaults. The layers read a block's optional parts once per class
(:func:`block_traits`), not per call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = [
    "FLOW_BLOCK_METHODS",
    "FUSED_PARAMETERS",
    "INVERTIBLE_METHODS",
    "Buffer",
    "BlockTraits",
    "FusedInverse",
    "FusedResult",
    "Invertible",
    "InvertibleBlock",
    "LogDet",
    "as_tensors",
    "as_tuple",
    "block_traits",
    "declared_with",
    "missing_methods",
]

Tensors = tuple[torch.Tensor, ...]
Output = torch.Tensor | Tensors
#: What a fused backward returns: the rebuilt inputs, their gradients (``None``
#: where not wanted) and one gradient (or ``None``) per entry of ``params``.
FusedResult = tuple[Tensors, tuple[torch.Tensor | None, ...], list[torch.Tensor | None]]
#: Where a fused backward may write a rebuilt input: a tensor, ``None`` (nowhere:
#: a new tensor), or, for a block that declares ``deferred_out``, a callable
#: without arguments that returns the tensor when it is first written.
Buffer = torch.Tensor | Callable[[], torch.Tensor] | None

#: The names of the fused backward's own parameters. A call's context keyword of
#: one of these names cannot be handed through it (the layers then take the
#: general path: invert, then run forward again).
FUSED_PARAMETERS = frozenset(
    {"outputs", "grad_outputs", "params", "out", "grad_log_det", "inputs_need_grad"}
)

#: What every invertible block has (:class:`Invertible`).
INVERTIBLE_METHODS = ("forward", "inverse")

#: What :class:`~invertnet.Flow` needs of each block.
FLOW_BLOCK_METHODS = ("forward_and_log_det", "inverse")


@runtime_checkable
class Invertible(Protocol):
    """An invertible module: ``inverse(forward(x)) == x`` up to rounding."""

    def forward(self, *xs: torch.Tensor, **context: Any) -> Output: ...

    def inverse(self, *ys: torch.Tensor, **context: Any) -> Output: ...


@runtime_checkable
class FusedInverse(Protocol):
    """A block with a fused backward: the inverse and the vector-Jacobian product in
    one pass, each sub-module evaluated once."""

    def inverse_and_vjp(
        self,
        outputs: Tensors,
        grad_outputs: Tensors,
        params: Tensors,
        *,
        out: Sequence[Buffer] | None = None,
        grad_log_det: torch.Tensor | None = None,
        inputs_need_grad: Sequence[bool] | None = None,
        **context: Any,
    ) -> FusedResult:
        """Rebuild the inputs from ``outputs`` and back-propagate ``grad_outputs``.

        The layers pass an option only where it differs from its default, so a
        block that never needs one (no log-determinant, say) may leave it out of
        its signature; a block in a :class:`~invertnet.Flow` must take
        ``grad_log_det``, and one whose ``forward`` takes context keywords must
        take them here too.

        Parameters
        ----------
        outputs : tuple of torch.Tensor
            The forward pass's outputs, detached.
        grad_outputs : tuple of torch.Tensor
            The loss's gradients with respect to ``outputs`` (none is ``None``).
        params : tuple of torch.Tensor
            The parameters whose gradients are wanted, in this order.
        out : sequence of Buffer, optional
            Per input, memory to write the rebuilt input into (the freed input's
            own), or ``None``. Using it saves a copy; a block may ignore it and
            return new tensors. Its entries are callables only for a block whose
            class declares ``deferred_out = True`` (see :func:`block_traits`).
        grad_log_det : torch.Tensor, optional
            The loss's gradient with respect to ``forward_and_log_det``'s
            log-determinant (shape ``(batch,)``), to back-propagate in the same pass.
        inputs_need_grad : sequence of bool, optional
            Per input, whether its gradient is wanted (by default every one); a block
            may return a gradient anyway, which the caller drops.
        **context
            The forward call's context keywords, the very same objects.

        Returns
        -------
        inputs, grad_inputs, grad_params
            The rebuilt inputs, their gradients, and one gradient per entry of
            ``params`` (``None`` where unused).
        """
        ...


@runtime_checkable
class LogDet(Protocol):
    """A flow block's log-determinant alongside its output."""

    def forward_and_log_det(self, *xs: torch.Tensor) -> tuple[Output, torch.Tensor]: ...


class InvertibleBlock(nn.Module):
    """An optional base class with the contract's defaults.

    Subclasses define ``forward`` and ``inverse``, and may define
    ``inverse_and_vjp`` and ``forward_and_log_det``.
    """

    #: Whether this class's ``inverse_and_vjp`` takes ``out`` entries that are
    #: callables, called when the input is first written (so that its memory is taken
    #: as late as possible), or never where the block ignores ``out``. Trusted only
    #: from the class that defines ``inverse_and_vjp`` (:func:`declared_with`): a
    #: subclass that overrides it may index or inspect ``out``, and gets tensors.
    deferred_out: ClassVar[bool] = False

    #: Whether a wrapper should run this class's ``inverse_and_vjp`` also where it
    #: kept the inputs (``keep_input=True``) rather than recompute the forward pass
    #: from them: for a block that keeps nothing between its parts either way, a
    #: chain of blocks say, whose recomputation would record a graph over all of
    #: them. Trusted only from the class that defines ``inverse_and_vjp``.
    fuses_kept_inputs: ClassVar[bool] = False

    #: Whether a wrapper may hand this class's ``inverse_and_vjp`` its ``outputs``
    #: in a list of their own, which the block empties once it has read them, where
    #: nothing after the backward pass reads them: a block whose backward goes on long
    #: after it has read its outputs, a chain of blocks say, then does not hold
    #: them meanwhile. Trusted only from the class that defines ``inverse_and_vjp``.
    takes_outputs: ClassVar[bool] = False

    #: Whether the block lists its modules itself: its
    #: ``modules_and_trainable_parameters()`` returns the block and every module
    #: under it (the block first, each once) and their parameters that require grad,
    #: each once, which a wrapper then takes instead of walking the modules on every
    #: call: a block that knows them already (a chain of blocks whose stack has just
    #: walked them) spares that walk.
    lists_own_modules: ClassVar[bool] = False

    def reconstruction_keeps_finite(self) -> bool:
        """Whether the inverse of finite outputs is finite by construction (by
        default not known: the wrapper checks)."""
        return False

    def inverse_and_vjp_with_log_det(
        self,
        outputs: Tensors,
        grad_outputs: Tensors,
        grad_log_det: torch.Tensor | None,
        params: Tensors,
    ) -> FusedResult:
        """``inverse_and_vjp(outputs, grad_outputs, params, grad_log_det=grad_log_det)``:
        rebuild the input and back-propagate the gradients of the output and of the
        log-determinant (``None``: none) in one pass.
        """
        fused: Any = self.inverse_and_vjp  # type: ignore[attr-defined]
        if grad_log_det is None:
            return fused(outputs, grad_outputs, params)
        return fused(outputs, grad_outputs, params, grad_log_det=grad_log_det)


@functools.cache
# A fact about classes, the same whenever it is asked: run eagerly, its result taken
# as a constant, when torch.compile or torch.export traces a first call (Dynamo in
# PyTorch 2.4 cannot trace vars() of a class).
@torch.compiler.assume_constant_result
def declared_with(cls: type, method: str, attribute: str) -> bool:
    """Whether the class that gives ``cls`` its ``method`` also gives it ``attribute``.

    A declaration about a method (a flag such as ``deferred_out``, or a faster form
    of the same rule) holds for the class that wrote both: a subclass that
    overrides the method alone must not inherit a parent's declaration about the
    parent's method.
    """

    def owner(name: str) -> type | None:
        return next((k for k in cls.__mro__ if name in vars(k)), None)

    return owner(method) is owner(attribute)


@dataclass(frozen=True, slots=True)
class BlockTraits:
    """What a block class offers beyond ``forward`` and ``inverse``, read once per class."""

    #: It has ``inverse_and_vjp`` (:class:`FusedInverse`).
    fused: bool
    #: Its ``inverse_and_vjp`` takes callables in ``out`` (``deferred_out``).
    deferred_out: bool
    #: Its ``inverse_and_vjp`` serves kept inputs too (``fuses_kept_inputs``).
    fuses_kept_inputs: bool
    #: Its ``inverse_and_vjp`` may be handed ``outputs`` in a list of their own,
    #: which it empties once done with them (``takes_outputs``).
    takes_outputs: bool
    #: It lists its modules and trainable parameters itself (``lists_own_modules``).
    lists_own_modules: bool
    #: It has ``forward_and_log_det`` (:class:`LogDet`).
    log_det: bool
    #: It has ``reconstruction_keeps_finite()``.
    says_if_finite: bool


@functools.cache
def block_traits(cls: type) -> BlockTraits:
    """The :class:`BlockTraits` of the block class ``cls``.

    Read from the class, once: a method assigned to one instance is not seen.
    """
    fused = issubclass(cls, FusedInverse)
    return BlockTraits(
        fused=fused,
        deferred_out=fused
        and getattr(cls, "deferred_out", False) is True
        and declared_with(cls, "inverse_and_vjp", "deferred_out"),
        fuses_kept_inputs=fused
        and getattr(cls, "fuses_kept_inputs", False) is True
        and declared_with(cls, "inverse_and_vjp", "fuses_kept_inputs"),
        takes_outputs=fused
        and getattr(cls, "takes_outputs", False) is True
        and declared_with(cls, "inverse_and_vjp", "takes_outputs"),
        lists_own_modules=getattr(cls, "lists_own_modules", False) is True
        and callable(getattr(cls, "modules_and_trainable_parameters", None))
        and declared_with(cls, "modules_and_trainable_parameters", "lists_own_modules"),
        log_det=issubclass(cls, LogDet),
        says_if_finite=callable(getattr(cls, "reconstruction_keeps_finite", None)),
    )


def missing_methods(block: object, names: Sequence[str]) -> list[str]:
    """The methods among ``names`` that ``block`` lacks (or holds as a non-callable)."""
    return [name for name in names if not callable(getattr(block, name, None))]


def as_tuple(value: Any) -> tuple[Any, ...]:
    """``value`` as a tuple, unchecked: a tuple or list as its items, anything else
    (one tensor) as one item. For values already known to be tensors (a
    sub-module's output, a rule's gradient); :func:`as_tensors` checks them."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def as_tensors(value: Any, what: str | Callable[[], str]) -> Tensors:
    """``value`` as a tuple of tensors: one tensor, or a tuple or list of them.

    Parameters
    ----------
    value : torch.Tensor or sequence of torch.Tensor
        What a block was given or returned.
    what : str or callable
        What ``value`` is, for the error (a callable is called only then, so that a
        caller on a hot path need not format a message it will not use).

    Raises
    ------
    TypeError
        If an entry is not a tensor.
    """
    values = as_tuple(value)
    for i, t in enumerate(values):
        if not isinstance(t, torch.Tensor):
            name = what if isinstance(what, str) else what()
            raise TypeError(f"{name} {i} must be a tensor, got {type(t).__name__}")
    return values
