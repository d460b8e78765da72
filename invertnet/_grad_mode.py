"""Grad-mode switching at the cost of the switch only where one is needed."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["without_grad"]

_NOTHING = contextlib.nullcontext()


def without_grad() -> contextlib.AbstractContextManager[None]:
    """:class:`torch.no_grad`, or nothing where grad mode is already off.

    Backward runs with grad mode off, and the wrappers' bookkeeping runs for every
    block: entering :class:`torch.no_grad` costs microseconds even where it changes
    nothing.

    Examples
    --------
    >>> import torch
    >>> with without_grad():
    ...     torch.is_grad_enabled()
    False
    """
    return torch.no_grad() if torch.is_grad_enabled() else _NOTHING
