r"""Exact, reversible arithmetic for the momentum iteration.

Run in floating point, :math:`v_{t+1} = \gamma v_t + (1-\gamma) f_t(x_t)` cannot be
undone reliably: the inverse divides by :math:`\gamma` at every layer and the
rounding errors grow like :math:`\gamma^{-L}` (see
:class:`~invertnet.MomentumCoupling`). Here the state is held in integers instead,
so every step can be undone bit for bit:

* **Fixed point.** Position and velocity are ``int64`` tensors counting units of
  :math:`2^{-s}`, with ``s`` fractional bits per dtype (:data:`SCALE_BITS`). The
  functions see the state converted back to floats; their outputs are converted
  to fixed point by one deterministic rounding, which backward repeats on the very
  same values.
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
  true :math:`\gamma v` by less than two units of :math:`2^{-s}`. All divisions are
  floor divisions with non-negative remainders, also for negative values.
* **The store grows instead of overflowing.** Its head is one ``int64`` per
  element; whenever a head would pass :data:`HEAD_LIMIT`, the low
  :data:`CHUNK_BITS` bits of every element are moved to a new ``int32`` chunk.

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

The supported range is :math:`|x|, |v|, |(1-\gamma) f| < 2^{60 - s}`
(:meth:`FixedPoint.max_abs`); beyond it, or for non-finite values, the forward
pass raises :class:`OverflowError` before anything is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
]

#: Fractional bits of the fixed-point state, per dtype of ``x``: finer than the
#: dtype's own resolution for values of magnitude above 2**-9 (float32) or 2**-14
#: (float64), with room for magnitudes up to 2**28 (float32) or 2**22 (float64).
SCALE_BITS: dict[torch.dtype, int] = {
    torch.float64: 38,
    torch.float32: 32,
    torch.float16: 24,
    torch.bfloat16: 24,
}

#: Largest magnitude, in fixed-point units, of a position, velocity or update.
#: Sums of two such values stay far below the int64 limit of 2**63.
LIMIT = 2**60

#: Bits moved from a store head to a chunk at a time (an int32 holds 31 bits).
CHUNK_BITS = 31

#: A head at or above this is flushed to a chunk before it is multiplied by a
#: denominator (at most 2**20), keeping it below 2**60.
HEAD_LIMIT = 2**40

_CHUNK_MASK = (1 << CHUNK_BITS) - 1


def _divmod(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Floor quotient and non-negative remainder (one integer division, not two)."""
    q = torch.div(a, b, rounding_mode="floor")
    return q, a - q * b


class FixedPoint:
    """Conversion between floats and ``int64`` fixed point for one dtype.

    Parameters
    ----------
    dtype : torch.dtype
        The floating-point dtype of the network's input.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype not in SCALE_BITS:
            raise TypeError(
                f"exact momentum arithmetic supports {', '.join(map(str, SCALE_BITS))}; got {dtype}"
            )
        self.dtype = dtype
        self.bits = SCALE_BITS[dtype]

    @property
    def max_abs(self) -> float:
        """The largest magnitude (exclusive) of a value that can be represented."""
        return LIMIT * 2.0**-self.bits

    def to_fixed(self, y: torch.Tensor, what: str) -> torch.Tensor:
        """Round ``y`` to the nearest multiple of ``2**-bits``, as an ``int64`` count.

        Raises
        ------
        OverflowError
            If ``y`` is not finite or its magnitude reaches :attr:`max_abs`.
        """
        # Scaling by a power of two is exact in float64, so this is deterministic.
        scaled = y.to(torch.float64) * float(2**self.bits)
        self.check(scaled.abs().max() if scaled.numel() else None, what)
        return torch.round(scaled).to(torch.int64)

    def check(self, largest: torch.Tensor | float | None, what: str) -> None:
        """Raise :class:`OverflowError` if ``largest`` (in units) is out of range."""
        if largest is None:
            return
        value = float(largest)
        if not value < LIMIT:  # also catches NaN
            shown = value * 2.0**-self.bits
            raise OverflowError(
                f"MomentumNet(use_backprop=False): {what} reaches magnitude {shown:.4g}, beyond "
                f"the {self.max_abs:.4g} that exact reversal supports for {self.dtype} "
                f"(int64 fixed point with {self.bits} fractional bits); nothing was stored. "
                "Rescale the input or the functions, or use use_backprop=True"
            )

    def to_float(self, fixed: torch.Tensor) -> torch.Tensor:
        """The value of a fixed-point tensor, in float64."""
        return fixed.to(torch.float64) * 2.0**-self.bits


@dataclass
class BitStore:
    """Per-element unbounded natural numbers, used as a stack of mixed-radix digits.

    The number of each element is ``head + 2**31 * (chunk_k + 2**31 * (...))``:
    the head holds the most recent digits, chunks the older ones.

    Parameters
    ----------
    head : torch.Tensor
        ``int64``, non-negative, below :data:`HEAD_LIMIT` times a base.
    chunks : list of torch.Tensor
        ``int32`` chunks of :data:`CHUNK_BITS` bits each, oldest first.
    chunk_at : list of int
        For each chunk, the number of steps begun before it was flushed.
    kept : list of torch.Tensor
        Whole ``int64`` values stored by :meth:`keep` (``gamma = 0``).
    steps : int
        Steps begun (:meth:`begin_step`) and not undone (:meth:`end_unstep`).
    """

    head: torch.Tensor
    chunks: list[torch.Tensor] = field(default_factory=list)
    chunk_at: list[int] = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0

    @staticmethod
    def empty_like(x: torch.Tensor) -> BitStore:
        """A store of zeros, one number per element of ``x``."""
        return BitStore(torch.zeros(x.shape, dtype=torch.int64, device=x.device))

    def copy(self) -> BitStore:
        """A copy whose stacks can be popped without changing this store."""
        return BitStore(
            self.head, list(self.chunks), list(self.chunk_at), list(self.kept), self.steps
        )

    def nbytes(self) -> int:
        """Bytes held by the store."""
        tensors = [self.head, *self.chunks, *self.kept]
        return sum(t.numel() * t.element_size() for t in tensors)

    def begin_step(self, head_max: float) -> None:
        """Start a step, first moving the heads' low bits to a chunk if ``head_max`` is large."""
        if head_max >= HEAD_LIMIT:
            self.chunks.append((self.head & _CHUNK_MASK).to(torch.int32))
            self.chunk_at.append(self.steps)
            self.head = self.head >> CHUNK_BITS
        self.steps += 1

    def end_unstep(self) -> None:
        """Finish undoing a step: bring back the chunk flushed when it began, if any."""
        self.steps -= 1
        if self.chunk_at and self.chunk_at[-1] == self.steps:
            self.chunk_at.pop()
            self.head = (self.head << CHUNK_BITS) | self.chunks.pop().to(torch.int64)

    def push(self, digit: torch.Tensor, base: int) -> None:
        """``z <- base * z + digit`` for digits in ``[0, base)``."""
        self.head = self.head * base + digit

    def pop(self, base: int) -> torch.Tensor:
        """Undo :meth:`push`: return ``z mod base`` and set ``z <- z // base``."""
        self.head, digit = _divmod(self.head, base)
        return digit

    def draw(self, base: int) -> torch.Tensor:
        """Take a digit in ``[0, base)`` from the store: ``z mod base``, ``z <- z // base``."""
        self.head, digit = _divmod(self.head, base)
        return digit

    def undraw(self, digit: torch.Tensor, base: int) -> None:
        """Undo :meth:`draw`."""
        self.head = self.head * base + digit

    def keep(self, value: torch.Tensor) -> None:
        """Store a whole tensor."""
        self.kept.append(value)

    def unkeep(self) -> torch.Tensor:
        """Undo :meth:`keep`."""
        return self.kept.pop()

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to save for backward (see :meth:`from_tensors`)."""
        return [self.head, *self.chunks, *self.kept]

    def layout(self) -> tuple[list[int], int, int]:
        """What :meth:`from_tensors` needs besides the tensors."""
        return list(self.chunk_at), len(self.kept), self.steps

    @staticmethod
    def from_tensors(
        tensors: list[torch.Tensor] | tuple[torch.Tensor, ...], layout: tuple[list[int], int, int]
    ) -> BitStore:
        """Rebuild a store saved as ``tensors()`` and ``layout()``."""
        chunk_at, n_kept, steps = layout
        head, rest = tensors[0], list(tensors[1:])
        n_chunks = len(rest) - n_kept
        return BitStore(head, rest[:n_chunks], list(chunk_at), rest[n_chunks:], steps)


@dataclass
class MomentumState:
    """Position, velocity and bit store of the exact iteration."""

    position: torch.Tensor
    velocity: torch.Tensor
    store: BitStore


class ExactMomentum:
    """One step of the momentum iteration on fixed-point integers, and its inverse.

    Parameters
    ----------
    gamma : Gamma
        The momentum term as a fraction ``n / d``.
    fixed : FixedPoint
        The fixed-point format of the state (used in error messages).
    """

    def __init__(self, gamma: Gamma, fixed: FixedPoint) -> None:
        self.n = gamma.numerator
        self.d = gamma.denominator
        self.fixed = fixed

    def start(self, position: torch.Tensor, velocity: torch.Tensor) -> MomentumState:
        """The state from fixed-point ``x_0`` and ``v_0``."""
        return MomentumState(position, velocity, BitStore.empty_like(position))

    def check(self, state: MomentumState, layer: int) -> float:
        """Raise :class:`OverflowError` if the state left the supported range.

        Called before each step and after the last; the integers cannot wrap in
        between, as each step adds at most two in-range values. Returns the largest
        store head (one synchronisation for all three statistics).
        """
        if state.position.numel() == 0:
            return 0.0
        stats = torch.stack(
            [
                state.position.abs().max(),
                state.velocity.abs().max(),
                state.store.head.max(),
            ]
        ).tolist()
        self.fixed.check(stats[0], f"the position x_{layer}")
        self.fixed.check(stats[1], f"the velocity v_{layer}")
        return stats[2]

    def _scale_velocity(self, state: MomentumState) -> None:
        v, n, d, store = state.velocity, self.n, self.d, state.store
        if n == d:
            return
        if n == 0:
            store.keep(v)
            state.velocity = torch.zeros_like(v)
            return
        # p = n * v + r, split so that no intermediate exceeds about |v|:
        # with v = a * d + b, p = a * n * d + (b * n + r).
        r = store.draw(n)
        a, b = _divmod(v, d)
        high, digit = _divmod(b * n + r, d)
        state.velocity = a * n + high
        store.push(digit, d)

    def _unscale_velocity(self, state: MomentumState) -> None:
        v, n, d, store = state.velocity, self.n, self.d, state.store
        if n == d:
            return
        if n == 0:
            state.velocity = store.unkeep()
            return
        # p = d * v + s; with v = e * n + f, p = e * d * n + (f * d + s).
        s = store.pop(d)
        e, f = _divmod(v, n)
        high, digit = _divmod(f * d + s, n)
        state.velocity = e * d + high
        store.undraw(digit, n)

    def step(self, state: MomentumState, update: torch.Tensor, layer: int) -> None:
        """``v <- gamma v + update``, ``x <- x + v`` (``update`` is ``(1-gamma) f`` in units).

        Raises :class:`OverflowError`, before changing anything, if the state is out
        of range.
        """
        head_max = self.check(state, layer)
        state.store.begin_step(head_max)
        self._scale_velocity(state)
        state.velocity = state.velocity + update
        state.position = state.position + state.velocity

    def unstep_position(self, state: MomentumState) -> torch.Tensor:
        """First half of the inverse: ``x <- x - v``; returns the restored position."""
        state.position = state.position - state.velocity
        return state.position

    def unstep_velocity(self, state: MomentumState, update: torch.Tensor) -> None:
        """Second half of the inverse, given the update recomputed from the restored position."""
        state.velocity = state.velocity - update
        self._unscale_velocity(state)
        state.store.end_unstep()
