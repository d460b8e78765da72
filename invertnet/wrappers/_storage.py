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
from typing import Any

import torch
from torch import nn
from torch.overrides import resolve_name

from invertnet._grad_mode import without_grad
from invertnet._torch_private import (
    call_without_subclass,
    holder_counts,
    input_kind,
    set_version,
    sole_holder_counts,
    version,
)

__all__ = [
    "FREED_ATTR",
    "FreedInput",
    "FreedTensor",
    "InputKeptWarning",
    "OWNED_ATTR",
    "free",
    "hide",
    "freed_tensor_error",
    "why_not_freeable",
]


class InputKeptWarning(UserWarning):
    """A wrapper kept an input in memory that ``keep_input=False`` asked it to free.

    Results are unaffected; only the memory saving is lost. Its own category lets a
    benchmark or a test turn it into an error, or count it, without touching other
    warnings (see :doc:`/guide/memory`).
    """


#: Attribute set on a freed input tensor, naming who freed it.
FREED_ATTR = "_invertnet_freed_by"
# The wrapper argument that would have kept the tensor, for the error message.
_KEEP_FLAG_ATTR = "_invertnet_keep_flag"
#: Attribute set (to ``True``) on a tensor that an invertnet layer made itself and
#: that nobody else can hold (a stack's own copy of the halves of its input): a
#: wrapper may free it although it has no ``grad_fn``.
OWNED_ATTR = "_invertnet_owned"


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
    storage = x.untyped_storage()
    if not storage.resizable():
        return (
            "its memory is not PyTorch's to free (a tensor made from a numpy array, a "
            "memory-mapped file or DLPack)"
        )
    ptr = storage.data_ptr()
    if any(o.untyped_storage().data_ptr() == ptr for o in outputs):
        return "an output shares its storage"
    return None


def may_free_memory(x: torch.Tensor) -> bool:
    """Whether a freeable input may have its memory freed and be rebuilt in backward,
    rather than hidden (:func:`hide`) and handed back exactly.

    A tensor that autograd computed (it has a ``grad_fn``) is an activation inside
    the model, rebuilt by backward before anything reads it. One without is data
    the caller made (the batch, a leaf): the caller may read it again after
    backward, and a rebuilt copy differs from it by rounding, which a batch reused
    every step would accumulate. Such a tensor is hidden instead: one tensor,
    whatever the depth. A layer's own copies (:data:`OWNED_ATTR`) are freed.
    """
    return x.grad_fn is not None or getattr(x, OWNED_ATTR, False)


@dataclass(slots=True)
class FreedInput:
    """What is needed to give a freed input its memory and values back."""

    tensor: torch.Tensor
    size: torch.Size
    stride: tuple[int, ...]
    nbytes: int
    version: int
    # Whether the tensor still carries the freed class and attributes (see unmark).
    marked: bool = True
    # For a hidden tensor (see hide): its own data, handed back as it was.
    hidden: torch.Tensor | None = None

    def restore(self, values: torch.Tensor) -> None:
        """Reallocate the storage, restore the shape and copy ``values`` in (nothing to
        copy where ``values`` is the tensor itself, written after :meth:`reallocate`).
        A hidden tensor gets its own data back instead, exactly.

        The writes are hidden from the version counter: to everyone else the tensor
        is the one they passed, so that a version guard (autograd's, or that of the
        wrapper that returned it) fires only for writes made by somebody else.
        """
        x = self.tensor
        if self.hidden is not None:
            self.reallocate()
            return
        if values is not x:
            x = self.reallocate()
            with without_grad():
                x.copy_(values)
        set_version([x], [self.version])

    def reallocate(self) -> torch.Tensor:
        """Give the tensor its memory and shape back (its values are undefined until
        written, except for a hidden tensor, which gets its own data back) and make it
        usable again; return it."""
        x = self.unmark()
        if self.hidden is not None:
            _set_data(x, self.hidden)
            return x
        with without_grad():
            storage = x.untyped_storage()
            storage.resize_(self.nbytes)
            _set_view(x, storage, self.size, self.stride)
        return x

    def unmark(self) -> torch.Tensor:
        """Make the tensor an ordinary tensor again (see :class:`FreedTensor`)."""
        x = self.tensor
        if self.marked:
            self.marked = False
            if type(x) is FreedTensor:
                x.__class__ = torch.Tensor
            delattr(x, FREED_ATTR)
            delattr(x, _KEEP_FLAG_ATTR)
        return x

    def __del__(self) -> None:
        # A hidden tensor is the caller's own: if its graph goes without a backward
        # (a forward pass whose loss is discarded), the caller gets it back as it was.
        if self.hidden is not None and self.marked:
            self.reallocate()

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


def _contiguous_strides(size: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


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
        stride = _contiguous_strides(size)
    x.data = torch.empty(0, dtype=x.dtype, device=x.device).set_(storage, 0, size, stride)


def _set_data(x: torch.Tensor, data: torch.Tensor) -> None:
    # As in _set_view: `.data` keeps x's gradient accumulator and version counter.
    x.data = data


def hide(x: torch.Tensor, owner: str, keep_flag: str = "keep_input") -> FreedInput:
    """Make ``x`` look freed, as :func:`free` does, keeping its memory aside.

    Its data moves, without a copy, to a tensor held by the returned record;
    ``x`` gets an empty storage of its own, so that using it before backward
    raises the same error as a freed input, and storage queries (memcnn's check
    ``x.storage().size() == 0``) answer as for one. Backward hands the data back,
    bit for bit (:meth:`FreedInput.restore`).
    """
    record_size, record_stride = x.size(), x.stride()
    nbytes = x.untyped_storage().nbytes()
    hidden = x.data
    with without_grad():
        _set_data(x, torch.empty(freed_shape(record_size), dtype=x.dtype, device=x.device))
    freed = FreedInput(x, record_size, record_stride, nbytes, 0, hidden=hidden)
    return _mark(x, owner, keep_flag, freed)


def _mark(x: torch.Tensor, owner: str, keep_flag: str, freed: FreedInput) -> FreedInput:
    setattr(x, FREED_ATTR, owner)
    setattr(x, _KEEP_FLAG_ATTR, keep_flag)
    freed.version = version(x)
    if type(x) is torch.Tensor:  # a subclass keeps its class, and its shape guard alone
        x.__class__ = FreedTensor
    return freed


def free(x: torch.Tensor, owner: str, keep_flag: str = "keep_input") -> FreedInput:
    """Release ``x``'s memory, keeping its storage object for a later restore.

    ``owner`` and ``keep_flag`` (the argument that would have kept ``x``) name the
    fix in the error raised if ``x`` is used before it is restored.
    """
    record_size, record_stride = x.size(), x.stride()
    nbytes = x.untyped_storage().nbytes()
    with without_grad():
        storage = x.untyped_storage()
        storage.resize_(0)
        _set_view(x, storage, freed_shape(record_size), None)
    return _mark(x, owner, keep_flag, FreedInput(x, record_size, record_stride, nbytes, 0))


def freed_tensor_error(x: torch.Tensor, what: str) -> RuntimeError:
    """The error for using ``x``, freed by a wrapper, before backward restored it."""
    owner = getattr(x, FREED_ATTR, "an InvertibleModuleWrapper")
    flag = getattr(x, _KEEP_FLAG_ATTR, "keep_input")
    return RuntimeError(
        f"{what}: this tensor was the input of {owner}, which freed it after its forward "
        f"pass to save memory ({flag}=False); it is restored only by backward and cannot "
        "be used before. If you use a block's input after the call, as in a residual skip "
        f"x + block(x), pass {flag}=True to that wrapper"
    )


#: What may be done with a freed tensor: ask what it is, not what it holds.
_INTROSPECTION = frozenset(
    f"torch.Tensor.{name}"
    for name in (
        "shape.__get__",
        "ndim.__get__",
        "dtype.__get__",
        "device.__get__",
        "layout.__get__",
        "requires_grad.__get__",
        "is_leaf.__get__",
        "grad_fn.__get__",
        "grad.__get__",
        "_version.__get__",
        "_base.__get__",
        "is_cuda.__get__",
        "size",
        "dim",
        "numel",
        "stride",
        "storage_offset",
        "element_size",
        "is_floating_point",
        "untyped_storage",
        # memcnn's check that an input was freed: x.storage().size() == 0.
        "storage",
        "data_ptr",
        "nbytes.__get__",
        "itemsize.__get__",
        "is_contiguous",
        "__repr__",
        # Hooks on its gradient read nothing either.
        "register_hook",
        "register_post_accumulate_grad_hook",
        "retain_grad",
    )
)


_AUTOGRAD_ENTRY_POINTS = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)


class FreedTensor(torch.Tensor):
    """The class a freed input has until backward restores it.

    Any operation that would read or write its values raises an error that names the
    wrapper and ``keep_input`` (a residual skip ``x + wrapper(x)`` otherwise failed
    on a shape mismatch, or an empty reduction silently gave 0); what the tensor is
    (shape, dtype, device, storage) can still be asked. The wrapper's backward makes
    it an ordinary tensor again before restoring it.
    """

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        name = resolve_name(func) or getattr(func, "__name__", repr(func))
        # Autograd may be pointed at it (backward(inputs=[x]), autograd.grad): that
        # names its place in the graph and reads nothing.
        if name in _INTROSPECTION or func in _AUTOGRAD_ENTRY_POINTS:
            return call_without_subclass(func, args, kwargs)
        freed = next(
            (a for a in (*args, *(kwargs or {}).values()) if isinstance(a, FreedTensor)), None
        )
        raise freed_tensor_error(freed if freed is not None else args[0], name)
