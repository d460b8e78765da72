"""One deferred check of many values, with no host wait on an accelerator.

A layer that must check values its steps compute (a reconstruction that is not
finite, a momentum state out of its fixed-point range) would make the host wait
for the device if it read each value as it came: once per block, a GPU's queue
would stall once per block. Instead each step records what it computed, as
0-dimensional tensors (or as numbers the host already knows), and
:func:`check_deferred` checks the records of a whole pass at once:

* records on the CPU, and numbers known on the host, are read with one transfer;
  the first record at fault, in the order recorded, raises the caller's error,
  which can name the layer;
* records on an accelerator are checked by a device-side assert, one per device,
  so that the host never waits for the device; its message (at most 254 bytes)
  says how to find the layer.

The wrapper's finite check (:mod:`invertnet.wrappers._finite`) and the range
check of ``MomentumNet(use_backprop=False)``
(:class:`invertnet.momentum.fixed_point.RangeCheck`) are built on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from invertnet._runtime.torch_private import assert_on_device

__all__ = ["check_deferred", "read_on_host", "stack_scalars"]

R = TypeVar("R")


def stack_scalars(scalars: Sequence[torch.Tensor]) -> torch.Tensor:
    """One 1-D tensor of the zero-dimensional ``scalars``, in order (float64 where
    their dtypes differ: every float converts to it exactly)."""
    if len({t.dtype for t in scalars}) > 1:
        scalars = [t.double() for t in scalars]
    return torch.stack(list(scalars))


def read_on_host(
    records: Sequence[R], values: Callable[[R], Sequence[torch.Tensor]]
) -> list[list[float]]:
    """The ``values`` of each record, read on the host with one transfer for all."""
    per_record = [values(r) for r in records]
    flat = [t for tensors in per_record for t in tensors]
    read = iter(stack_scalars(flat).tolist() if flat else [])
    return [[next(read) for _ in tensors] for tensors in per_record]


def check_deferred(
    records: Sequence[R],
    *,
    values: Callable[[R], Sequence[torch.Tensor]],
    at_fault: Callable[[R, list[float]], bool],
    error: Callable[[R, list[float]], BaseException],
    holds_on_device: Callable[[list[R]], torch.Tensor],
    device_message: str,
    read_all_on_host: bool = False,
) -> None:
    """Check ``records`` at once: one host read for the CPU, a device-side assert elsewhere.

    Parameters
    ----------
    records : sequence
        What the pass recorded, in order.
    values : callable
        A record's zero-dimensional tensors, all on one device; none for a record
        whose value the host knows already (it is then checked on the host).
    at_fault : callable
        Whether a record is at fault, given its values read on the host.
    error : callable
        The exception raised for the first record at fault (given the same values).
    holds_on_device : callable
        For the records on one accelerator, a one-element boolean tensor on it,
        true where none is at fault (computed without reading anything).
    device_message : str
        The device-side assert's message, at most 254 bytes.
    read_all_on_host : bool
        Read the accelerators' records on the host too, for an error that names the
        layer (on a path that is failing anyway).

    Raises
    ------
    BaseException
        ``error`` of the first record at fault among those read on the host. A
        device-side assert fails later, asynchronously (on the CPU it raises
        :class:`RuntimeError` at once).
    """
    on_host: list[R] = []
    on_device: dict[torch.device, list[R]] = {}
    for record in records:
        tensors = values(record)
        device = tensors[0].device if tensors else None
        if device is None or device.type == "cpu" or read_all_on_host:
            on_host.append(record)
        else:
            on_device.setdefault(device, []).append(record)
    if on_host:
        for record, read in zip(on_host, read_on_host(on_host, values)):
            if at_fault(record, read):
                raise error(record, read)
    for group in on_device.values():
        assert_on_device(holds_on_device(group), device_message)
