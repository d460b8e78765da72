"""The state a recomputation in backward must share with the original forward."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from invertnet._grad_mode import without_grad
from invertnet._torch_private import copy_all

__all__ = [
    "AutocastState",
    "BufferSnapshot",
    "buffers_unchanged",
    "submodules",
    "trainable_parameters",
]


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings in force during the forward pass, for one device type."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @staticmethod
    def capture(tensors: Sequence[torch.Tensor]) -> tuple[AutocastState, ...]:
        """Record autocast for the inputs' device type (and the CPU, which autocasts too).

        The same settings give the same tuple, shared: a wrapper records them for
        every block, and keeps them until its backward.
        """
        device_types = {t.device.type for t in tensors} | {"cpu"}
        return _interned(
            tuple(
                (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                for d in sorted(device_types)
                if d != "meta"
            )
        )

    @staticmethod
    def restored(states: Sequence[AutocastState]) -> contextlib.AbstractContextManager[None]:
        """Re-enter the recorded autocast settings, without autocast's weight cache.

        The forward pass ran without grad, so the low-precision copies of the
        parameters it cached have no graph; a recomputation inside the same autocast
        region that found them in the cache would give the parameters no gradient
        (PyTorch 2.4 looks the cache up whatever the grad mode; 2.13 no longer). Casting
        afresh costs one cast per parameter use.
        """
        if not any(s.enabled or torch.is_autocast_enabled(s.device_type) for s in states):
            # Off then and off now: nothing to re-enter, and no generator to run
            # for every block.
            return contextlib.nullcontext()
        return _autocast_entered(states)


@functools.lru_cache(maxsize=64)
def _interned(settings: tuple[tuple[str, bool, torch.dtype], ...]) -> tuple[AutocastState, ...]:
    return tuple(AutocastState(*setting) for setting in settings)


@contextlib.contextmanager
def _autocast_entered(states: Sequence[AutocastState]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for s in states:
            stack.enter_context(
                torch.autocast(s.device_type, dtype=s.dtype, enabled=s.enabled, cache_enabled=False)
            )
        yield


def submodules(module: nn.Module) -> list[nn.Module]:
    """``module`` and every module under it, each once: what ``module.modules()``
    yields, in breadth-first order and without its generator machinery (a wrapper
    asks on every call)."""
    found, seen = [module], {id(module)}
    for owner in found:  # grows as it is walked
        for child in owner._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


def trainable_parameters(modules: Iterable[nn.Module]) -> tuple[nn.Parameter, ...]:
    """The parameters of ``modules`` that require grad, each once."""
    found: dict[int, nn.Parameter] = {}
    for owner in modules:
        for p in owner._parameters.values():
            if p is not None and p.requires_grad:
                found.setdefault(id(p), p)
    return tuple(found.values())


# Scratch tensors for buffer snapshots, by the buffers' shapes, dtypes and devices:
# a snapshot borrows a set and gives it back when restored, so a chain of blocks
# alike reuses one set instead of allocating copies at every block. Per thread, and
# a list per signature, since snapshots nest (a wrapper inside a wrapped module runs
# its backward during the outer one's recomputation).
_scratch = threading.local()

_Signature = tuple[tuple[torch.Size, torch.dtype, torch.device], ...]


def _borrow(signature: _Signature) -> list[torch.Tensor]:
    pool: dict[_Signature, list[list[torch.Tensor]]] = _scratch.__dict__.setdefault("pool", {})
    spare = pool.get(signature)
    if spare:
        return spare.pop()
    return [torch.empty(size, dtype=dtype, device=device) for size, dtype, device in signature]


def _give_back(signature: _Signature, tensors: list[torch.Tensor]) -> None:
    _scratch.__dict__.setdefault("pool", {}).setdefault(signature, []).append(tensors)


class BufferSnapshot:
    """Copies of the buffers of some modules, put back after a recomputation.

    Recomputing a forward pass in training mode would otherwise update running
    statistics, such as BatchNorm's, a second time (memcnn issue 12). A module that
    replaced a buffer object meanwhile gets the original object back. Taking and
    restoring a snapshot copies all the buffers in one call each (a block's many
    small buffers would otherwise cost a dispatch apiece), into scratch tensors
    reused from snapshot to snapshot.
    """

    __slots__ = ("_saved", "_buffers", "_signature", "_copies")

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self._saved = [
            (owner._buffers, name, buf)
            for owner in modules
            for name, buf in owner._buffers.items()
            if buf is not None
        ]
        self._copies: list[torch.Tensor] | None = None
        if not self._saved:
            return
        self._buffers = [buf for _, _, buf in self._saved]
        self._signature: _Signature = tuple((b.shape, b.dtype, b.device) for b in self._buffers)
        self._copies = _borrow(self._signature)
        with without_grad():
            copy_all(self._copies, self._buffers, one_device=_one_device(self._signature))

    def restore(self) -> None:
        """Give every buffer its object and its values from the time of the snapshot
        (once: a second call does nothing)."""
        copies, self._copies = self._copies, None
        if copies is None:
            return
        for buffers, name, buf in self._saved:
            buffers[name] = buf
        with without_grad():
            copy_all(self._buffers, copies, one_device=_one_device(self._signature))
        _give_back(self._signature, copies)


@functools.lru_cache(maxsize=256)
def _one_device(signature: _Signature) -> bool:
    return len({device for _, _, device in signature}) == 1


@contextlib.contextmanager
def buffers_unchanged(module: nn.Module) -> Iterator[None]:
    """Undo buffer updates made inside the block, such as BatchNorm running statistics.

    Recomputing a forward pass in training mode would otherwise update running
    statistics a second time (memcnn issue 12).
    """
    snapshot = BufferSnapshot(submodules(module))
    try:
        yield
    finally:
        snapshot.restore()
