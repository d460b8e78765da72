"""Freeing an input's memory after the forward pass and restoring it in backward.

An input may be freed only when nothing but the caller's reference holds its
storage: freeing a tensor that a view, a ReLU's saved output or any other saved
tensor shares would corrupt that holder (memcnn issues 39, 70). PyTorch's use
counts tell how many tensors and saved variables hold a storage, so each input is
checked before anything is touched, against the counts of an input that nothing
else holds, measured on the running release (:mod:`invertnet._torch_private`).

A freed input keeps its storage object (so every alias of it sees the restored
data) but is given a zero-element shape until backward restores it: reading it in
the meantime then fails with an error or yields an empty tensor, where a full-shape
tensor over zero bytes would read out-of-bounds memory (memcnn issues 38, 73).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from invertnet._torch_private import holder_counts, input_kind, sole_holder_counts, version

__all__ = ["FreedInput", "InputKeptWarning", "why_not_freeable", "free", "FREED_ATTR"]


class InputKeptWarning(UserWarning):
    """A wrapper kept an input in memory that ``keep_input=False`` asked it to free.

    Results are unaffected; only the memory saving is lost. Its own category lets a
    benchmark or a test turn it into an error (``warnings.simplefilter("error",
    InputKeptWarning)``) or count it, without touching other warnings.
    """


#: Attribute set on a freed input tensor, naming who freed it.
FREED_ATTR = "_invertnet_freed_by"


def why_not_freeable(
    x: torch.Tensor, outputs: tuple[torch.Tensor, ...], own_alias: bool
) -> str | None:
    """Return why ``x`` must be kept, or ``None`` if it may be freed.

    Parameters
    ----------
    x : torch.Tensor
        The input.
    outputs : tuple of torch.Tensor
        The outputs of the call that consumed ``x``; none may share its storage.
    own_alias : bool
        Whether an invertnet wrapper that produced ``x`` holds one alias of it.
    """
    if x.numel() <= 1:
        return "it has fewer than two elements"
    if isinstance(x, nn.Parameter):
        return "it is a parameter"
    if x._base is not None:
        return "it is a view of another tensor"
    if x.storage_offset() != 0 or x.untyped_storage().nbytes() != x.numel() * x.element_size():
        return "it covers only part of its storage, which other tensors may use"
    # Compared with the counts of an input that nothing else holds, measured on this
    # PyTorch release (their constants changed between releases): one more holder of
    # the tensor is, say, an earlier operation that saved it for backward; one more
    # holder of the storage is another tensor over the same memory. (No storage
    # object may be alive in this frame while counting: under some releases it is a
    # holder too.)
    sole = sole_holder_counts(x.device.type)[input_kind(x)]
    counts = holder_counts(x)
    if counts.tensor > sole.tensor or counts.storage > sole.storage + (1 if own_alias else 0):
        return (
            "its storage is also held elsewhere (a view of it, or an earlier operation "
            "that saved it for backward, such as a ReLU)"
        )
    ptr = x.untyped_storage().data_ptr()
    if any(o.untyped_storage().data_ptr() == ptr for o in outputs):
        return "an output shares its storage"
    return None


@dataclass
class FreedInput:
    """What is needed to give a freed input its memory and values back."""

    tensor: torch.Tensor
    size: torch.Size
    stride: tuple[int, ...]
    nbytes: int
    version: int

    def restore(self, values: torch.Tensor) -> None:
        """Reallocate the storage, restore the shape and copy ``values`` in."""
        x = self.tensor
        with torch.no_grad():
            storage = x.untyped_storage()
            storage.resize_(self.nbytes)
            _set_view(x, storage, self.size, self.stride)
            x.copy_(values)
        # A later backward pass (num_bwd_passes > 1) checks for writes made after now.
        self.version = version(x)
        if hasattr(x, FREED_ATTR):
            delattr(x, FREED_ATTR)

    @property
    def mutated(self) -> bool:
        """Whether something wrote to the tensor in place while it was freed."""
        return version(self.tensor) != self.version


def freed_shape(size: torch.Size) -> tuple[int, ...]:
    """The zero-element shape a freed tensor of shape ``size`` is given.

    ``(0,)`` followed by as many ones as ``size`` has trailing dimensions after its
    last dimension of size >= 2: a zero then sits opposite a dimension of size >= 2,
    so broadcasting the freed tensor against anything of the original shape (as in
    ``x + wrapper(x)``) raises instead of silently yielding an empty result. A bare
    ``(0,)`` would broadcast against a trailing dimension of size 1.
    """
    last_big = max((i for i, n in enumerate(size) if n >= 2), default=len(size) - 1)
    return (0,) + (1,) * (len(size) - 1 - last_big)


def _set_view(
    x: torch.Tensor,
    storage: torch.UntypedStorage,
    size: Sequence[int],
    stride: Sequence[int] | None,
) -> None:
    """Make ``x`` view ``storage`` with the given geometry, keeping its autograd identity.

    ``Tensor.set_`` on ``x`` itself would make autograd drop a leaf's gradient
    accumulator, after which ``torch.autograd.grad(..., inputs=[x])`` and
    ``backward(inputs=[x])`` no longer find ``x`` in the graph. Assigning ``.data``
    keeps the accumulator (and the version counter), as long as dtype and device
    stay the same, which they do here.
    """
    if stride is None:
        stride = torch.empty(size, device="meta").stride()
    x.data = torch.empty(0, dtype=x.dtype, device=x.device).set_(storage, 0, size, stride)


def free(x: torch.Tensor, owner: str) -> FreedInput:
    """Release ``x``'s memory, keeping its storage object for a later restore."""
    record_size, record_stride = x.size(), x.stride()
    nbytes = x.untyped_storage().nbytes()
    with torch.no_grad():
        storage = x.untyped_storage()
        storage.resize_(0)
        _set_view(x, storage, freed_shape(record_size), None)
    setattr(x, FREED_ATTR, owner)
    return FreedInput(x, record_size, record_stride, nbytes, version(x))
