"""The reference backend: the four phases as tensor operations, on every device and dtype.

The other backends give its states bit for bit; it serves wherever they do not
(half-precision inputs, memory layouts a loop cannot walk, ``gamma`` of 0 or 1,
devices with no fused backend). About ten elementwise ``float64`` passes per
phase: for cheap functions they, not the functions, set the cost of a step.
"""

from __future__ import annotations

import torch

from invertnet.momentum.backends.base import Backend, Peaks
from invertnet.momentum.fixed_point import Constants, Magnitude, MomentumState, floor_divmod

__all__ = ["TensorBackend", "units"]


def units(c: Constants, state: MomentumState, y: torch.Tensor, residual: bool) -> torch.Tensor:
    """``(1 - gamma) * f`` in units (a new float64 tensor), from a function's output ``y``.

    With ``residual=False`` the functions are whole blocks and ``f`` is ``y - x``.
    """
    step = y.detach().to(torch.float64, copy=True)
    if not residual:
        step.sub_(state.position)
    return step.mul_(c.mix_units).round_()


def _extremes(t: torch.Tensor) -> Magnitude:
    """``t``'s minimum and maximum, on its device (none for an empty tensor)."""
    return tuple(torch.aminmax(t)) if t.numel() else ()


class TensorBackend(Backend):
    """The exact arithmetic in tensor operations: the reference, which serves everything."""

    name = "tensor"

    def serves(
        self,
        dtype: torch.dtype,
        doubles: tuple[torch.Tensor, ...],
        typed: tuple[torch.Tensor, ...] = (),
    ) -> bool:
        return True

    def advance(
        self, c: Constants, state: MomentumState, y: torch.Tensor, residual: bool, split: bool
    ) -> tuple[torch.Tensor, Peaks]:
        # Always the split form, exact for every velocity in range.
        update = units(c, state, y, residual)
        n, d, store = c.n, c.d, state.store
        v = state.velocity
        if n == 0:
            store.keep(v)
            v = update
        elif n == d:
            v = v.add_(update)
        else:
            # v = a d + b with 0 <= b < d, so that n v + r = a n d + (b n + r): every
            # intermediate stays below |v| in magnitude, whatever v is in range.
            a, b = floor_divmod(v, d)
            high, digit = floor_divmod(store.draw(n).add_(b, alpha=n), d)
            store.push(digit, d)
            v = high.add_(a, alpha=n).add_(update)
        state.velocity = v
        state.position.add_(v, alpha=c.fixed.unit)
        peaks = Peaks(_extremes(update), _extremes(state.position), _extremes(v))
        return state.position.to(c.fixed.dtype, copy=True), peaks

    def retreat_position(
        self, c: Constants, state: MomentumState, grad_velocity: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = c.fixed.dtype
        state.position.sub_(state.velocity, alpha=c.fixed.unit)
        return state.position.to(dtype, copy=True), (grad_velocity * c.mix).to(dtype)

    def retreat_velocity(
        self, c: Constants, state: MomentumState, y: torch.Tensor, residual: bool, split: bool
    ) -> None:
        n, d, store = c.n, c.d, state.store
        v = state.velocity.sub_(units(c, state, y, residual))
        if n == 0:
            v = store.unkeep()
        elif n == d:
            pass
        else:
            # v = e n + f with 0 <= f < n, so that d v + s = e d n + (f d + s).
            e, f = floor_divmod(v, n)
            high, r = floor_divmod(store.pop(d).add_(f, alpha=d), n)
            store.undraw(r, n)
            v = high.add_(e, alpha=d)
        state.velocity = v

    def backpropagate(
        self,
        c: Constants,
        grad_x: torch.Tensor,
        grad_velocity: torch.Tensor,
        grad_input: torch.Tensor | None,
        residual: bool,
    ) -> None:
        if grad_input is not None:
            grad_x.add_(grad_input)
        if not residual:
            grad_x.sub_(grad_velocity, alpha=c.mix)
        # The total for v_t: through x_t, plus gamma times that for v_{t+1}.
        torch.add(grad_x, grad_velocity, alpha=c.keep, out=grad_velocity)
