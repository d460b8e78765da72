"""Find, and replace, the tensors that require grad in a call's extra arguments.

``MomentumNet(use_backprop=False)`` recomputes each function in backward with its
extra arguments (``forward(x, *args, **kwargs)``), but with every tensor among them
that requires grad swapped for a leaf of its own, so that one backward call gives
their gradients. Such tensors may sit directly in ``args`` and ``kwargs`` or inside
the lists, tuples (named tuples included) and dicts they hold, at any depth; the
network also uses :func:`grad_slots` to decide whether a call needs a graph at
all. A *slot* is the path to one: ``("args", 2)`` is ``args[2]``,
``("kwargs", "memory", 0)`` is ``kwargs["memory"][0]``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["Slot", "grad_slots", "slot_tensors", "with_tensors"]

Slot = tuple[Any, ...]


def _paths(value: Any, path: Slot) -> list[Slot]:
    if isinstance(value, torch.Tensor):
        return [path] if value.requires_grad else []
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _paths(item, (*path, i))]
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _paths(item, (*path, key))]
    return []


def grad_slots(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Slot]:
    """Where the tensors that require grad sit in ``args`` and ``kwargs``, in order."""
    return _paths(args, ("args",)) + _paths(kwargs, ("kwargs",))


def _at(value: Any, path: Slot) -> Any:
    for key in path:
        value = value[key]
    return value


def slot_tensors(
    args: tuple[Any, ...], kwargs: dict[str, Any], slots: list[Slot]
) -> tuple[torch.Tensor, ...]:
    """The tensors at ``slots``."""
    roots = {"args": args, "kwargs": kwargs}
    return tuple(_at(roots[slot[0]], slot[1:]) for slot in slots)


def _replaced(value: Any, path: Slot, tensor: torch.Tensor) -> Any:
    """A copy of ``value`` with ``tensor`` at ``path``; containers off the path are shared."""
    if not path:
        return tensor
    key, rest = path[0], path[1:]
    if isinstance(value, dict):
        result = copy.copy(value)  # keeps the mapping's type (OrderedDict, defaultdict...)
        result[key] = _replaced(value[key], rest, tensor)
        return result
    items = list(value)
    items[key] = _replaced(value[key], rest, tensor)
    if isinstance(value, list):
        return items
    if hasattr(value, "_fields"):  # a named tuple takes its fields as arguments
        return type(value)(*items)
    return type(value)(items)


def with_tensors(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    slots: list[Slot],
    tensors: tuple[torch.Tensor, ...],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with ``tensors`` at ``slots`` (the originals are unchanged)."""
    roots: dict[str, Any] = {"args": args, "kwargs": kwargs}
    for slot, tensor in zip(slots, tensors, strict=True):
        roots[slot[0]] = _replaced(roots[slot[0]], slot[1:], tensor)
    return roots["args"], roots["kwargs"]
