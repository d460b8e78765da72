"""use_backprop=False: train a MomentumNet without storing per-layer activations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from invertnet.momentum.net import MomentumNet

__all__ = ["run_without_activations"]


def run_without_activations(
    net: MomentumNet, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """Provisional: the plain computation (same function); exact reversal comes next."""
    return net._forward_plain(x, args, kwargs)
