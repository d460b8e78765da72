"""A small Momentum ResNet for the nested-rings problem of the Momentum ResNets paper."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RingsMomentumNet"]


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, width))


class RingsMomentumNet(nn.Module):
    """Momentum ResNet acting on the 2-D points themselves, then a linear classifier.

    Each layer is a one-hidden-layer tanh MLP ``R^2 -> R^2``. A plain ResNet of this
    kind is a homeomorphism of the plane at small step sizes and cannot pull nested
    rings apart; the velocity of a Momentum ResNet lets it, which is what the paper's
    nested-rings figure shows.

    Parameters
    ----------
    num_classes : int
        Output classes (2 for the rings).
    gamma : float
        Momentum term in ``[0, 1)``.
    depth : int
        Number of momentum layers (15 in the paper).
    hidden : int
        Hidden width of each layer's MLP (16 in the paper).
    use_backprop : bool
        ``False`` (default) recomputes activations from the exact inverse in backward.

    Examples
    --------
    >>> import torch
    >>> net = RingsMomentumNet(num_classes=2)
    >>> net(torch.randn(5, 2)).shape
    torch.Size([5, 2])
    """

    #: Parameter count with the defaults: 15 layers of (2*16 + 16 + 16*2 + 2) plus 2*2 + 2.
    PARAMETERS_2_CLASSES = 15 * (2 * 16 + 16 + 16 * 2 + 2) + 2 * 2 + 2

    def __init__(
        self,
        num_classes: int = 2,
        gamma: float = 0.9,
        depth: int = 15,
        hidden: int = 16,
        use_backprop: bool = False,
    ) -> None:
        super().__init__()
        from invertnet import MomentumNet

        if not 0.0 <= float(gamma) < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
        if depth < 1 or hidden < 1:
            raise ValueError(f"depth and hidden must be >= 1, got {depth!r} and {hidden!r}")
        self.flow = MomentumNet(
            [_mlp(2, hidden) for _ in range(depth)],
            gamma=gamma,
            use_backprop=use_backprop,
            is_residual=True,
        )
        self.fc = nn.Linear(2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for points ``(N, 2)``."""
        return self.fc(self.flow(x))
