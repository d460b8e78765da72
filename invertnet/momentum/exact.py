r"""Exact, reversible arithmetic for the momentum iteration.

Run in floating point, :math:`v_{t+1} = \gamma v_t + (1-\gamma) f_t(x_t)` cannot be
undone reliably: the inverse divides by :math:`\gamma` at every layer and the
rounding errors grow like :math:`\gamma^{-L}` (see
:class:`~invertnet.MomentumCoupling`). Here the state is held as integers instead,
so every step can be undone bit for bit:

* **Fixed point.** Position and velocity are whole numbers of units of
  :math:`2^{-s}`, with ``s`` fractional bits per dtype (:data:`SCALE_BITS`). They
  are held in ``float64`` tensors, which represent every integer below
  :math:`2^{53}` exactly and, unlike ``int64``, get vectorised arithmetic on every
  device. Every value is kept below :math:`2^{50}` (:data:`LIMIT`), where floor
  division is a multiplication and a rounding
  (:func:`~invertnet.momentum.fixed_point.floor_divmod`), so all the arithmetic
  below is exact. The functions see the position converted to their
  dtype; their outputs are converted to units by one deterministic rounding,
  which backward repeats on the very same values.
* **gamma as a fraction** ``n / d`` (:class:`~invertnet.momentum.gamma.Gamma`).
  Multiplying an integer by ``n / d`` is not invertible: it loses the remainder.
  Following Maclaurin, Duvenaud and Adams (2015, "Gradient-based hyperparameter
  optimization through reversible learning"), the lost information goes to a
  per-element *bit store* :math:`z`, used as a mixed-radix number:

  .. math::

     r = z \bmod n,\; z \leftarrow \lfloor z / n \rfloor,\qquad
     p = n v + r,\qquad
     v \leftarrow \lfloor p / d \rfloor,\; z \leftarrow d z + (p \bmod d).

  Drawing ``r`` from the store and putting ``p mod d`` back is a bijection, so the
  store grows by :math:`\log_2(d / n) = \log_2(1 / \gamma)` bits per element and
  layer on average, the information-theoretic minimum, and the product is off the
  true :math:`\gamma v` by less than one unit of :math:`2^{-s}`. All divisions are
  floor divisions with non-negative remainders, also for negative values.
* **The store grows instead of overflowing.** Its head is one ``float64`` per
  element; before a step could take a head past :data:`HEAD_LIMIT`, the low
  :data:`CHUNK_BITS` bits of every element are moved to a new ``int32`` chunk.
  How large a head can be follows from ``n``, ``d`` and the number of steps alone,
  so the chunks are cut on a fixed schedule, with no look at the data.
* **No host synchronisation per layer.** Whether the state stays in range is not
  known before a step: the product ``n v + r`` is computed in a split form that
  is exact for every velocity in range, and each step records the largest
  magnitudes of its update, position and velocity where they are computed (on
  the device, or returned by the CPU loops). :class:`RangeCheck` checks them
  once, at the end of the forward pass, before the pass returns: on the CPU it
  reads them and raises :class:`OverflowError` for the first that left the range;
  on an accelerator a device-side assert checks them, so that the host never
  waits for the device.

:class:`ExactMomentum` runs a step in four phases, :meth:`~ExactMomentum.advance`
in the forward pass and :meth:`~ExactMomentum.retreat_position`,
:meth:`~ExactMomentum.retreat_velocity` and :meth:`~ExactMomentum.backpropagate`
in backward, on the backend :func:`~invertnet.momentum.backends.select` picks once
per forward pass (:mod:`invertnet.momentum.backends`): one C loop per phase on
the CPU, one Triton kernel on CUDA, where they apply, with the same states; the
tensor operations of the reference backend serve everywhere else. The state and
its format are in :mod:`invertnet.momentum.fixed_point`.

Memory per element of ``x``: position, velocity and store head, 8 bytes each,
plus 4 bytes per 31 bits accumulated in chunks, about
:math:`4 L \log_2(1/\gamma) / 31` bytes after ``L`` layers. Measured (all bytes
saved for backward per element, ``f`` a tanh layer, float32):

=======  ======  =======  ========
gamma    L = 10  L = 100  L = 1000
=======  ======  =======  ========
0.99     24      24       24
0.9      24      24       40
0.5      24      32       148
0.1      24      64       448
=======  ======  =======  ========

against 4000 bytes for just the float32 inputs of 1000 layers. ``gamma = 0``
forgets the whole velocity at every layer (the iteration is then a plain ResNet,
which is not invertible): the velocity is stored whole, 8 bytes per element and
layer, so memory grows with depth as with ordinary backpropagation (but without
the functions' inner activations).

The supported range is :math:`|x|, |v|, |(1-\gamma) f| < 2^{50 - s}`
(:attr:`FixedPoint.max_abs`: about :math:`2.6 \cdot 10^5` for float32 and float64,
:math:`10^9` for float16 and bfloat16); beyond it, or for non-finite values, the
forward pass raises :class:`OverflowError` when it ends, before it returns
anything. The functions of the layers after the first value out of range have
then run on inputs out of range (their BatchNorm running statistics, for one,
have seen them).
"""

from __future__ import annotations

import torch

from invertnet.momentum.backends import REFERENCE, Backend, select
from invertnet.momentum.fixed_point import (
    CHUNK_BITS,
    HEAD_LIMIT,
    LIMIT,
    SCALE_BITS,
    BitStore,
    Constants,
    FixedPoint,
    MomentumState,
    RangeCheck,
)
from invertnet.momentum.gamma import Gamma

__all__ = [
    "CHUNK_BITS",
    "HEAD_LIMIT",
    "LIMIT",
    "SCALE_BITS",
    "BitStore",
    "ExactMomentum",
    "FixedPoint",
    "MomentumState",
    "RangeCheck",
]


class ExactMomentum:
    """The four phases of a step of the momentum iteration on fixed-point units.

    Parameters
    ----------
    gamma : Gamma
        The momentum term as a fraction ``n / d``.
    fixed : FixedPoint
        The fixed-point format of the state.
    backend : Backend, optional
        The backend of every phase. Without it, :meth:`start` selects one
        (:func:`~invertnet.momentum.backends.select`), once per forward pass.
    """

    def __init__(self, gamma: Gamma, fixed: FixedPoint, backend: Backend | None = None) -> None:
        self.constants = c = Constants.of(gamma, fixed)
        self.fixed = fixed
        self.mix = c.mix
        self._select = backend is None
        self._use(REFERENCE if backend is None else backend)

    def _use(self, backend: Backend) -> None:
        self.backend = backend
        # advance and retreat_velocity are the reference's alone for gamma 0 and 1.
        self._stepping = backend if self.constants.fractional else REFERENCE

    def start(
        self,
        position: torch.Tensor,
        velocity: torch.Tensor,
        velocity_peak: float | None = None,
    ) -> MomentumState:
        """The state from ``x_0`` and ``v_0`` in units (see :meth:`FixedPoint.to_fixed`).

        The tensors become the state's: steps write over them. ``velocity_peak``
        is the largest magnitude of ``v_0`` where it is known (0 for zeros). The
        backend for the pass is selected here, for the state.
        """
        store = BitStore.empty_like(position)
        state = MomentumState(position.mul_(self.fixed.unit), velocity, store, velocity_peak)
        if self._select:
            self._use(select(self.fixed.dtype, (store.head, velocity, state.position)))
        return state

    def inputs(self, state: MomentumState) -> torch.Tensor:
        """The position as the functions see it: its value in their dtype (a new tensor)."""
        return state.position.to(self.fixed.dtype, copy=True)

    @staticmethod
    def names(layer: int) -> tuple[str, str, str]:
        """How the error names the update, position and velocity that a step makes."""
        return (
            f"(1 - gamma) * f_{layer}(x_{layer})",
            f"the position x_{layer + 1}",
            f"the velocity v_{layer + 1}",
        )

    def _serving(
        self,
        backend: Backend,
        doubles: tuple[torch.Tensor, ...],
        typed: tuple[torch.Tensor, ...] = (),
    ) -> Backend:
        """``backend`` for a phase on these tensors, or the reference where it cannot
        walk them (a function's output transposed, or of another dtype): the same
        bits either way."""
        if backend is REFERENCE or backend.serves(self.fixed.dtype, doubles, typed):
            return backend
        return REFERENCE

    def _direct_product(self, state: MomentumState) -> bool:
        """Whether the next step may compute ``n v + r`` in one product: ``d |v|`` in range.

        Only where the velocity's magnitude is known on the host; otherwise the
        split form, exact for every velocity in range, serves.
        """
        peak = state.velocity_peak
        return peak is not None and self.constants.d * (peak + 2) < LIMIT

    def advance(
        self,
        state: MomentumState,
        y: torch.Tensor,
        residual: bool,
        layer: int,
        checks: RangeCheck | None = None,
    ) -> torch.Tensor:
        """The forward step of layer ``layer`` in place, from its function's output ``y``.

        ``v <- gamma v + (1 - gamma) f``, ``x <- x + v``, with ``f`` ``y`` or, with
        ``residual=False``, ``y - x``. Returns the new position as the functions
        see it. The state is the same, bit for bit, whichever backend computes it.
        The magnitudes of the update and of the new state are recorded in
        ``checks``, or without it checked at once (raising :class:`OverflowError`);
        the step itself is exact while they are in range, so nothing is lost.
        """
        backend = self._serving(
            self._stepping, (state.store.head, state.velocity, state.position), (y,)
        )
        # The reference always takes the split form.
        direct = backend is not REFERENCE and self._direct_product(state)
        state.store.begin_step(self.constants.n, self.constants.d)
        if direct:
            state.direct_at.add(state.store.steps - 1)
        out, peaks = backend.advance(self.constants, state, y, residual, not direct)
        velocity = peaks.velocity
        state.velocity_peak = velocity if isinstance(velocity, float) else None
        now = RangeCheck(self.fixed) if checks is None else checks
        update_name, position_name, velocity_name = self.names(layer)
        now.record(update_name, peaks.update)
        now.record(position_name, peaks.position, self.fixed.scale)
        now.record(velocity_name, velocity)
        if checks is None:
            now.check()
        return out

    def retreat_position(
        self, state: MomentumState, grad_velocity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First phase of backward: ``x <- x - v``.

        Returns the restored position as the functions see it, and the gradient for
        the function's output, ``(1 - gamma)`` times ``grad_velocity`` (that of the
        velocity the step made, ``float64``), in the functions' dtype.
        """
        backend = self._serving(self.backend, (state.velocity, state.position, grad_velocity))
        return backend.retreat_position(self.constants, state, grad_velocity)

    def retreat_velocity(self, state: MomentumState, y: torch.Tensor, residual: bool) -> None:
        """Second phase of backward: undo the velocity and the store's digits.

        ``y`` is the function's output, recomputed on the position that
        :meth:`retreat_position` restored.
        """
        store = state.store
        backend = self._serving(self._stepping, (store.head, state.velocity, state.position), (y,))
        split = store.steps - 1 not in state.direct_at
        backend.retreat_velocity(self.constants, state, y, residual, split)
        store.end_retreat()

    def backpropagate(
        self,
        grad_x: torch.Tensor,
        grad_velocity: torch.Tensor,
        grad_input: torch.Tensor | None,
        residual: bool,
    ) -> None:
        """Third phase of backward: the gradients for a step's input state, in place
        (see :meth:`Backend.backpropagate <invertnet.momentum.backends.Backend.backpropagate>`)."""
        typed = () if grad_input is None else (grad_input,)
        backend = self._serving(self.backend, (grad_x, grad_velocity), typed)
        backend.backpropagate(self.constants, grad_x, grad_velocity, grad_input, residual)
