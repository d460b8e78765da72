"""Freeing an input's memory after the forward pass and restoring it in backward.

An input may be freed only when nothing but the caller's reference holds its
storage: freeing a tensor that a view, a ReLU's saved output or any other saved
tensor shares would corrupt that holder (memcnn issues 39, 70). PyTorch's use
counts tell how many tensors and saved variables hold a storage, so each input is
checked before anything is touched, against the counts of an input that nothing
else holds, measured on the running release (:mod:`invertnet._runtime.torch_private`).

A freed input keeps its storage object (so every alias of it sees the restored
data) but is given a zero-element shape until backward restores it: reading it in
the meantime then fails with an error or yields an empty tensor, where a full-shape
tensor over zero bytes would read out-of-bounds memory (memcnn issues 38, 73).

A view is kept, except a whole alias (all of another tensor's memory, seen with the
same shape and strides: what FSDP2's pre-forward hook hands a unit's wrapper) whose
base nothing else holds: it is freed together with its base (see _why_alias_kept).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.overrides import resolve_name

from invertnet._grad_mode import without_grad
from invertnet._runtime.torch_private import (
    HolderCounts,
    call_without_subclass,
    holder_counts,
    input_kind,
    is_output_of,
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
    x: torch.Tensor,
    outputs: tuple[torch.Tensor, ...],
    own_alias: bool,
    base_own_alias: bool = False,
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
    base_own_alias : bool
        For a view ``x``: whether an invertnet wrapper that produced its base holds
        one alias of the base.
    """
    if x.numel() <= 1:
        return "it has fewer than two elements"
    if isinstance(x, nn.Parameter):
        return "it is a parameter"
    if x._base is not None:
        # A view is freed only where it is a whole alias that nothing else holds,
        # and then with its base (see _why_alias_kept).
        reason = _why_alias_kept(x, own_alias, base_own_alias)
        if reason is not None:
            return reason
    else:
        if x.storage_offset() != 0 or x.untyped_storage().nbytes() != x.numel() * x.element_size():
            return "it covers only part of its storage, which other tensors may use"
        # Compared with the counts of an input that nothing else holds, measured on
        # this PyTorch release (their constants changed between releases): one more
        # holder of the tensor is, say, an earlier operation that saved it for
        # backward; one more holder of the storage is another tensor over the same
        # memory. (No storage object may be alive in this frame while counting:
        # under some releases it is a holder too.)
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


# Whole aliases: a view with the same storage, shape and strides as its base.
#
# FSDP2's pre-forward hook passes the inputs of a unit that require grad through an
# identity autograd Function (RegisterPostBackwardFunction), and autograd returns an
# input that a Function gives back unchanged as a view of it: a wrapper that is its
# own unit gets, instead of the activation h its caller passed, a whole alias x of
# it (x._base is h). Freeing x releases the storage it shares with h; h keeps a
# shape of its own. The alias is freed only where nothing but the following hold h,
# each accounted for exactly:
#
# * x itself, through its _base reference (one holder of h, one of the storage);
# * the Python object of h, which this check holds itself (one holder of h);
# * the invertnet wrapper that returned h, if one did: it keeps a detached alias of
#   its output to rebuild its own input in backward (one holder of the storage);
# * Python references to h that PyTorch's counts cannot see: none at all for an
#   alias made by anything else (h is then unreachable but through x._base), any
#   for an alias made by FSDP2's hook, where h is the input the caller passed to the
#   wrapper (the unit) and is guarded exactly as a freed input is.
#
# Anything else (a second view of h, an operation that saved h for backward, a
# ReLU whose output h is, a Python reference to h kept by the caller of a view of
# its own) makes one more holder than the measured counts, and the input is kept.
# The counts are measured once per process on the running release, against an
# alias made as FSDP2 makes it (_sole_alias_holders), and that alias's own counts
# must be those of an input nothing else holds (sole_holder_counts) plus the one
# storage holder that is h; where they are not, no view is freed. (Under PyTorch
# 2.14 on the CPU: x 1 tensor holder and 3 storage holders, sole_holder_counts'
# non-leaf 1 and 2 plus h; h 2 tensor holders, x._base and its Python object; one
# storage holder more where a wrapper returned h. A caller's Python reference to h
# changes none of these: only sys.getrefcount sees it.)
#
# h stays reachable (through x._base, and through the caller's references where
# FSDP2 made the alias), so it is freed as x is: given the zero-element freed shape
# and class until backward restores its shape, where a full shape over zero bytes
# would read out-of-bounds memory. The wrapper that returned h reads only its own
# detached alias, in its own backward, which runs after this wrapper's backward has
# restored the storage (its _check_before_backward refuses an output still freed).


class AliasHolders(NamedTuple):
    """The holders of a whole alias ``x`` and of its base (see :func:`_alias_holders`)."""

    #: The counts of ``x``, whose storage count includes the base.
    alias: HolderCounts
    #: The counts of ``x._base`` (the storage count is the same as ``alias``'s).
    base: HolderCounts
    #: Python references to the base's object (``sys.getrefcount``), calibrated.
    base_references: int


def _alias_holders(x: torch.Tensor) -> AliasHolders:
    """The holder counts of ``x`` and of its base, at this moment.

    The probe (:func:`_sole_alias_holders`) and the check call this same function,
    from frames that hold the base in no variable, so that the Python references it
    counts differ only by the references held elsewhere.
    """
    base = x._base
    return AliasHolders(holder_counts(x), holder_counts(base), sys.getrefcount(base))


def _is_whole_alias(x: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``x`` views all of ``base``'s storage exactly as ``base`` does: the
    same memory, dtype, shape and strides, both from offset 0, over a storage of
    exactly their size."""
    if type(x) is not torch.Tensor or type(base) is not torch.Tensor:
        return False  # a subclass (or a Parameter) may hold more than it shows
    if (
        x.dtype != base.dtype
        or x.layout != torch.strided
        or base.layout != torch.strided
        or x.is_conj()
        or base.is_conj()
        or x.is_neg()
        or base.is_neg()
        or x.shape != base.shape
        or x.stride() != base.stride()
        or x.storage_offset() != 0
        or base.storage_offset() != 0
    ):
        return False
    storage, base_storage = x.untyped_storage(), base.untyped_storage()
    return (
        storage.data_ptr() == base_storage.data_ptr()
        and storage.nbytes() == base_storage.nbytes() == x.numel() * x.element_size()
    )


_VIEW = "it is a view of another tensor"


def _why_alias_kept(x: torch.Tensor, own_alias: bool, base_own_alias: bool) -> str | None:
    """Why the view ``x`` must be kept, or ``None`` if it may be freed with its base
    (a whole alias that nothing else holds: see the comment above)."""
    # x a wrapper's own output (its _base an intermediate of that wrapper's module),
    # or not an activation over an activation: kept, as any view.
    if own_alias or not _is_whole_alias(x, x._base):
        return _VIEW
    if input_kind(x) != "non_leaf" or input_kind(x._base) != "non_leaf":
        return _VIEW
    sole = _sole_alias_holders(x.device.type)
    if sole is None:
        return _VIEW
    found = _alias_holders(x)  # no reference to the base held in this frame
    produced = 1 if base_own_alias else 0
    if (
        found.alias.tensor > sole.alias.tensor
        or found.base.tensor > sole.base.tensor
        or found.alias.storage > sole.alias.storage + produced
    ):
        return (
            f"{_VIEW}, which is also held elsewhere (another view of it, or an earlier "
            "operation that saved it for backward, such as a ReLU)"
        )
    if not _made_by_fsdp(x) and found.base_references > sole.base_references:
        return f"{_VIEW}, which the caller still holds"
    return None


class _Alias(torch.autograd.Function):
    """Returns its input, which autograd hands back as a whole alias of it: what
    FSDP2's pre-forward hook does to a unit's inputs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        return grad


class _AliasProbe(torch.autograd.Function):
    """Records, inside its forward, :func:`_alias_holders` of the alias passed to it."""

    @staticmethod
    def forward(ctx: Any, found: list[AliasHolders], x: torch.Tensor) -> torch.Tensor:
        found.append(_alias_holders(x))
        return x.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:  # pragma: no cover
        return None, None


@functools.cache
def _sole_alias_holders(device_type: str) -> AliasHolders | None:
    """The holders of a whole alias (an activation passed through an identity
    Function, as FSDP2's hook does) and of its base, inside a custom Function's
    forward, when nothing else holds either; ``None`` where the alias's own counts
    are not those of :func:`~invertnet._runtime.torch_private.sole_holder_counts` plus its
    base's storage reference, so that no view is freed on a release that counts
    otherwise.

    Measured once per process and device type on fresh tensors.
    """
    device = torch.device(device_type)
    found: list[AliasHolders] = []
    with torch.inference_mode(False), torch.enable_grad():
        base = torch.zeros(2, device=device, requires_grad=True).clone()
        alias = _Alias.apply(base)
        del base  # held by alias._base alone, as a base no caller holds
        _AliasProbe.apply(found, alias)
    (holders,) = found
    sole = sole_holder_counts(device_type)["non_leaf"]
    if holders.alias != HolderCounts(sole.tensor, sole.storage + 1):
        return None
    return holders


#: The modules that define FSDP2's RegisterPostBackwardFunction, which aliases a
#: unit's inputs (torch >= 2.6, then 2.4 and 2.5).
_FSDP_PARAM_GROUP_MODULES = (
    "torch.distributed.fsdp._fully_shard._fsdp_param_group",
    "torch.distributed._composable.fsdp._fsdp_param_group",
)


def _made_by_fsdp(x: torch.Tensor) -> bool:
    """Whether FSDP2's pre-forward hook made ``x`` (an alias of a unit's input).

    Looked up in the modules already imported only: where FSDP2 is not, it made
    nothing.
    """
    for name in _FSDP_PARAM_GROUP_MODULES:
        function = getattr(sys.modules.get(name), "RegisterPostBackwardFunction", None)
        if function is not None and is_output_of(x, function):
            return True
    return False


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
    # For a whole alias (see _why_alias_kept): its base, freed with it (the same
    # storage, shape and strides) and restored with it.
    base: torch.Tensor | None = None

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
            if self.base is not None:
                _set_view(self.base, storage, self.size, self.stride)
        return x

    def unmark(self) -> torch.Tensor:
        """Make the tensor an ordinary tensor again (see :class:`FreedTensor`)."""
        x = self.tensor
        if self.marked:
            self.marked = False
            _unmark_tensor(x)
            if self.base is not None:
                _unmark_tensor(self.base)
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
    # new_empty inherits dtype and device (cheaper to call than torch.empty(0, ...));
    # a subclass would answer it with its own class, so it gets a plain tensor.
    view = (
        x.new_empty(0)
        if type(x) is torch.Tensor
        else torch.empty(0, dtype=x.dtype, device=x.device)
    )
    x.data = view.set_(storage, 0, size, stride)


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
    base = freed.base
    if base is not None:
        setattr(base, FREED_ATTR, owner)
        setattr(base, _KEEP_FLAG_ATTR, keep_flag)
    freed.version = version(x)  # a view shares its base's version counter
    if type(x) is torch.Tensor:  # a subclass keeps its class, and its shape guard alone
        x.__class__ = FreedTensor
    if base is not None and type(base) is torch.Tensor:
        base.__class__ = FreedTensor
    return freed


def _unmark_tensor(t: torch.Tensor) -> None:
    if type(t) is FreedTensor:
        t.__class__ = torch.Tensor
    delattr(t, FREED_ATTR)
    delattr(t, _KEEP_FLAG_ATTR)


def free(x: torch.Tensor, owner: str, keep_flag: str = "keep_input") -> FreedInput:
    """Release ``x``'s memory, keeping its storage object for a later restore.

    ``owner`` and ``keep_flag`` (the argument that would have kept ``x``) name the
    fix in the error raised if ``x`` is used before it is restored.

    A whole alias (the only view :func:`why_not_freeable` lets go) is freed with its
    base, which shares its storage, shape and strides: both get the freed shape, and
    both their shapes back on restore.
    """
    record_size, record_stride = x.size(), x.stride()
    nbytes = x.untyped_storage().nbytes()
    base = x._base
    with without_grad():
        storage = x.untyped_storage()
        storage.resize_(0)
        _set_view(x, storage, freed_shape(record_size), None)
        if base is not None:
            _set_view(base, storage, freed_shape(record_size), None)
    freed = FreedInput(x, record_size, record_stride, nbytes, 0, base=base)
    return _mark(x, owner, keep_flag, freed)


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
