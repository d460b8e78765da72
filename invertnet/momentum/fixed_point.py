"""The fixed-point state of the exact momentum iteration, below its backends.

What :mod:`invertnet.momentum.exact` describes, as data: the fixed-point format
(:class:`FixedPoint`), the range check of a forward pass (:class:`RangeCheck`), the
bit store (:class:`BitStore`), the state (:class:`MomentumState`) and the
constants of one iteration (:class:`Constants`). The backends
(:mod:`invertnet.momentum.backends`) compute on them; :mod:`~invertnet.momentum.exact`
drives them. Nothing here imports either.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from invertnet._runtime.deferred_check import check_deferred
from invertnet._runtime.torch_private import assert_on_device
from invertnet.momentum.gamma import Gamma

__all__ = [
    "CHUNK_BITS",
    "HEAD_LIMIT",
    "LIMIT",
    "SCALE_BITS",
    "BitStore",
    "Constants",
    "FixedPoint",
    "Magnitude",
    "MomentumState",
    "RangeCheck",
    "floor_divmod",
    "largest_magnitude",
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
#: numbers divided in a step: below it, :func:`floor_divmod` is exact. One step
#: adds at most three such values, which stays below 2**53, where float64 stops
#: holding every integer.
LIMIT = 2**50

#: Bits moved from a store head to a chunk at a time (an int32 holds 31 bits).
CHUNK_BITS = 31

#: Store heads stay below this, so that dividing one by a numerator or a
#: denominator (at most 2**20) is exact (see :func:`floor_divmod`).
HEAD_LIMIT = 2**50

_CHUNK_BASE = float(2**CHUNK_BITS)


@functools.lru_cache(maxsize=64)
def _quotient_terms(device: torch.device, b: int) -> tuple[float, torch.Tensor]:
    """``1 / b`` and ``(1 - b) / (2 b)``, rounded to float64, the latter on ``device``."""
    return 1.0 / b, torch.tensor((1 - b) / (2 * b), dtype=torch.float64, device=device)


def floor_divmod(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
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
            raise self.overflow(largest, what)

    def overflow(self, largest: float, what: str) -> OverflowError:
        """The error for ``what``, whose largest magnitude is ``largest`` units."""
        shown = largest * self.unit
        return OverflowError(
            f"MomentumNet(use_backprop=False): {what} reaches magnitude {shown:.4g}, beyond "
            f"the {self.max_abs:.4g} that exact reversal supports for {self.dtype} "
            f"(fixed point with {self.bits} fractional bits, exact below 2**53); nothing "
            "was stored. Rescale the input or the functions, or use use_backprop=True"
        )


def largest_magnitude(values: Iterable[float]) -> float:
    """The largest magnitude among ``values``: NaN if one is NaN, 0 if there are none."""
    values = list(values)
    if any(math.isnan(v) for v in values):
        return math.nan
    return max((abs(v) for v in values), default=0.0)


#: The largest magnitude of what a step computed, as a backend gives it: a number
#: the host knows (the C loops return it), or tensors whose largest magnitude it
#: is, left on their device until :meth:`RangeCheck.check` (a kernel's slot, or
#: the minimum and maximum of a tensor).
Magnitude = float | tuple[torch.Tensor, ...]


@dataclass
class _Record:
    what: str
    # Units per recorded value (the position is recorded as its value).
    scale: float
    # Known on the host (from the CPU loops), or tensors whose largest magnitude
    # is the one to check, read at the end.
    known: float | None = None
    tensors: tuple[torch.Tensor, ...] = ()


def _tensors(record: _Record) -> tuple[torch.Tensor, ...]:
    return record.tensors


class RangeCheck:
    """The magnitudes a forward pass must keep below :data:`LIMIT`, checked once.

    Each step records the largest magnitudes of what it computes as it computes
    them (:data:`Magnitude`): as 0-dimensional tensors where they stay on the
    device, as numbers where a CPU loop returns them. :meth:`check` checks them all
    at once, with the deferred check the wrapper's finite check shares
    (:func:`~invertnet._runtime.deferred_check.check_deferred`).

    Parameters
    ----------
    fixed : FixedPoint
        The fixed-point format, for the error message.
    """

    def __init__(self, fixed: FixedPoint) -> None:
        self.fixed = fixed
        self._records: list[_Record] = []

    def measure(self, what: str, t: torch.Tensor, scale: float = 1.0) -> None:
        """Record the largest magnitude of ``t`` times ``scale`` (one pass, on its device)."""
        if t.numel():
            self._records.append(_Record(what, scale, tensors=tuple(torch.aminmax(t.detach()))))

    def record(self, what: str, largest: Magnitude, scale: float = 1.0) -> None:
        """Record ``largest`` times ``scale``, as a backend gave it (:data:`Magnitude`)."""
        if isinstance(largest, float):
            self._records.append(_Record(what, scale, known=largest))
        elif largest:
            self._records.append(_Record(what, scale, tensors=largest))

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
        fixed = self.fixed

        def largest(record: _Record, read: list[float]) -> float:
            known = record.known
            return (largest_magnitude(read) if known is None else known) * record.scale

        check_deferred(
            records,
            values=_tensors,
            at_fault=lambda record, read: not largest(record, read) < LIMIT,  # NaN too
            error=lambda record, read: fixed.overflow(largest(record, read), record.what),
            holds_on_device=_in_range_on_device,
            device_message=_device_message(fixed.dtype),
            read_all_on_host=read_on_host,
        )


def _in_range_on_device(records: list[_Record]) -> torch.Tensor:
    """True, on the records' device, where every record's largest magnitude, in
    units, is below :data:`LIMIT` (and not NaN): a few operations per scale,
    whatever the depth; nothing is read."""
    by_scale: dict[tuple[float, torch.dtype], list[torch.Tensor]] = {}
    for record in records:
        for t in record.tensors:
            by_scale.setdefault((record.scale, t.dtype), []).append(t)
    # In float64, as the host computes: a float32 magnitude times 2**s could overflow.
    # amax propagates NaN, and NaN < LIMIT is false.
    peaks = [
        torch.stack(group).abs().amax().double() * scale for (scale, _), group in by_scale.items()
    ]
    return (torch.stack(peaks) < LIMIT).all()


@functools.cache
def _device_message(dtype: torch.dtype) -> str:
    # At most 254 bytes (a device-side assert's limit): the CPU's OverflowError says more.
    fixed = FixedPoint(dtype)
    return (
        "MomentumNet(use_backprop=False): a state or (1 - gamma) * f value is NaN or "
        f"beyond the {fixed.max_abs:.4g} that exact reversal supports for {fixed.dtype}. "
        "Rescale the input or functions, or use use_backprop=True; on the CPU the error "
        "names the layer"
    )


def _assert_in_range_on_device(records: list[_Record], fixed: FixedPoint) -> None:
    """The device-side half of :meth:`RangeCheck.check`, for the records of one device."""
    assert_on_device(_in_range_on_device(records), _device_message(fixed.dtype))


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
        Steps begun (:meth:`begin_step`) and not undone (:meth:`end_retreat`).
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

    def end_retreat(self) -> None:
        """Finish undoing a step: bring back the chunk cut when it began, if any."""
        self.steps -= 1
        if self.chunk_at and self.chunk_at[-1] == self.steps:
            self.chunk_at.pop()
            low = self.chunks.pop().to(torch.float64)
            self.head = low.add_(self.head, alpha=_CHUNK_BASE)

    def draw(self, base: int) -> torch.Tensor:
        """Take a digit in ``[0, base)`` from the store: ``z mod base``, ``z <- z // base``."""
        self.head, digit = floor_divmod(self.head, base)
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
    # The buffer that peak_slots hands out, and how much of it is used.
    _slots: torch.Tensor | None = field(default=None, repr=False)
    _slots_used: int = field(default=0, repr=False)

    def peak_slots(self, count: int) -> torch.Tensor:
        """``count`` float64 zeros on the state's device, for a kernel to write the
        largest magnitudes it reaches into.

        They come from a buffer allocated for many steps at once, not one per step;
        what was handed out stays valid while it is referenced.
        """
        buffer = self._slots
        if buffer is None or self._slots_used + count > len(buffer):
            buffer = self._slots = torch.zeros(
                64 * count, dtype=torch.float64, device=self.position.device
            )
            self._slots_used = 0
        start = self._slots_used
        self._slots_used = start + count
        return buffer[start : start + count]


@dataclass(frozen=True)
class Constants:
    """The numbers of one exact iteration, from ``gamma = n / d`` and the fixed-point format.

    Parameters
    ----------
    n, d : int
        ``gamma``'s numerator and denominator.
    keep, mix : float
        ``gamma`` and ``1 - gamma`` as floats (the factors of the gradients).
    mix_units : float
        ``1 - gamma`` in units per unit of ``f``, as the plain mode multiplies by it.
    fixed : FixedPoint
        The fixed-point format of the state.
    """

    n: int
    d: int
    keep: float
    mix: float
    mix_units: float
    fixed: FixedPoint

    @staticmethod
    def of(gamma: Gamma, fixed: FixedPoint) -> Constants:
        """The constants of ``gamma`` in the format ``fixed``."""
        return Constants(
            n=gamma.numerator,
            d=gamma.denominator,
            keep=gamma.value,
            mix=gamma.complement,
            mix_units=gamma.complement * fixed.scale,
            fixed=fixed,
        )

    @property
    def fractional(self) -> bool:
        """Whether ``0 < gamma < 1``: each step draws a digit from the store and pushes
        one (``gamma`` 0 keeps whole velocities, 1 nothing)."""
        return 0 < self.n < self.d
