"""The always-on NaN/Inf check of reconstructions, with no host read per block.

Reading a tensor's value on the host makes the host wait for the device; done once
per wrapper it would stall a GPU's queue once per block. So each wrapper's backward
only queues a reduction of its reconstructed inputs (their sum: NaN and Inf
propagate through it), and the sums of a whole backward pass are checked once, when
the pass ends (:func:`invertnet._torch_private.queue_end_of_backward`): read on the
host for CPU tensors, where that costs no wait and the error can name the wrapper;
by a device-side assert on an accelerator, so that a training step never waits.

A reconstruction is at fault only where the outputs it was computed from were
finite: NaN or Inf that the forward pass produced itself would reach the gradients
with plain autograd too. In a chain of wrappers a block's outputs are the inputs
that the next block restored moments before, so their sums are taken from that
block's record (by storage) instead of being reduced a second time; only outputs
that no wrapper restored, such as the last block's, are reduced here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from invertnet._torch_private import (
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
    outputs_total: torch.Tensor | None
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

_DEVICE_MESSAGE = (
    "invertnet: an InvertibleModuleWrapper reconstructed an input containing NaN/Inf "
    "although the outputs it was computed from were finite, so the gradients are NaN. "
    f"{ADVICE}. To find which wrapper, run the step inside "
    "invertnet.debug_reconstruction(model=...), or on the CPU, where the error names it"
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
    if len(outputs_totals) > 1:
        outputs_totals = [torch.stack([t.double() for t in outputs_totals]).sum()]
    outputs_total = outputs_totals[0] if outputs_totals else None
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
                outputs_total=outputs_total,
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
    """Raise for the first record whose reconstruction is at fault, reading each
    device's flags once."""
    by_device: dict[torch.device, list[int]] = {}
    for i, r in enumerate(records):
        by_device.setdefault(r.total.device, []).append(i)
    faults: list[int] = []
    for device, indices in by_device.items():
        totals = torch.stack([records[i].total.double() for i in indices])
        finite_outputs = torch.stack(
            [
                torch.ones((), dtype=torch.bool, device=device)
                if records[i].outputs_total is None
                else torch.isfinite(records[i].outputs_total)
                for i in indices
            ]
        )
        at_fault = ~torch.isfinite(totals) & finite_outputs
        if device.type != "cpu":
            # Reading the flags would make the host wait for the device; a kernel
            # checks them instead, and names no block: the message says how to find it.
            assert_on_device(~at_fault.any(), _DEVICE_MESSAGE)
        elif bool(at_fault.any()):  # the one read of this backward pass
            faults.extend(i for i, bad in zip(indices, at_fault.tolist()) if bad)
    if faults:
        raise nonfinite_error(records[min(faults)])


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
