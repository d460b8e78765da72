"""Additive coupling (RevNet): ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from invertnet._runtime.rng import never_draws
from invertnet.couplings._compat import warn_implementation_args
from invertnet.couplings.base import CouplingBase, InPlaceCombine, Step

__all__ = ["AdditiveCoupling", "Add"]


class Add(InPlaceCombine):
    """``a' = a + m``."""

    keeps_finite = True
    vjp_reads_a = False

    def apply(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return a + m

    def invert(self, a_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return a_new - m

    def apply_into(self, a: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.add(a, m, out=out)

    def invert_into(self, a_new: torch.Tensor, m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.sub(a_new, m, out=out)

    def apply_over_m(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # m + a rounds as a + m does: addition commutes exactly.
        return m.add_(a)

    def invert_over_m(self, a_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.sub(a_new, m, out=m)

    def vjp(
        self, a: torch.Tensor, m: torch.Tensor, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad

    def log_det(self, a: torch.Tensor, m: torch.Tensor) -> None:
        """``log|da'/da| = 0``: a shift preserves volume (``None`` stands for 0)."""
        return None


_ADD = Add()


@never_draws
class AdditiveCoupling(CouplingBase):
    r"""Additive coupling block of reversible residual networks (RevNet).

    The input is halved along ``split_dim`` into ``(x1, x2)`` and

    .. math::

        y_1 = x_1 + F(x_2), \qquad y_2 = x_2 + G(y_1),

    which is inverted exactly by ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)`` for any
    ``F`` and ``G``.

    Parameters
    ----------
    Fm : torch.nn.Module
        ``F``; must map a half to a tensor of the same shape.
    Gm : torch.nn.Module, optional
        ``G``; by default an independent deep copy of ``Fm`` (no shared weights).
    split_dim : int
        Dimension along which a single input is halved (channels by default).
    implementation_fwd, implementation_bwd : int
        Accepted for memcnn compatibility and ignored (memcnn deprecated them).

    Examples
    --------
    >>> import torch
    >>> from invertnet import AdditiveCoupling
    >>> block = AdditiveCoupling(torch.nn.Conv2d(2, 2, 3, padding=1))
    >>> x = torch.randn(1, 4, 5, 5)
    >>> torch.allclose(block.inverse(block(x)), x, atol=1e-6)
    True
    """

    def __init__(
        self,
        Fm: nn.Module,
        Gm: nn.Module | None = None,
        split_dim: int = 1,
        *,
        implementation_fwd: int = -1,
        implementation_bwd: int = -1,
    ) -> None:
        super().__init__(split_dim)
        warn_implementation_args(type(self).__name__, implementation_fwd, implementation_bwd)
        self.Fm = Fm
        self.Gm = copy.deepcopy(Fm) if Gm is None else Gm

    def steps(self) -> Sequence[Step]:
        return _ADDITIVE_STEPS


_ADDITIVE_STEPS = (Step(0, 1, "Fm", _ADD), Step(1, 0, "Gm", _ADD))
