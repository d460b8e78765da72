"""Find, and replace, the tensors that require grad in a call's extra arguments.

``MomentumNet(use_backprop=False)`` recomputes each function in backward with its
extra arguments (``forward(x, *args, **kwargs)``), but with every tensor among them
that requires grad swapped for a leaf of its own, so that one backward call gives
their gradients. Such tensors may sit directly in ``args`` and ``kwargs`` or inside
the lists, tuples (named tuples included) and dicts they hold, at any depth; the
network also uses :func:`grad_slots` to decide whether a call needs a graph at
all. A *slot* is the path to one: ``("args", 2)`` is ``args[2]``,
``("kwargs", "memory", 0)`` is ``kwargs["memory"][0]``.

The replay must also see the arguments as the forward pass saw them.
:class:`ArgumentRecord` notes their state (which objects every container holds,
every tensor's in-place version, the attributes of plain objects) so that a
change made by the functions during the forward pass, or by the caller before
backward, raises instead of giving gradients of another computation.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

__all__ = ["ArgumentRecord", "Slot", "describe_slot", "grad_slots", "slot_tensors", "with_tensors"]

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


def describe_slot(slot: Slot) -> str:
    """``("kwargs", "memory", 0)`` as ``kwargs['memory'][0]``; attributes as ``.name``."""
    text = slot[0]
    for key in slot[1:]:
        text += f".{key.name}" if isinstance(key, _Attribute) else f"[{key!r}]"
    return text


class _Attribute(str):
    """A path step that names an attribute of a plain object, not a key."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return str(self)


_SCALARS = (bool, int, float, complex, str, bytes, torch.dtype, torch.device)
# A record is a walk of the arguments; these bound it for objects that hold
# large graphs of other objects (nothing beyond them is compared).
_MAX_DEPTH = 6
_MAX_NODES = 10_000


def _same_scalar(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


class ArgumentRecord:
    """The state of a call's extra arguments, to check later that it did not change.

    The record notes, at every path through lists, tuples, dicts, sets and the
    attributes of plain objects: which object sits there, the length or keys of
    each container, the in-place version of each tensor, and the value of each
    number or string. Modules are not looked into (their parameters are theirs).

    Parameters
    ----------
    args, kwargs
        The extra arguments of a call.
    """

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._entries: list[tuple[Slot, Any, Any]] = []
        self._seen: set[int] = set()
        self._walk(args, ("args",), 0)
        self._walk(kwargs, ("kwargs",), 0)
        del self._seen

    def _note(self, path: Slot, identity: Any, state: Any) -> None:
        self._entries.append((path, identity, state))

    def _walk(self, value: Any, path: Slot, depth: int) -> None:
        if value is None or isinstance(value, _SCALARS):
            self._note(path, None, value)
            return
        if len(self._entries) >= _MAX_NODES or depth > _MAX_DEPTH:
            return
        if isinstance(value, torch.Tensor):
            self._note(path, id(value), None if value.is_inference() else value._version)
            return
        if isinstance(value, (nn.Module, type)) or id(value) in self._seen:
            self._note(path, id(value), None)
            return
        self._seen.add(id(value))
        if len(path) == 1:  # args and kwargs themselves: their contents count, not their ids
            self._note(path, None, tuple(value) if isinstance(value, dict) else len(value))
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                self._walk(item, (*path, key), depth + 1)
        elif isinstance(value, (list, tuple)):
            self._note(path, id(value), len(value))
            for i, item in enumerate(value):
                self._walk(item, (*path, i), depth + 1)
        elif isinstance(value, dict):
            self._note(path, id(value), tuple(value))
            for key, item in value.items():
                self._walk(item, (*path, key), depth + 1)
        elif isinstance(value, (set, frozenset)):
            self._note(path, id(value), frozenset(map(id, value)))
        elif isinstance(getattr(value, "__dict__", None), dict) and not callable(value):
            attributes = vars(value)
            self._note(path, id(value), tuple(attributes))
            for key, item in attributes.items():
                self._walk(item, (*path, _Attribute(key)), depth + 1)
        else:
            self._note(path, id(value), None)

    def changed(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Slot | None:
        """The first path at which ``args`` and ``kwargs`` differ from the record, if any."""
        now = ArgumentRecord(args, kwargs)._entries
        for (path, identity, state), (path_now, identity_now, state_now) in zip(self._entries, now):
            if path != path_now:
                return path if len(path) <= len(path_now) else path_now
            if identity != identity_now:
                return path
            if identity is None:
                if not _same_scalar(state, state_now):
                    return path
            elif state != state_now:
                return path
        if len(now) != len(self._entries):
            longer = now if len(now) > len(self._entries) else self._entries
            return longer[min(len(now), len(self._entries))][0]
        return None

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any], when: str) -> None:
        """Raise if ``args`` and ``kwargs`` differ from the record.

        Parameters
        ----------
        args, kwargs
            The same arguments, now.
        when : str
            When they changed, for the message ("during the forward pass", ...).

        Raises
        ------
        RuntimeError
            Naming the first argument that changed.
        """
        path = self.changed(args, kwargs)
        if path is None:
            return
        raise RuntimeError(
            f"MomentumNet(use_backprop=False): the argument {describe_slot(path)} changed "
            f"{when}. Training without stored activations calls every function again in "
            "backward with the same arguments, so it must find them as the forward pass did: "
            "a function that appends to a list or dict argument, sets an attribute of one, or "
            "modifies an argument tensor in place would be replayed on other values, and what "
            "it stored there would get no gradient. Pass arguments that the functions only "
            "read (and that stay unchanged until backward), or use use_backprop=True"
        )
