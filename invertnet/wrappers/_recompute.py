"""The state a recomputation in backward must share with the original forward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AutocastState", "buffers_unchanged"]


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings in force during the forward pass, for one device type."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @staticmethod
    def capture(tensors: Sequence[torch.Tensor]) -> list[AutocastState]:
        """Record autocast for the inputs' device type (and the CPU, which autocasts too)."""
        device_types = {t.device.type for t in tensors} | {"cpu"}
        return [
            AutocastState(
                device_type=d,
                enabled=torch.is_autocast_enabled(d),
                dtype=torch.get_autocast_dtype(d),
            )
            for d in sorted(device_types)
            if d != "meta"
        ]

    @staticmethod
    @contextlib.contextmanager
    def restored(states: Sequence[AutocastState]) -> Iterator[None]:
        """Re-enter the recorded autocast settings, without autocast's weight cache.

        The forward pass ran without grad, so the low-precision copies of the
        parameters it cached have no graph; a recomputation inside the same autocast
        region that found them in the cache would give the parameters no gradient
        (PyTorch 2.4 looks the cache up whatever the grad mode; 2.13 no longer). Casting
        afresh costs one cast per parameter use.
        """
        if not any(s.enabled or torch.is_autocast_enabled(s.device_type) for s in states):
            yield  # off then and off now: nothing to re-enter
            return
        with contextlib.ExitStack() as stack:
            for s in states:
                stack.enter_context(
                    torch.autocast(
                        s.device_type,
                        dtype=s.dtype,
                        enabled=s.enabled,
                        cache_enabled=False,
                    )
                )
            yield


@contextlib.contextmanager
def buffers_unchanged(module: nn.Module) -> Iterator[None]:
    """Undo buffer updates made inside the block, such as BatchNorm running statistics.

    Recomputing a forward pass in training mode would otherwise update running
    statistics a second time (memcnn issue 12).
    """
    saved = [
        (owner, name, buf, buf.clone())
        for owner in module.modules()
        for name, buf in owner._buffers.items()
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, buf, copy in saved:
                owner._buffers[name] = buf
                buf.copy_(copy)
