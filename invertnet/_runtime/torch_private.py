"""Every private PyTorch API invertnet relies on, in one place.

Nothing public tells how many holders a tensor or its storage has, nor runs code at
the end of a backward pass, nor names the backward node class of a custom
:class:`torch.autograd.Function`, nor copies many tensors in one dispatch, nor runs
the autograd engine without :func:`torch.autograd.grad`'s per-call argument
checks. What
invertnet needs of these is wrapped here, so that ``tests/test_torch_private.py``,
which CI runs under the oldest and the newest PyTorch release that
``pyproject.toml`` accepts, exercises every use.

Reference counts are the delicate part: their values for "nobody else holds this
tensor" are not a documented constant. Inside the forward of a custom
:class:`~torch.autograd.Function`, PyTorch 2.4 to 2.13 count two more holders of
each input than 2.14 does (the C++ argument unpacking keeps copies), and storage use
counts read one lower under 2.4 than later. So the counts an input has when nothing
else holds it are not written down here but measured once per process and device
type, by passing fresh tensors, which nothing else can hold, through a probe
Function of the same shape as the wrapper's (:func:`sole_holder_counts`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.autograd.graph import _engine_run_backward
from torch.nn.modules import module as nn_module

__all__ = [
    "HolderCounts",
    "MAX_DEVICE_MESSAGE_BYTES",
    "assert_on_device",
    "holder_counts",
    "input_kind",
    "is_output_of",
    "held_only_by_caller",
    "call_without_subclass",
    "copy_all",
    "gradients",
    "current_backward_pass",
    "queue_end_of_backward",
    "sole_holder_counts",
    "storage_key",
    "set_version",
    "delayed_error",
    "ModuleHooks",
    "global_forward_hooks_registered",
    "module_hooks",
    "forward_ad_active",
    "functorch_transforms_active",
    "graph_kept",
    "version",
]


class HolderCounts(NamedTuple):
    """How many references hold a tensor and its storage, as PyTorch counts them."""

    #: References to the tensor itself (its ``TensorImpl``): the caller's, plus any
    #: kept by autograd, such as a gradient accumulator or a saved input.
    tensor: int
    #: References to its storage: one per tensor that views it.
    storage: int


def holder_counts(x: torch.Tensor) -> HolderCounts:
    """The reference counts of ``x`` and of its storage, at this moment."""
    return HolderCounts(*_counts(x))


def _counts(x: torch.Tensor) -> tuple[int, int]:
    # holder_counts without the named tuple, for held_only_by_caller, which the
    # coupling engine asks at every step of every block.
    return x._use_count(), torch._C._storage_Use_Count(x.untyped_storage()._cdata)


def input_kind(x: torch.Tensor) -> str:
    """The category of ``x`` that fixes its baseline counts (see :func:`sole_holder_counts`).

    A leaf that requires grad is also held by its gradient accumulator.
    """
    if not x.requires_grad:
        return "no_grad"
    return "leaf" if x.is_leaf else "non_leaf"


class _CountProbe(torch.autograd.Function):
    """Records, inside its forward, the holder counts of the tensors passed to it."""

    @staticmethod
    def forward(ctx: Any, found: list[HolderCounts], *tensors: torch.Tensor) -> torch.Tensor:
        found.extend(holder_counts(t) for t in tensors)
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:  # pragma: no cover
        return (None,) * 4


@functools.cache
def sole_holder_counts(device_type: str) -> dict[str, HolderCounts]:
    """The holder counts, per :func:`input_kind`, of an input of a custom Function's
    forward that nothing but the caller holds, on tensors of ``device_type``.

    Measured once per process and device type on fresh tensors, which nothing else
    can hold, passed through a Function the same way a wrapper's inputs are.
    """
    device = torch.device(device_type)
    found: list[HolderCounts] = []
    with torch.inference_mode(False), torch.enable_grad():
        leaf = torch.zeros(2, device=device, requires_grad=True)
        non_leaf = torch.zeros(2, device=device, requires_grad=True).clone()
        plain = torch.zeros(2, device=device)
        _CountProbe.apply(found, leaf, non_leaf, plain)
    return dict(zip(("leaf", "non_leaf", "no_grad"), found))


@functools.cache
def _unshared_counts(device_type: str) -> HolderCounts:
    # A fresh tensor: one Python object holds it, and it alone holds its storage.
    return holder_counts(torch.empty(2, device=torch.device(device_type)))


@functools.cache
def _python_references_of_one_local() -> int:
    # Measured, not assumed: what sys.getrefcount counts besides the holders (its
    # own argument) is an implementation detail of CPython. Counted as
    # held_only_by_caller counts, from a frame's local variable.
    t = torch.empty(0)
    return sys.getrefcount(t)


def held_only_by_caller(t: torch.Tensor, references: int = 1) -> bool:
    """Whether nothing but the caller holds ``t``: neither another Python reference
    (a module that stashed it, a hook's dictionary, an input tuple), nor another
    tensor over its memory (a view, a ``detach()`` alias), nor autograd (a saved
    tensor). Then the caller may write over ``t`` without anyone seeing it.

    Parameters
    ----------
    t : torch.Tensor
        A plain tensor; a subclass, a view or a tensor that requires grad is
        reported as held elsewhere.
    references : int
        How many Python references to ``t`` the caller holds itself (local
        variables, containers), each of which it will drop or overwrite.
    """
    if type(t) is not torch.Tensor or t.requires_grad or t._base is not None:
        return False
    # This frame's parameter is one more reference, counted as the calibration's
    # local variable is. (Inline: the engine asks at every step of every block.)
    if sys.getrefcount(t) - _python_references_of_one_local() != references:
        return False
    # is_cpu first: reading t.device makes a device object, which costs as much as
    # the counts themselves.
    return _counts(t) == _unshared_counts("cpu" if t.is_cpu else t.device.type)


def storage_key(x: torch.Tensor) -> int:
    """An identifier of ``x``'s storage, shared by every tensor that views it.

    Unlike ``untyped_storage().data_ptr()`` it survives the storage being resized,
    and it stays unique while any tensor holds the storage.
    """
    return x.untyped_storage()._cdata


def version(x: torch.Tensor) -> int:
    """The version counter of ``x``, bumped by every in-place write to it.

    Read without a tensor subclass's ``__torch_function__`` (a freed input's class
    answers the query too, but through a handler that costs tens of microseconds).
    """
    if type(x) is torch.Tensor or type(x) is torch.nn.Parameter:
        return x._version
    with torch._C.DisableTorchFunctionSubclass():
        return x._version


def set_version(tensors: Sequence[torch.Tensor], versions: Sequence[int]) -> None:
    """Set the version counters of ``tensors`` back to ``versions``.

    A wrapper that freed an input and wrote the rebuilt values back into the same
    tensor hides those writes this way: to everyone else the tensor is unchanged,
    so that a version guard (autograd's, or a wrapper's on its outputs) fires only
    for writes made by somebody else. This is the use PyTorch's
    ``_unsafe_preserve_version_counter`` documents.
    """
    if not tensors:
        return
    if _set_version_takes_tuples():
        torch._C._autograd._unsafe_set_version_counter(tuple(tensors), tuple(versions))
    else:
        for t, v in zip(tensors, versions):
            torch._C._autograd._unsafe_set_version_counter(t, v)


@functools.cache
def _set_version_takes_tuples() -> bool:
    # PyTorch 2.5 and later take tuples, 2.4 one tensor at a time. Found out once,
    # on a tensor of no consequence: a failed call formats its arguments into the
    # error message, which would read their values on every call.
    probe = torch.zeros(1)
    try:
        torch._C._autograd._unsafe_set_version_counter((probe,), (0,))
    except TypeError:
        return False
    return True


def graph_kept() -> bool:
    """Whether the backward pass now running keeps its graph (``retain_graph=True``).

    ``True`` where the running PyTorch cannot tell: a caller then keeps what a later
    backward pass could need, which costs memory only.
    """
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if query is None else bool(query())


def functorch_transforms_active() -> bool:
    """Whether a :mod:`torch.func` transform (``grad``, ``vjp``, ``jvp``, ``vmap``,
    ``jacrev``...) is running: a custom Function's forward then sees wrapped
    tensors, which the memory-saving layers cannot free or reconstruct."""
    return bool(torch._C._are_functorch_transforms_active())


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level (:func:`torch.autograd.forward_ad.dual_level`)
    is open, in which dual tensors may carry tangents."""
    from torch.autograd import forward_ad

    return forward_ad._current_level >= 0


class ModuleHooks(NamedTuple):
    """The hooks that ``module(*x)`` would run around ``module.forward``: the
    module's own, after the global ones (``register_module_forward_hook`` and
    friends), in the order :meth:`torch.nn.Module.__call__` runs them. Each entry
    is ``(hook, with_kwargs)``; backward hooks carry ``with_kwargs=False``."""

    forward_pre: list[tuple[Callable[..., Any], bool]]
    forward: list[tuple[Callable[..., Any], bool]]
    backward_pre: list[tuple[Callable[..., Any], bool]]
    backward: list[tuple[Callable[..., Any], bool]]
    #: Whether a backward hook is of the deprecated, non-"full" kind
    #: (``register_backward_hook``).
    old_style_backward: bool


def global_forward_hooks_registered() -> bool:
    """Whether a forward pre-hook or forward hook is registered for every module
    (``torch.nn.modules.module.register_module_forward_pre_hook`` and
    ``register_module_forward_hook``): it then runs around every module call."""
    return bool(nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks)


def module_hooks(module: torch.nn.Module) -> ModuleHooks | None:
    """The call hooks of ``module`` (see :class:`ModuleHooks`), or ``None`` when it has
    none, which is the common case and costs a few dictionary checks."""
    own = (
        module._forward_pre_hooks,
        module._forward_hooks,
        module._backward_pre_hooks,
        module._backward_hooks,
    )
    glob = (
        nn_module._global_forward_pre_hooks,
        nn_module._global_forward_hooks,
        nn_module._global_backward_pre_hooks,
        nn_module._global_backward_hooks,
    )
    # Spelled out rather than any(own) or any(glob): asked per block and per call.
    if not (own[0] or own[1] or own[2] or own[3] or glob[0] or glob[1] or glob[2] or glob[3]):
        return None
    pre_kwargs = module._forward_pre_hooks_with_kwargs
    post_kwargs = module._forward_hooks_with_kwargs
    # Not in PyTorch 2.4, which has no global forward hooks with kwargs.
    global_post_kwargs = getattr(nn_module, "_global_forward_hooks_with_kwargs", {})
    return ModuleHooks(
        forward_pre=[(h, False) for h in glob[0].values()]
        + [(h, key in pre_kwargs) for key, h in own[0].items()],
        forward=[(h, key in global_post_kwargs) for key, h in glob[1].items()]
        + [(h, key in post_kwargs) for key, h in own[1].items()],
        backward_pre=[(h, False) for h in (*glob[2].values(), *own[2].values())],
        backward=[(h, False) for h in (*glob[3].values(), *own[3].values())],
        old_style_backward=bool(own[3]) and module._is_full_backward_hook is False,
    )


def delayed_error(
    message: str, tensors: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor | None, ...]:
    """Aliases of ``tensors`` whose backward raises ``message``: what a backward pass
    that cannot be differentiated returns under ``create_graph=True``, so that the
    error comes only if somebody differentiates through it, and names the layer
    (``torch.autograd.function.once_differentiable`` raises a message of its own).
    """
    err = torch._C._functions.DelayedError(message, len(tensors))

    def requiring_grad(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        alias = t.detach()
        alias.requires_grad_(True)
        return alias

    found = err(*(requiring_grad(t) for t in tensors))
    return found if isinstance(found, tuple) else (found,)


def is_output_of(x: torch.Tensor, function: type[torch.autograd.Function]) -> bool:
    """Whether ``x`` was returned by a call of the custom Function ``function``."""
    return isinstance(x.grad_fn, function._backward_cls)


def queue_end_of_backward(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the backward pass now running ends.

    Returns ``False``, queueing nothing, when called outside a backward pass. An
    exception the callback raises propagates out of ``backward()`` (or
    ``torch.autograd.grad``).
    """
    try:
        torch.autograd.Variable._execution_engine.queue_callback(callback)
    except RuntimeError:
        return False
    return True


#: The longest message a device-side assert carries: CUDA's ``_assert_async`` refuses
#: one of 255 bytes or more (its kernel copies it into a fixed buffer).
MAX_DEVICE_MESSAGE_BYTES = 254


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """Fail if the one-element boolean ``condition`` is false, without the host
    waiting for the device: on an accelerator the check runs in a kernel (a failure
    is a device-side assert, which ends the process's use of the device); on the CPU
    it raises :class:`RuntimeError` at once.

    Raises
    ------
    ValueError
        If ``message`` is longer than :data:`MAX_DEVICE_MESSAGE_BYTES` in UTF-8, on
        every device, so that a message too long for CUDA fails on the CPU too.
    """
    size = len(message.encode())
    if size > MAX_DEVICE_MESSAGE_BYTES:
        raise ValueError(
            f"assert_on_device: the message is {size} bytes; a device-side assert carries "
            f"at most {MAX_DEVICE_MESSAGE_BYTES}: {message[:60]!r}..."
        )
    torch._assert_async(condition, message)


# Parameters are plain tensors to torch.autograd.grad too (it skips their
# __torch_function__).
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def gradients(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)`` for
    callers that already hold one gradient per output, of its shape and dtype.

    ``torch.autograd.grad`` validates and normalises its arguments in Python on every
    call (shapes compared through symbolic-shape helpers, tensor-like checks, tuple
    building): tens of microseconds, paid twice per block by the fused backward of a
    coupling, where the gradients are the engine's own and need none of it. This
    runs PyTorch's engine entry point directly (``_engine_run_backward``, which
    keeps its logging hooks and context hand-over), and falls back to
    ``torch.autograd.grad`` (and its errors) for anything but plain tensors (a
    subclass may override it), for no inputs, or for gradients whose shape, dtype or
    device differ from their output's.
    """
    plain = all(type(t) in _PLAIN_TENSOR_TYPES for t in (*outputs, *inputs, *grad_outputs))
    if (
        not plain
        or not inputs
        or len(outputs) != len(grad_outputs)
        or any(
            o.shape != g.shape or o.dtype != g.dtype or o.device != g.device
            for o, g in zip(outputs, grad_outputs)
        )
    ):
        return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return _engine_run_backward(
        tuple(outputs),
        tuple(grad_outputs),
        False,  # retain_graph
        False,  # create_graph
        tuple(inputs),
        True,  # allow_unused
        accumulate_grad=False,
    )


def copy_all(
    destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], one_device: bool = False
) -> None:
    """``d.copy_(s)`` for every pair, in one call per device: the copies of many small
    tensors (a block's buffers) cost one dispatch instead of one each. With
    ``one_device`` the caller vouches that all are on one device (one call, no
    grouping)."""
    if one_device:
        if len(destinations) != len(sources):
            raise ValueError(
                f"copy_all: {len(destinations)} destinations but {len(sources)} sources"
            )
        torch._foreach_copy_(list(destinations), list(sources))
        return
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(destinations, sources, strict=True):
        pair = by_device.setdefault(d.device, ([], []))
        pair[0].append(d)
        pair[1].append(s)
    for dsts, srcs in by_device.values():
        torch._foreach_copy_(dsts, srcs)


def call_without_subclass(func: Callable[..., Any], args: tuple, kwargs: dict | None) -> Any:
    """Call the torch function ``func`` as if its tensor arguments were plain tensors.

    For a ``__torch_function__`` override that lets some calls through unchanged:
    unlike ``super().__torch_function__``, results are not turned into the subclass.
    """
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **(kwargs or {}))


def current_backward_pass() -> int | None:
    """An identifier of the backward pass running on this thread (unique in the
    process; a nested pass has its own), or ``None`` outside backward."""
    task = torch._C._current_graph_task_id()
    return None if task < 0 else task
