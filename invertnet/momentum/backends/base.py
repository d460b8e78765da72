"""The interface of a backend of the exact momentum arithmetic: four phases.

A step of the exact iteration (:mod:`invertnet.momentum.exact`) runs in four
phases, and a backend computes each of them:

``advance``
    Forward: from a function's output ``y``, the update ``(1 - gamma) f`` in
    units, the velocity and position it makes (the bit store taking the digits
    the product by ``gamma`` loses), and the new position in the functions'
    dtype. Returns the largest magnitudes reached (:class:`Peaks`).
``retreat_position``
    Backward, before the function is recomputed: ``x <- x - v``, the restored
    position in the functions' dtype, and the gradient for the function's output.
``retreat_velocity``
    Backward, after the function is recomputed on that position: undo the
    velocity and the bit store's digits.
``backpropagate``
    Backward, after the function's vector-Jacobian product: the gradients for the
    step's input position and velocity, in place.

Every backend gives the states of the reference (:mod:`~.tensor`) bit for bit.
:func:`~invertnet.momentum.backends.select` picks one per forward pass; its
backward uses the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch

from invertnet.momentum.fixed_point import Constants, Magnitude, MomentumState

__all__ = ["LAYOUTS", "Backend", "Peaks", "same_layout", "walks"]

#: The memory layouts whose elements a single index walks, with no gaps.
LAYOUTS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


class Peaks(NamedTuple):
    """The largest magnitudes a forward step reached, as every backend returns them.

    Each is a :data:`~invertnet.momentum.fixed_point.Magnitude`: a float the host
    knows (the C loops return them), or tensors left on their device (a kernel's
    slot; a tensor's minimum and maximum), read or asserted once per forward pass.
    """

    #: Of the update ``(1 - gamma) f``, in units.
    update: Magnitude
    #: Of the new position, as its value (not in units).
    position: Magnitude
    #: Of the new velocity, in units.
    velocity: Magnitude


class Backend(ABC):
    """The exact momentum arithmetic, in four phases (see the module's description).

    A backend keeps nothing of a pass: one object serves every forward pass that
    :func:`~invertnet.momentum.backends.select` gives it (scratch memory of a pass
    belongs to its state, as :meth:`MomentumState.peak_slots
    <invertnet.momentum.fixed_point.MomentumState.peak_slots>`). The phases work in
    place on the state's float64 tensors; ``c`` holds the numbers of the
    iteration (``gamma`` as ``n / d``, the fixed-point format).

    ``advance`` and ``retreat_velocity`` are asked only for ``0 < gamma < 1``
    (``c.fractional``): ``gamma`` 0 and 1 take the reference. The bit store's
    chunks are cut and restored by the caller, around those two phases.
    """

    #: The name :func:`~invertnet.momentum.backends.use_backends` knows it by.
    name: ClassVar[str] = ""

    @abstractmethod
    def serves(
        self,
        dtype: torch.dtype,
        doubles: tuple[torch.Tensor, ...],
        typed: tuple[torch.Tensor, ...] = (),
    ) -> bool:
        """Whether a phase can run here on ``doubles`` and ``typed``.

        :func:`~invertnet.momentum.backends.select` asks once per forward pass,
        about the state; each phase asks again about the tensors it is given
        (a function that returns a transposed tensor, or ``bfloat16`` under
        autocast, may be one a backend cannot walk; that call then takes the
        reference, with the same bits).

        Parameters
        ----------
        dtype : torch.dtype
            The functions' input dtype (that of the network's input).
        doubles : tuple of torch.Tensor
            ``float64`` tensors of the state or its gradients, the first the one
            the others must lie like.
        typed : tuple of torch.Tensor
            Functions' outputs or their input gradients, of the functions' dtype
            (or, under autocast, another floating dtype).
        """

    @abstractmethod
    def advance(
        self, c: Constants, state: MomentumState, y: torch.Tensor, residual: bool, split: bool
    ) -> tuple[torch.Tensor, Peaks]:
        """A forward step in place, from the function's output ``y``.

        ``v <- gamma v + (1 - gamma) f`` with ``f`` ``y`` (``residual``) or
        ``y - x``, and ``x <- x + v``. Computes ``n v + r`` in the split form
        (exact for every velocity in range) if ``split``; otherwise it may take one
        product, which the caller found exact. Returns the new position in the
        functions' dtype (a new tensor) and the largest magnitudes reached.
        """

    @abstractmethod
    def retreat_position(
        self, c: Constants, state: MomentumState, grad_velocity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x <- x - v`` in place; returns the restored position in the functions'
        dtype and ``(1 - gamma) * grad_velocity`` in that dtype (new tensors)."""

    @abstractmethod
    def retreat_velocity(
        self, c: Constants, state: MomentumState, y: torch.Tensor, residual: bool, split: bool
    ) -> None:
        """Undo the velocity and the store's digits of a step in place, given ``y``,
        the function's output recomputed on the position :meth:`retreat_position`
        restored. ``split`` as the step was computed (the split form is always exact)."""

    @abstractmethod
    def backpropagate(
        self,
        c: Constants,
        grad_x: torch.Tensor,
        grad_velocity: torch.Tensor,
        grad_input: torch.Tensor | None,
        residual: bool,
    ) -> None:
        r"""The gradients for a step's input state from those for its output, in place.

        On entry ``grad_x`` is the gradient for the step's new position and
        ``grad_velocity`` the total one for its new velocity (both ``float64``);
        ``grad_input`` is the function's vector-Jacobian product for its input
        (None if the output does not depend on it). On return they are the
        gradient for the step's input position and the total one for its input
        velocity: from :math:`x_{t+1} = x_t + v_{t+1}` and
        :math:`v_{t+1} = \gamma v_t + (1 - \gamma) f(x_t)` (with :math:`f(x) - x`
        if not ``residual``).
        """

    def __repr__(self) -> str:
        return f"<momentum backend {self.name!r}>"


def same_layout(reference: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``tensors`` are plain tensors on ``reference``'s device, shape and strides."""
    shape, strides, device = reference.shape, reference.stride(), reference.device
    return all(
        type(t) is torch.Tensor
        and t.device == device
        and t.shape == shape
        and t.stride() == strides
        for t in tensors
    )


def walks(
    doubles: tuple[torch.Tensor, ...],
    typed: tuple[torch.Tensor, ...],
    typed_dtypes: tuple[torch.dtype, ...],
) -> bool:
    """Whether a loop can walk ``doubles`` (``float64``) and ``typed`` (of
    ``typed_dtypes``) by a single index: plain tensors on one device, of one shape,
    whose elements lie in the same order in memory, with no gaps."""
    reference = doubles[0]
    if any(t.dtype != torch.float64 for t in doubles):
        return False
    if any(t.dtype not in typed_dtypes for t in typed):
        return False
    if not any(reference.is_contiguous(memory_format=layout) for layout in LAYOUTS):
        return False
    return same_layout(reference, doubles) and same_layout(reference, typed)
