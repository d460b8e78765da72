"""The momentum term ``gamma``, validated and held as an exact fraction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from numbers import Real

__all__ = ["MAX_DENOMINATOR", "Gamma"]

#: Largest denominator of the fraction that represents ``gamma``. Every decimal
#: with up to six digits (0.9, 0.99, 0.125, 0.123456) is represented exactly; any
#: other value by the nearest fraction ``n / d`` with ``d <= 2**20``, which differs
#: from it by less than ``1 / (d * 2**20)``.
MAX_DENOMINATOR = 2**20


@dataclass(frozen=True)
class Gamma:
    """``gamma = numerator / denominator`` exactly, with ``0 <= gamma <= 1``.

    Both modes of :class:`~invertnet.MomentumNet` use this one value, so they
    compute the same function.
    """

    numerator: int
    denominator: int

    @staticmethod
    def from_value(gamma: object, owner: str, allow_zero: bool = True) -> Gamma:
        """Validate ``gamma`` and represent it as a fraction.

        Parameters
        ----------
        gamma : float or fractions.Fraction
            The momentum term.
        owner : str
            Named in error messages.
        allow_zero : bool
            Whether 0 is accepted (it is not invertible in floating point).

        Raises
        ------
        TypeError
            If ``gamma`` is not a real number.
        ValueError
            If ``gamma`` is outside ``[0, 1]`` (``(0, 1]`` without ``allow_zero``).
        """
        if isinstance(gamma, bool) or not isinstance(gamma, Real):
            raise TypeError(f"{owner}: gamma must be a real number, got {type(gamma).__name__}")
        low = 0.0 if allow_zero else math.nextafter(0.0, 1.0)
        if not (low <= float(gamma) <= 1.0):
            interval = "[0, 1]" if allow_zero else "(0, 1] (0 cannot be inverted)"
            raise ValueError(f"{owner}: gamma must be in {interval}, got {gamma!r}")
        fraction = Fraction(gamma).limit_denominator(MAX_DENOMINATOR)
        if fraction == 0 and not allow_zero:
            raise ValueError(
                f"{owner}: gamma={gamma!r} is too close to 0 to invert; use at least "
                f"{1 / MAX_DENOMINATOR}"
            )
        return Gamma(fraction.numerator, fraction.denominator)

    @property
    def value(self) -> float:
        """``gamma`` as a float."""
        return self.numerator / self.denominator

    @property
    def complement(self) -> float:
        """``1 - gamma`` as a float, computed from the fraction."""
        return (self.denominator - self.numerator) / self.denominator
