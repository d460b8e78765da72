"""Affine coupling: ``y1 = x1 * s1 + t1`` with ``(s1, t1) = F(x2)``, then the same for ``y2``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from invertnet._runtime.rng import never_draws
from invertnet.couplings._compat import warn_implementation_args
from invertnet.couplings.base import CouplingBase, InPlaceCombine, Step

__all__ = ["AffineCoupling", "AffineAdapterNaive", "AffineAdapterSigmoid", "ScaleShift"]

ScaleAndShift = tuple[torch.Tensor, torch.Tensor]


class ScaleShift(InPlaceCombine):
    """``a' = a * s + t`` for ``m = (s, t)``."""

    def apply(self, a: torch.Tensor, m: ScaleAndShift) -> torch.Tensor:
        s, t = m
        return a * s + t

    def invert(self, a_new: torch.Tensor, m: ScaleAndShift) -> torch.Tensor:
        s, t = m
        return (a_new - t) / s

    # The same two roundings as apply and invert, into the buffer.
    def apply_into(self, a: torch.Tensor, m: ScaleAndShift, out: torch.Tensor) -> torch.Tensor:
        s, t = m
        return torch.mul(a, s, out=out).add_(t)

    def invert_into(self, a_new: torch.Tensor, m: ScaleAndShift, out: torch.Tensor) -> torch.Tensor:
        s, t = m
        return torch.sub(a_new, t, out=out).div_(s)

    def vjp(
        self, a: torch.Tensor, m: ScaleAndShift, grad: torch.Tensor
    ) -> tuple[torch.Tensor, ScaleAndShift]:
        s, _ = m
        return grad * s, (grad * a, grad)

    def log_det(self, a: torch.Tensor, m: ScaleAndShift) -> torch.Tensor:
        """``sum(log|s|)`` over all but the batch dimension (dimension 0)."""
        return torch.log(torch.abs(m[0])).flatten(1).sum(1)

    def log_det_vjp(
        self, m: ScaleAndShift, grad_log_det: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        """The gradient of ``sum(grad_log_det * log_det)`` with respect to ``(s, t)``."""
        s = m[0]
        return grad_log_det.reshape((-1,) + (1,) * (s.dim() - 1)) / s, None

    def output_shapes(self, m: ScaleAndShift) -> list[torch.Size]:
        if not (isinstance(m, (tuple, list)) and len(m) == 2):
            raise ValueError(
                "AffineCoupling: Fm and Gm must return a (scale, shift) pair; wrap a "
                "module that returns one tensor with adapter=AffineAdapterNaive or "
                f"AffineAdapterSigmoid (got {type(m).__name__})"
            )
        return [m[0].shape, m[1].shape]


_SCALE_SHIFT = ScaleShift()


@never_draws
class AffineAdapterNaive(nn.Module):
    """Turn ``f`` into a (scale, shift) pair ``(exp(f(x)), f(x))``.

    Parameters
    ----------
    module : torch.nn.Module
        ``f``, which must preserve the shape of its input.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.f = module

    def forward(self, x: torch.Tensor) -> ScaleAndShift:
        t = self.f(x)
        return torch.exp(t), t


@never_draws
class AffineAdapterSigmoid(nn.Module):
    """Turn ``f`` into a bounded (scale, shift) pair.

    ``h = f(x)`` must have twice the channels (dimension 1) of ``x``; its odd
    channels give ``scale = sigmoid(h[:, 1::2] + 2)`` (in (0, 1), near 0.88 at
    ``h = 0``, so the coupling starts close to the identity) and its even channels
    give ``shift = h[:, 0::2]``.

    Parameters
    ----------
    module : torch.nn.Module
        ``f``, mapping ``C`` channels to ``2C``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.f = module

    def forward(self, x: torch.Tensor) -> ScaleAndShift:
        h = self.f(x)
        if h.dim() < 2 or h.shape[1] % 2 != 0:
            raise ValueError(
                "AffineAdapterSigmoid: the wrapped module must return an even number of "
                f"channels (dimension 1) to split into scale and shift, got shape {tuple(h.shape)}"
            )
        return torch.sigmoid(h[:, 1::2] + 2.0), h[:, 0::2]


@never_draws
class AffineCoupling(CouplingBase):
    r"""Affine coupling block.

    The input is halved along ``split_dim`` into ``(x1, x2)`` and

    .. math::

        (s_1, t_1) = F(x_2),\; y_1 = x_1 \odot s_1 + t_1, \qquad
        (s_2, t_2) = G(y_1),\; y_2 = x_2 \odot s_2 + t_2,

    which is invertible wherever the scales are non-zero.

    Parameters
    ----------
    Fm : torch.nn.Module
        ``F``. Without an adapter it must return a ``(scale, shift)`` pair, each of
        the shape of its input half.
    Gm : torch.nn.Module, optional
        ``G``; by default an independent deep copy of ``Fm``.
    adapter : callable, optional
        A class such as :class:`AffineAdapterNaive` or :class:`AffineAdapterSigmoid`
        that wraps ``Fm`` and ``Gm`` to produce ``(scale, shift)``.
    split_dim : int
        Dimension along which a single input is halved.
    implementation_fwd, implementation_bwd : int
        Accepted for memcnn compatibility and ignored.

    Examples
    --------
    >>> import torch
    >>> from invertnet import AffineCoupling, AffineAdapterNaive
    >>> _ = torch.manual_seed(0)
    >>> block = AffineCoupling(torch.nn.Linear(3, 3), adapter=AffineAdapterNaive)
    >>> x = torch.randn(2, 6)
    >>> torch.allclose(block.inverse(block(x)), x, atol=1e-5)
    True
    """

    def __init__(
        self,
        Fm: nn.Module,
        Gm: nn.Module | None = None,
        adapter: Callable[[nn.Module], nn.Module] | None = None,
        split_dim: int = 1,
        *,
        implementation_fwd: int = -1,
        implementation_bwd: int = -1,
    ) -> None:
        super().__init__(split_dim)
        warn_implementation_args(type(self).__name__, implementation_fwd, implementation_bwd)
        if Gm is None:
            Gm = copy.deepcopy(Fm)
        self.Fm = adapter(Fm) if adapter is not None else Fm
        self.Gm = adapter(Gm) if adapter is not None else Gm

    def steps(self) -> Sequence[Step]:
        return _AFFINE_STEPS


_AFFINE_STEPS = (Step(0, 1, "Fm", _SCALE_SHIFT), Step(1, 0, "Gm", _SCALE_SHIFT))
