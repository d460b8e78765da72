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
  division is a multiplication and a rounding (:func:`_floor_divmod`), so all
  the arithmetic below is exact. The functions see the position converted to their
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

:class:`ExactMomentum`'s fused methods (:meth:`~ExactMomentum.advance`,
:meth:`~ExactMomentum.retreat_position`, :meth:`~ExactMomentum.retreat_velocity`,
:meth:`~ExactMomentum.backpropagate`) run each phase of a step as one C loop on
the CPU, or one Triton kernel on CUDA (:mod:`invertnet.momentum.kernels`), where
it applies, with the same states; the tensor operations here are the reference
and serve everywhere else.

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

import functools
import math
from dataclasses import dataclass, field

import torch

from invertnet._torch_private import assert_on_device
from invertnet.momentum import kernels
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

#: Fractional bits of the fixed-point state, per dtype of ``x``. With 32, the
#: grid is finer than float32's own resolution for magnitudes above 2**-9; for
#: float64 it is a fixed 2**-32, the price of holding the state in 53 bits (the two
#: modes then differ by about that much, far below the 1e-6 they must agree to).
SCALE_BITS: dict[torch.dtype, int] = {
    torch.float64: 32,
    torch.float32: 32,
    torch.float16: 20,
    torch.bfloat16: 20,
}

#: Largest magnitude, in units, of a position, velocity or update, and of the
#: numbers divided in a step: below it, :func:`_floor_divmod` is exact. One step
#: adds at most three such values, which stays below 2**53, where float64 stops
#: holding every integer.
LIMIT = 2**50

#: Bits moved from a store head to a chunk at a time (an int32 holds 31 bits).
CHUNK_BITS = 31

#: Store heads stay below this, so that dividing one by a numerator or a
#: denominator (at most 2**20) is exact (see :func:`_floor_divmod`).
HEAD_LIMIT = 2**50

_CHUNK_BASE = float(2**CHUNK_BITS)


@functools.lru_cache(maxsize=64)
def _quotient_terms(device: torch.device, b: int) -> tuple[float, torch.Tensor]:
    """``1 / b`` and ``(1 - b) / (2 b)``, rounded to float64, the latter on ``device``."""
    return 1.0 / b, torch.tensor((1 - b) / (2 * b), dtype=torch.float64, device=device)


def _floor_divmod(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Floor quotient and non-negative remainder of integer-valued ``a`` by ``b``.

    Exact for ``|a| < 2**50`` and ``b < 2**21``, with no division: a division
    costs twice a multiplication, and on CUDA ``a / b`` for a Python number ``b``
    is itself a multiplication by a rounded reciprocal. Write ``a / b = m + j / b``
    with ``m`` whole and ``0 <= j < b``; then
    ``a / b + (1 - b) / (2 b) = m + (2 j + 1 - b) / (2 b)`` lies within
    ``1/2 - 1 / (2 b)`` of ``m``, so rounding it to the nearest integer gives
    ``m`` as long as the computed value errs by less than ``1 / (2 b)``. Computed
    as ``(1 - b) / (2 b) + a * (1 / b)`` with every constant and operation rounded
    (fused or not), it errs by at most ``1.5 * 2**-52 * |a| / b + 2**-53``, which
    is below ``0.4 / b`` when ``|a| < 2**50``. The remainder ``a - b m`` is then
    exact, and is written over ``a``, which must be a scratch tensor.
    """
    inverse, offset = _quotient_terms(a.device, b)
    q = torch.add(offset, a, alpha=inverse).round_()
    return q, a.sub_(q, alpha=b)


class FixedPoint:
    """Conversion between floats and fixed-point units for one dtype.

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
        #: The value of one unit, and the number of units in 1 (powers of two, so
        #: scaling by either is exact).
        self.unit = 2.0**-self.bits
        self.scale = 2.0**self.bits

    @property
    def max_abs(self) -> float:
        """The largest magnitude (exclusive) of a value that can be represented."""
        return LIMIT * self.unit

    def to_fixed(
        self, y: torch.Tensor, what: str, checks: RangeCheck | None = None
    ) -> torch.Tensor:
        """Round ``y`` to a whole number of units (a float64 tensor of units).

        Its range is recorded in ``checks``, or without it checked at once.

        Raises
        ------
        OverflowError
            Without ``checks``, if ``y`` is not finite or its magnitude reaches
            :attr:`max_abs`.
        """
        now = RangeCheck(self) if checks is None else checks
        now.measure(what, y, self.scale)
        if checks is None:
            now.check()
        return y.detach().to(torch.float64, copy=True).mul_(self.scale).round_()

    def check(self, largest: float, what: str) -> None:
        """Raise :class:`OverflowError` if ``largest`` (in units) is out of range."""
        if not largest < LIMIT:  # also catches NaN
            shown = largest * self.unit
            raise OverflowError(
                f"MomentumNet(use_backprop=False): {what} reaches magnitude {shown:.4g}, beyond "
                f"the {self.max_abs:.4g} that exact reversal supports for {self.dtype} "
                f"(fixed point with {self.bits} fractional bits, exact below 2**53); nothing "
                "was stored. Rescale the input or the functions, or use use_backprop=True"
            )


def _largest(values: list[float]) -> float:
    """The largest magnitude among ``values``: NaN if one is NaN, 0 if there are none."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max((abs(v) for v in values), default=0.0)


@dataclass
class _Record:
    what: str
    # Units per recorded value (the position is recorded as its value).
    scale: float
    # Known on the host (from the CPU loops), or tensors whose largest magnitude
    # is the one to check, read at the end.
    known: float | None = None
    tensors: tuple[torch.Tensor, ...] = ()


class RangeCheck:
    """The magnitudes a forward pass must keep below :data:`LIMIT`, checked once.

    Each step records the largest magnitudes of what it computes as it computes
    them: as 0-dimensional tensors where they stay on the device, as numbers where
    a CPU loop returns them. :meth:`check` reads the tensors in one transfer and
    raises for the first record, in the order recorded, that is out of range.

    Parameters
    ----------
    fixed : FixedPoint
        The fixed-point format, for the error message.
    """

    def __init__(self, fixed: FixedPoint) -> None:
        self.fixed = fixed
        self._records: list[_Record] = []
        self._slots: torch.Tensor | None = None
        self._slots_used = 0

    def measure(self, what: str, t: torch.Tensor, scale: float = 1.0) -> None:
        """Record the largest magnitude of ``t`` times ``scale`` (one pass, on its device)."""
        if t.numel():
            self._records.append(_Record(what, scale, tensors=tuple(torch.aminmax(t.detach()))))

    def known(self, what: str, largest: float, scale: float = 1.0) -> None:
        """Record a largest magnitude known on the host."""
        self._records.append(_Record(what, scale, known=largest))

    def slots(self, count: int, device: torch.device) -> torch.Tensor:
        """``count`` zeros of float64 on ``device``, for a kernel to write magnitudes into.

        They come from a buffer allocated for many layers at once, not one per layer.
        """
        buffer = self._slots
        if buffer is None or buffer.device != device or self._slots_used + count > len(buffer):
            buffer = self._slots = torch.zeros(
                max(64 * count, count), dtype=torch.float64, device=device
            )
            self._slots_used = 0
        start, self._slots_used = self._slots_used, self._slots_used + count
        return buffer[start : start + count]

    def written(self, what: str, slot: torch.Tensor, scale: float = 1.0) -> None:
        """Record the magnitude a kernel wrote into ``slot`` (one element of :meth:`slots`)."""
        self._records.append(_Record(what, scale, tensors=(slot,)))

    def check(self, read_on_host: bool = False) -> None:
        """Raise :class:`OverflowError` for the first record out of range; then forget them all.

        Records known on the host or held on the CPU are read with one transfer.
        Records on an accelerator are checked by a device-side assert instead, so
        that the host never waits for the device (a failure ends the process's use
        of the device, with a message that says how to find the value); with
        ``read_on_host`` they are read too, for an error message that names the
        layer (on a path that is failing anyway).
        """
        records, self._records = self._records, []
        self._slots, self._slots_used = None, 0
        on_device: dict[torch.device, list[_Record]] = {}
        on_host = []
        for record in records:
            device = record.tensors[0].device if record.tensors else None
            if device is None or device.type == "cpu" or read_on_host:
                on_host.append(record)
            else:
                on_device.setdefault(device, []).append(record)
        tensors = [t for record in on_host for t in record.tensors]
        values = iter(torch.stack(tensors).tolist() if tensors else [])
        for record in on_host:
            if record.known is not None:
                largest = record.known
            else:
                largest = _largest([next(values) for _ in record.tensors])
            self.fixed.check(largest * record.scale, record.what)
        for device_records in on_device.values():
            _assert_in_range_on_device(device_records, self.fixed)


def _assert_in_range_on_device(records: list[_Record], fixed: FixedPoint) -> None:
    """Check that every record's largest magnitude, in units, is below :data:`LIMIT`
    (and not NaN), in a kernel: a few operations per scale, whatever the depth."""
    by_scale: dict[tuple[float, torch.dtype], list[torch.Tensor]] = {}
    for record in records:
        for t in record.tensors:
            by_scale.setdefault((record.scale, t.dtype), []).append(t)
    # In float64, as the host computes: a float32 magnitude times 2**s could overflow.
    # amax propagates NaN, and NaN < LIMIT is false.
    peaks = [
        torch.stack(group).abs().amax().double() * scale for (scale, _), group in by_scale.items()
    ]
    in_range = (torch.stack(peaks) < LIMIT).all()
    assert_on_device(
        in_range,
        # At most 254 bytes (a device-side assert's limit): the CPU's OverflowError
        # says more.
        "MomentumNet(use_backprop=False): a state or (1 - gamma) * f value is NaN or "
        f"beyond the {fixed.max_abs:.4g} that exact reversal supports for {fixed.dtype}. "
        "Rescale the input or functions, or use use_backprop=True; on the CPU the error "
        "names the layer",
    )


@dataclass
class BitStore:
    """Per-element unbounded natural numbers, used as a stack of mixed-radix digits.

    The number of each element is ``head + 2**31 * (chunk_k + 2**31 * (...))``:
    the head holds the most recent digits, chunks the older ones.

    Parameters
    ----------
    head : torch.Tensor
        ``float64`` whole numbers in ``[0, head_bound]``.
    head_bound : int
        An upper bound on the head, known on the host without looking at it: it
        follows from the digits' bases and the number of steps alone.
    chunks : list of torch.Tensor
        ``int32`` chunks of :data:`CHUNK_BITS` bits each, oldest first.
    chunk_at : list of int
        For each chunk, the number of steps begun before it was cut.
    kept : list of torch.Tensor
        Whole velocities stored by :meth:`keep` (``gamma = 0``).
    steps : int
        Steps begun (:meth:`begin_step`) and not undone (:meth:`end_unstep`).
    """

    head: torch.Tensor
    head_bound: int = 0
    chunks: list[torch.Tensor] = field(default_factory=list)
    chunk_at: list[int] = field(default_factory=list)
    kept: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0

    @staticmethod
    def empty_like(x: torch.Tensor) -> BitStore:
        """A store of zeros, one number per element of ``x``."""
        return BitStore(torch.zeros_like(x, dtype=torch.float64))  # in the layout of x

    def nbytes(self) -> int:
        """Bytes held by the store."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def begin_step(self, numerator: int, denominator: int) -> None:
        """Start a step that draws a digit in base ``numerator`` and pushes one in base
        ``denominator``, first cutting a chunk if the head could otherwise pass
        :data:`HEAD_LIMIT`."""
        if 0 < numerator < denominator:
            if (self.head_bound // numerator + 1) * denominator >= HEAD_LIMIT:
                # Exact: scaling by a power of two, then whole numbers.
                high = torch.mul(self.head, 1.0 / _CHUNK_BASE).floor_()
                self.chunks.append(torch.sub(self.head, high, alpha=_CHUNK_BASE).to(torch.int32))
                self.chunk_at.append(self.steps)
                self.head = high
                self.head_bound >>= CHUNK_BITS
            self.head_bound = (self.head_bound // numerator + 1) * denominator - 1
        self.steps += 1

    def end_unstep(self) -> None:
        """Finish undoing a step: bring back the chunk cut when it began, if any."""
        self.steps -= 1
        if self.chunk_at and self.chunk_at[-1] == self.steps:
            self.chunk_at.pop()
            low = self.chunks.pop().to(torch.float64)
            self.head = low.add_(self.head, alpha=_CHUNK_BASE)

    def draw(self, base: int) -> torch.Tensor:
        """Take a digit in ``[0, base)`` from the store: ``z mod base``, ``z <- z // base``."""
        self.head, digit = _floor_divmod(self.head, base)
        return digit

    def push(self, digit: torch.Tensor, base: int) -> None:
        """``z <- base * z + digit`` for digits in ``[0, base)`` (written over ``digit``)."""
        self.head = digit.add_(self.head, alpha=base)

    # Undoing a step pops what it pushed and puts back what it drew.
    pop = draw
    undraw = push

    def keep(self, value: torch.Tensor) -> None:
        """Store a whole tensor."""
        self.kept.append(value)

    def unkeep(self) -> torch.Tensor:
        """Undo :meth:`keep` (a copy: the kept tensor may be saved for backward)."""
        return self.kept.pop().clone()

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
        """Rebuild a store saved as ``tensors()`` and ``layout()``.

        The head is copied, as undoing steps writes over it; chunks and kept
        tensors are only read.
        """
        chunk_at, n_kept, steps = layout
        head, rest = tensors[0], list(tensors[1:])
        n_chunks = len(rest) - n_kept
        return BitStore(head.clone(), 0, rest[:n_chunks], list(chunk_at), rest[n_chunks:], steps)


@dataclass
class MomentumState:
    """Position, velocity and bit store of the exact iteration.

    The velocity is held in units; the position as its value, a multiple of one
    unit, so that the functions' inputs take one conversion. Both are float64.

    ``velocity_peak`` is the largest magnitude of the velocity where the host
    knows it without reading a tensor (the CPU loops return it), else None.
    ``direct_at`` lists the steps that computed ``n v + r`` in one product, which
    that magnitude showed to be exact; the others took the split form.
    """

    position: torch.Tensor
    velocity: torch.Tensor
    store: BitStore
    velocity_peak: float | None = None
    direct_at: set[int] = field(default_factory=set)


class ExactMomentum:
    """One step of the momentum iteration on fixed-point units, and its inverse.

    Parameters
    ----------
    gamma : Gamma
        The momentum term as a fraction ``n / d``.
    fixed : FixedPoint
        The fixed-point format of the state.
    """

    def __init__(self, gamma: Gamma, fixed: FixedPoint) -> None:
        self.n = gamma.numerator
        self.d = gamma.denominator
        self.keep = gamma.value
        self.mix = gamma.complement
        self.fixed = fixed
        # (1 - gamma) in units per unit of f, as the plain mode multiplies by it.
        self.mix_units = gamma.complement * fixed.scale

    def start(
        self,
        position: torch.Tensor,
        velocity: torch.Tensor,
        velocity_peak: float | None = None,
    ) -> MomentumState:
        """The state from ``x_0`` and ``v_0`` in units (see :meth:`FixedPoint.to_fixed`).

        The tensors become the state's: steps write over them. ``velocity_peak``
        is the largest magnitude of ``v_0`` where it is known (0 for zeros).
        """
        store = BitStore.empty_like(position)
        return MomentumState(position.mul_(self.fixed.unit), velocity, store, velocity_peak)

    def inputs(self, state: MomentumState) -> torch.Tensor:
        """The position as the functions see it: its value in their dtype (a new tensor)."""
        return state.position.to(self.fixed.dtype, copy=True)

    def update(self, state: MomentumState, y: torch.Tensor, residual: bool) -> torch.Tensor:
        """``(1 - gamma) * f`` in units, from a function's output ``y``.

        With ``residual=False`` the functions are whole blocks and the step is
        ``y - x``.
        """
        step = y.detach().to(torch.float64, copy=True)
        if not residual:
            step.sub_(state.position)
        return step.mul_(self.mix_units).round_()

    @staticmethod
    def names(layer: int) -> tuple[str, str, str]:
        """How the error names the update, position and velocity that a step makes."""
        return (
            f"(1 - gamma) * f_{layer}(x_{layer})",
            f"the position x_{layer + 1}",
            f"the velocity v_{layer + 1}",
        )

    def _fused(self) -> bool:
        """Whether a step is one the kernels do: ``0 < n < d`` (0 and 1 are rare)."""
        return 0 < self.n < self.d

    def _direct_product(self, state: MomentumState) -> bool:
        """Whether the next step may compute ``n v + r`` in one product: ``d |v|`` in range.

        Only where the velocity's magnitude is known on the host; otherwise the
        split form, exact for every velocity in range, serves.
        """
        peak = state.velocity_peak
        return peak is not None and self.d * (peak + 2) < LIMIT

    def advance(
        self,
        state: MomentumState,
        y: torch.Tensor,
        residual: bool,
        layer: int,
        checks: RangeCheck | None = None,
    ) -> torch.Tensor:
        """:meth:`update`, :meth:`step` and :meth:`inputs` in one, fused where it can be.

        Returns the new position as the functions see it. The state is the same,
        bit for bit, whichever way the step is computed (:mod:`~invertnet.momentum.kernels`).
        The magnitudes reached are recorded in ``checks``, or without it checked at once.
        """
        now = RangeCheck(self.fixed) if checks is None else checks
        if self._fused() and kernels.usable(
            self.fixed.dtype, (state.store.head, state.velocity, state.position), (y,)
        ):
            direct = self._direct_product(state)
            state.store.begin_step(self.n, self.d)
            if direct:
                state.direct_at.add(state.store.steps - 1)
            out = torch.empty_like(state.position, dtype=self.fixed.dtype)
            state.velocity_peak = kernels.step(
                state.store.head, state.velocity, state.position, y.detach(), out,
                self.n, self.d, self.mix_units, self.fixed.unit, residual, not direct,
                now, self.names(layer), self.fixed.scale,
            )  # fmt: skip
            result = out
        else:
            self.step(state, self.update(state, y, residual), layer, now)
            result = self.inputs(state)
        if checks is None:
            now.check()
        return result

    def step(
        self,
        state: MomentumState,
        update: torch.Tensor,
        layer: int,
        checks: RangeCheck | None = None,
    ) -> None:
        """``v <- gamma v + update``, ``x <- x + v``, with ``update`` from :meth:`update`.

        The magnitudes of the update and of the new state are recorded in
        ``checks``, or without it checked at once (raising :class:`OverflowError`);
        the step itself is exact while they are in range, so nothing is lost.
        """
        now = RangeCheck(self.fixed) if checks is None else checks
        update_name, position_name, velocity_name = self.names(layer)
        now.measure(update_name, update)
        state.store.begin_step(self.n, self.d)
        n, d, store = self.n, self.d, state.store
        v = state.velocity
        if n == 0:
            store.keep(v)
            v = update
        elif n == d:
            v = v.add_(update)
        else:
            # v = a d + b with 0 <= b < d, so that n v + r = a n d + (b n + r): every
            # intermediate stays below |v| in magnitude, whatever v is in range.
            a, b = _floor_divmod(v, d)
            high, digit = _floor_divmod(store.draw(n).add_(b, alpha=n), d)
            store.push(digit, d)
            v = high.add_(a, alpha=n).add_(update)
        state.velocity = v
        state.velocity_peak = None
        state.position.add_(v, alpha=self.fixed.unit)
        now.measure(position_name, state.position, self.fixed.scale)
        now.measure(velocity_name, v)
        if checks is None:
            now.check()

    def unstep_position(self, state: MomentumState) -> None:
        """First half of the inverse: ``x <- x - v``."""
        state.position.sub_(state.velocity, alpha=self.fixed.unit)

    def unstep_velocity(self, state: MomentumState, update: torch.Tensor) -> None:
        """Second half of the inverse, given the update recomputed from the restored position."""
        n, d, store = self.n, self.d, state.store
        v = state.velocity.sub_(update)
        if n == 0:
            v = store.unkeep()
        elif n == d:
            pass
        else:
            # v = e n + f with 0 <= f < n, so that d v + s = e d n + (f d + s).
            e, f = _floor_divmod(v, n)
            high, r = _floor_divmod(store.pop(d).add_(f, alpha=d), n)
            store.undraw(r, n)
            v = high.add_(e, alpha=d)
        state.velocity = v
        store.end_unstep()

    def retreat_position(
        self, state: MomentumState, grad_velocity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`unstep_position` and :meth:`inputs` in one, fused where it can be.

        Also returns the gradient for the function's output, ``(1 - gamma)``
        times ``grad_velocity`` (that of the velocity the step made, ``float64``),
        in the functions' dtype.
        """
        dtype = self.fixed.dtype
        if kernels.usable(dtype, (state.velocity, state.position, grad_velocity), ()):
            out = torch.empty_like(state.position, dtype=dtype)
            grad_y = torch.empty_like(out)
            kernels.unstep_position(
                state.velocity, state.position, grad_velocity, out, grad_y,
                self.fixed.unit, self.mix,
            )  # fmt: skip
            return out, grad_y
        self.unstep_position(state)
        return self.inputs(state), (grad_velocity * self.mix).to(dtype)

    def retreat_velocity(self, state: MomentumState, y: torch.Tensor, residual: bool) -> None:
        """:meth:`update` and :meth:`unstep_velocity` in one, fused where it can be.

        ``y`` is the function's output, recomputed on the position that
        :meth:`retreat_position` restored.
        """
        store = state.store
        if self._fused() and kernels.usable(
            self.fixed.dtype, (store.head, state.velocity, state.position), (y,)
        ):
            split = store.steps - 1 not in state.direct_at
            kernels.unstep_velocity(
                store.head, state.velocity, state.position, y.detach(),
                self.n, self.d, self.mix_units, residual, split,
            )  # fmt: skip
            store.end_unstep()
            return
        self.unstep_velocity(state, self.update(state, y, residual))

    def backpropagate(
        self,
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
        typed = () if grad_input is None else (grad_input,)
        if kernels.usable(self.fixed.dtype, (grad_x, grad_velocity), typed):
            kernels.accumulate(
                grad_x, grad_velocity, grad_input, self.fixed.dtype, self.keep, self.mix, residual
            )
            return
        if grad_input is not None:
            grad_x.add_(grad_input)
        if not residual:
            grad_x.sub_(grad_velocity, alpha=self.mix)
        # The total for v_t: through x_t, plus gamma times that for v_{t+1}.
        torch.add(grad_x, grad_velocity, alpha=self.keep, out=grad_velocity)
