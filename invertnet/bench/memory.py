"""Peak activation memory of a training step, and the bytes autograd saves.

CPU has no allocator counter, so the process's own resident set is used: the
kernel's high-water mark ``VmHWM`` (``/proc/self/status``) is reset to the current
resident set by writing ``5`` to ``/proc/self/clear_refs``; after the measured
steps, ``VmHWM`` minus the resident set before them is the extra memory the steps
needed at their peak. For this to be honest

* each configuration runs in a fresh process (nothing left over from another);
* right before the baseline is read, glibc gives every free page back to the
  system (``malloc_trim``): memory freed by earlier steps but kept in the
  allocator's free lists would otherwise inflate the "before" figure and hide
  the measured step's peak;
* until then glibc serves every allocation of 128 KiB or more with its own
  ``mmap`` and unmaps it when freed (``mallopt``), so the resident set follows
  the live tensors instead of the heap's fragmentation. That slows allocation,
  so afterwards (:meth:`MemoryProbe.finish`) glibc gets the thresholds its own
  adaptive tuning ends at, and the timed steps run after a further warm-up;
* the model and its gradients are allocated by warm-up steps first, so they are
  part of the baseline and not counted.

On CUDA the allocator counts exactly: ``torch.cuda.max_memory_allocated`` after
``torch.cuda.reset_peak_memory_stats``, minus ``memory_allocated`` before.

The cross-check :class:`SavedBytes` counts, through
:func:`torch.autograd.graph.saved_tensors_hooks`, the distinct storages autograd
saves for backward during the forward pass of one step (parameters excluded): all activations for
plain autograd, the block inputs for checkpointing, almost nothing for invertnet.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["MemoryProbe", "SavedBytes", "probe_for"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024
# Where glibc's adaptive thresholds end up on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_RELAXED_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024


def _read_status_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {key} line")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only; probe the symbols
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


class MemoryProbe:
    """Measures the peak memory of a block of code above what was in use before it.

    Call :meth:`prepare` first in a fresh process, :meth:`start` right before the
    measured step, :meth:`peak_bytes` right after it, and :meth:`finish` before
    timing anything.
    """

    #: How the figure is obtained, recorded in the reports.
    method = ""

    def prepare(self) -> None:
        """Called once in a fresh process, before the model is built."""

    def start(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Undo what :meth:`prepare` changed that would slow the process down."""

    def peak_bytes(self) -> int:
        raise NotImplementedError


class CPUMemoryProbe(MemoryProbe):
    """Peak resident set (``VmHWM``) minus the resident set at :meth:`start`."""

    method = "cpu: VmHWM - VmRSS before the step (clear_refs, malloc_trim, mmap >= 128 KiB)"

    def __init__(self) -> None:
        if not _STATUS.exists() or not _CLEAR_REFS.exists():
            raise RuntimeError(
                "measuring CPU memory needs Linux /proc/self/status and /proc/self/clear_refs"
            )
        self._libc = _libc()
        self._before_kib = 0

    def _thresholds(self, mmap_bytes: int) -> None:
        if self._libc is not None:
            self._libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
            self._libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_bytes)

    def prepare(self) -> None:
        self._thresholds(_MMAP_THRESHOLD_BYTES)

    def finish(self) -> None:
        self._thresholds(_RELAXED_MMAP_THRESHOLD_BYTES)

    def start(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        _CLEAR_REFS.write_text("5")
        self._before_kib = _read_status_kib("VmRSS")

    def peak_bytes(self) -> int:
        return max(0, _read_status_kib("VmHWM") - self._before_kib) * 1024


class CUDAMemoryProbe(MemoryProbe):
    """``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at :meth:`start`."""

    method = "cuda: max_memory_allocated - memory_allocated before the step"

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._before = 0

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self._device)
        torch.cuda.reset_peak_memory_stats(self._device)
        self._before = torch.cuda.memory_allocated(self._device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self._device)
        return torch.cuda.max_memory_allocated(self._device) - self._before


def probe_for(device: torch.device) -> MemoryProbe:
    """The memory probe for ``device`` (``cpu`` or ``cuda``)."""
    if device.type == "cuda":
        return CUDAMemoryProbe(device)
    if device.type == "cpu":
        return CPUMemoryProbe()
    raise ValueError(f"no memory probe for device type {device.type!r}; use cpu or cuda")


class SavedBytes:
    """Count the distinct storages autograd saves for backward, parameters excluded.

    Parameters
    ----------
    model : torch.nn.Module
        Its parameters (and their gradients) are not counted.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(4, 4)
    >>> counter = SavedBytes(lin)
    >>> with counter.counting():
    ...     y = torch.tanh(lin(torch.randn(2, 4)))
    >>> counter.nbytes  # the input (for the weight's gradient) and tanh's output; not the weight
    64
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: dict[tuple[str, int], int] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct storages saved so far."""
        return sum(self._seen.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._excluded and storage.nbytes():
            self._seen[(str(t.device), ptr)] = storage.nbytes()
        return t

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count what autograd saves inside the block."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield
