"""What the wrappers of a model free, chosen by the user."""

from __future__ import annotations

import torch
from torch import nn

from invertnet.wrappers._storage import OWNED_ATTR
from invertnet.wrappers.invertible import InvertibleModuleWrapper

__all__ = ["allow_free", "keep_inputs_every"]


def allow_free(tensor: torch.Tensor) -> torch.Tensor:
    """Let the first wrapper that ``tensor`` reaches free its memory.

    A wrapper frees an input that autograd computed (it has a ``grad_fn``) and
    rebuilds it in backward. One without, such as the batch, is data the caller
    made and may read again, and a rebuilt copy differs from it by rounding: the
    wrapper hides it instead (using it before backward raises, as for a freed input)
    and hands it back bit for bit, so its memory stays taken. Mark a tensor that
    nobody reads again after the call, such as a stack's own copy of the halves
    of its input, to have its memory freed as well.

    Parameters
    ----------
    tensor : torch.Tensor
        A tensor the caller will not read again before backward has restored it
        (its values are then rebuilt, to rounding).

    Returns
    -------
    torch.Tensor
        ``tensor`` itself, marked.

    Examples
    --------
    >>> import torch
    >>> from invertnet import AdditiveCoupling, InvertibleModuleWrapper, allow_free
    >>> block = InvertibleModuleWrapper(AdditiveCoupling(torch.nn.Linear(2, 2)))
    >>> x = allow_free(torch.randn(3, 4).clone())
    >>> y = block(x)
    >>> x.untyped_storage().nbytes()  # freed, to be rebuilt in backward
    0
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"allow_free expects a tensor, got {type(tensor).__name__}")
    setattr(tensor, OWNED_ATTR, True)
    return tensor


def keep_inputs_every(model: nn.Module, every: int) -> list[str]:
    """Keep the input of every ``every``-th wrapper of ``model``, to bound drift.

    A wrapper rebuilds its input from its output in floating point, and a chain of
    wrappers rebuilds each input from a rebuilt output: the rounding grows with the
    depth (see :doc:`/guide/precision`). A kept input is exact, so the rebuilding
    starts afresh there; the cost is one input's memory per ``every`` blocks.

    Parameters
    ----------
    model : torch.nn.Module
        A model holding :class:`~invertnet.InvertibleModuleWrapper` modules, taken in
        the order of ``model.modules()``.
    every : int
        Keep the inputs of wrappers ``0, every, 2 * every, ...``; the others are
        set to free theirs (``keep_input=False``).

    Returns
    -------
    list of str
        The names of the wrappers whose inputs are kept.

    Raises
    ------
    ValueError
        If ``every`` is not a positive int.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"keep_inputs_every: every must be an int >= 1, got {every!r}")
    kept = []
    wrappers = [
        (name, m) for name, m in model.named_modules() if isinstance(m, InvertibleModuleWrapper)
    ]
    for i, (name, wrapper) in enumerate(wrappers):
        wrapper.keep_input = i % every == 0
        if wrapper.keep_input:
            kept.append(name)
    return kept
