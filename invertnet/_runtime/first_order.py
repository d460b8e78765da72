"""Backward passes that cannot themselves be differentiated, saying so by name."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from invertnet._grad_mode import without_grad
from invertnet._runtime.torch_private import delayed_error

__all__ = ["first_order"]

Backward = Callable[..., tuple[Any, ...]]


def first_order(message: Callable[[Any], str]) -> Callable[[Backward], Backward]:
    """Decorate a custom Function's ``backward``: run it without grad, and under
    ``create_graph=True`` return gradients whose own backward raises
    ``message(ctx)``.

    What :func:`torch.autograd.function.once_differentiable` does, with an error
    that names the layer and the fix instead of PyTorch's generic one, and for
    every gradient: ``once_differentiable`` marks them only when an incoming
    gradient requires grad, so the gradients of ``y.sum()`` would come back
    without a graph, and differentiating them would fail with a message that
    names neither (or, with ``allow_unused=True``, return ``None``).
    """

    def decorate(backward: Backward) -> Backward:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
            # Autograd runs a backward with grad mode off unless create_graph=True:
            # switched only where that is needed (entering no_grad costs microseconds
            # per block even where it changes nothing).
            with without_grad():
                result = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return result
            tensors = [r for r in result if isinstance(r, torch.Tensor)]
            marked = iter(delayed_error(message(ctx), tensors))
            return tuple(next(marked) if isinstance(r, torch.Tensor) else r for r in result)

        return wrapper

    return decorate
