"""The always-on NaN/Inf check of reconstructions, with no host read per block.

Reading a tensor's value on the host makes the host wait for the device; done once
per wrapper it would stall a GPU's queue once per block. So each wrapper's backward
only queues a reduction of its reconstructed inputs (their sum: NaN and Inf
propagate through it), and the sums of a whole backward pass are checked once, when
the pass ends (:func:`invertnet._runtime.torch_private.queue_end_of_backward`), by the
deferred check that the momentum range check shares
(:mod:`invertnet._runtime.deferred_check`): read on the host for CPU tensors, where
that costs no wait and the error can name the wrapper; by a device-side assert on
an accelerator, so that a training step never waits.

A reconstruction is at fault only where the outputs it was computed from were
finite: NaN or Inf that the forward pass produced itself would reach the gradients
with plain autograd too. In a chain of wrappers a block's outputs are the inputs
that the next block restored moments before, so their sums are taken from that
block's record (by storage) instead of being reduced a second time; only outputs
that no wrapper restored, such as the last block's, are reduced here.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from invertnet._runtime.deferred_check import check_deferred, read_on_host, stack_scalars
from invertnet._runtime.torch_private import (
    assert_on_device,
    current_backward_pass,
    queue_end_of_backward,
    storage_key,
)
from invertnet.wrappers.debug import ADVICE, ReconstructionError

__all__ = ["check_finite_when_backward_ends", "nonfinite_error"]


@dataclass
class _Record:
    name: str
    index: int
    total: torch.Tensor
    # The sums of the outputs it was reconstructed from (their floating ones).
    outputs_totals: tuple[torch.Tensor, ...]
    numel: int
    reconstructed: weakref.ref[torch.Tensor]


@dataclass
class _PassChecks:
    records: list[_Record] = field(default_factory=list)
    # Sums of the reconstructions restored so far, by storage: a later block's outputs.
    totals_by_storage: dict[int, torch.Tensor] = field(default_factory=dict)


# The checks of the backward passes now running, by pass. A pass that fails leaves
# its entry behind (its end is never reached); a few are kept, the oldest dropped.
_passes: dict[int, _PassChecks] = {}
_passes_lock = threading.Lock()
_STALE_PASSES_KEPT = 16

# A device-side assert carries at most 254 bytes: the short form, pointing to where
# the full advice (ADVICE) and the wrapper's name are given.
_DEVICE_MESSAGE = (
    "invertnet: an InvertibleModuleWrapper rebuilt an input with NaN/Inf from finite "
    "outputs, so gradients are NaN. Run the step in invertnet.debug_reconstruction"
    "(model=...) or on the CPU for the wrapper's name and what to do"
)


def _total(t: torch.Tensor) -> torch.Tensor:
    # Half-precision sums would overflow for a large finite tensor: sum in float32.
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _current_pass() -> _PassChecks | None:
    """The checks of the backward pass now running, created on first use; ``None``
    outside backward."""
    task = current_backward_pass()
    if task is None:
        return None
    with _passes_lock:
        checks = _passes.get(task)
        if checks is not None:
            return checks
        checks = _PassChecks()
        if not queue_end_of_backward(lambda: _finish(task, checks)):
            return None
        while len(_passes) >= _STALE_PASSES_KEPT:
            del _passes[next(iter(_passes))]
        _passes[task] = checks
    return checks


def check_finite_when_backward_ends(
    name: str, reconstructed: Mapping[int, torch.Tensor], outputs: Sequence[torch.Tensor]
) -> None:
    """Queue the check of one wrapped call's reconstructed inputs for the end of the
    running backward pass.

    Parameters
    ----------
    name : str
        How the error names the wrapper.
    reconstructed : mapping of int to torch.Tensor
        The restored inputs, by their position among the call's inputs.
    outputs : sequence of torch.Tensor
        The outputs they were reconstructed from.

    Raises
    ------
    ReconstructionError
        At once, when called outside a backward pass (nothing to defer to) and a
        reconstruction is at fault.
    """
    floating = {i: x for i, x in reconstructed.items() if x.is_floating_point()}
    if not floating:
        return
    checks = _current_pass()
    found = None if checks is None else checks.totals_by_storage
    # The outputs' sums first, before this call's own inputs are recorded.
    outputs_totals = []
    for o in outputs:
        if o.is_floating_point():
            known = None if found is None else found.pop(storage_key(o), None)
            outputs_totals.append(_total(o) if known is None else known)
    records = []
    for index, x in floating.items():
        total = _total(x)
        if found is not None:
            found[storage_key(x)] = total
        records.append(
            _Record(
                name=name,
                index=index,
                total=total,
                outputs_totals=tuple(outputs_totals),
                numel=x.numel(),
                reconstructed=weakref.ref(x),
            )
        )
    if checks is None:
        _raise_first_fault(records)
    else:
        checks.records.extend(records)


def _finish(task: int, checks: _PassChecks) -> None:
    with _passes_lock:
        if _passes.get(task) is checks:
            del _passes[task]
    _raise_first_fault(checks.records)


def _raise_first_fault(records: list[_Record]) -> None:
    """Raise for the first record whose reconstruction is at fault: one host read
    for the records on the CPU, a device-side assert for those on each accelerator
    (:func:`~invertnet._runtime.deferred_check.check_deferred`).

    The work is done here, once per backward pass, rather than per wrapped call: a
    call only queues the sums it needs.
    """
    check_deferred(
        records,
        values=_sums,
        at_fault=lambda _, read: _at_fault(read[0], read[1:]),
        error=lambda record, _: nonfinite_error(record),
        holds_on_device=_no_fault_on_device,
        device_message=_DEVICE_MESSAGE,
    )


def _sums(record: _Record) -> tuple[torch.Tensor, ...]:
    """The sums a record is decided on: its reconstruction's, then its outputs'."""
    return (record.total, *record.outputs_totals)


def _at_fault(total: float, outputs_totals: Sequence[float]) -> bool:
    """A reconstruction is at fault where it is not finite although the outputs it
    was computed from were."""
    return not math.isfinite(total) and all(math.isfinite(o) for o in outputs_totals)


def _faults_read_on_host(records: list[_Record]) -> list[bool]:
    """Whether each record is at fault, with every sum read on the host at once."""
    return [_at_fault(read[0], read[1:]) for read in read_on_host(records, _sums)]


def _no_fault_on_device(records: list[_Record]) -> torch.Tensor:
    """True, on the records' device, where none is at fault; nothing is read.

    Records grouped by their number of outputs, so that each group's output sums
    form a matrix: a few kernels per backward pass, whatever the depth.
    """
    by_outputs: dict[int, list[_Record]] = {}
    for r in records:
        by_outputs.setdefault(len(r.outputs_totals), []).append(r)
    faults = []
    for count, group in by_outputs.items():
        at_fault = ~torch.isfinite(stack_scalars([r.total for r in group]))
        if count:
            outputs = stack_scalars([t for r in group for t in r.outputs_totals])
            at_fault &= torch.isfinite(outputs.reshape(-1, count)).all(dim=1)
        faults.append(at_fault.any())
    return ~torch.stack(faults).any()


def _assert_no_fault_on_device(records: list[_Record], device: torch.device) -> None:
    """Check the records on an accelerator by a kernel: reading the flags would make
    the host wait for the device. The assert names no block: its message says how
    to find it."""
    assert_on_device(_no_fault_on_device(records), _DEVICE_MESSAGE)


def nonfinite_error(record: _Record) -> ReconstructionError:
    """The :class:`ReconstructionError` for a reconstruction that is not finite."""
    tensor = record.reconstructed()
    if tensor is not None and tensor.numel() == record.numel:
        bad = int((~torch.isfinite(tensor)).sum())
        what = f"{bad} NaN/Inf value(s) of {record.numel}"
    else:
        bad = -1
        what = f"NaN/Inf values (their sum over its {record.numel} elements is not finite)"
    return ReconstructionError(
        f"{record.name}: reconstructed input {record.index} contains {what} although the "
        f"outputs it was computed from are finite, so the gradients of this backward pass "
        f"are NaN. {ADVICE}. To find where it first goes wrong, run the step inside "
        "invertnet.debug_reconstruction()",
        module_name=record.name,
        input_index=record.index,
        max_abs_error=float("nan"),
        nonfinite=bad,
    )
