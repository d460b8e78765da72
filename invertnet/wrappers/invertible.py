"""InvertibleModuleWrapper: trade compute for memory with any invertible module."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from invertnet._rng import RNGTape
from invertnet._torch_private import is_output_of
from invertnet.couplings.base import CouplingBase
from invertnet.wrappers._finite import check_finite_when_backward_ends
from invertnet.wrappers._recompute import (
    AutocastState,
    BufferSnapshot,
    submodules,
    trainable_parameters,
)
from invertnet.wrappers._storage import (
    FREED_ATTR,
    FreedInput,
    InputKeptWarning,
    free,
    why_not_freeable,
)
from invertnet.wrappers.debug import (
    DebugSettings,
    check_reconstruction,
    current_settings,
    finite_check_enabled,
    module_name,
)

__all__ = ["InvertibleModuleWrapper"]

Tensors = tuple[torch.Tensor, ...]
FusedBackward = Callable[[Tensors, Tensors, Tensors], tuple[Tensors, Tensors, list]]
Output = torch.Tensor | Tensors


def _as_tuple(y: Any, what: str) -> Tensors:
    ys = tuple(y) if isinstance(y, (tuple, list)) else (y,)
    for i, t in enumerate(ys):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} {i} must be a tensor, got {type(t).__name__}")
    return ys


@dataclass(slots=True)
class _Call:
    """Everything one wrapped call needs besides its tensors.

    One lives from each block's forward to its backward, so it holds as few Python
    objects as it can: a deep stack keeps one per block, and every object alive
    then counts toward the garbage collector's runs (with three bound methods, a
    list and a dict more per block, a 128-block step ran the collector four times
    as often as RevLib's).
    """

    wrapper: InvertibleModuleWrapper
    module: nn.Module  # the wrapped one
    forward_direction: bool
    keep_input: bool
    num_inputs: int
    # The wrapped module and those under it, whose buffers backward leaves alone.
    modules: list[nn.Module]
    # Filled in by the forward pass: the inputs then the parameters, as passed.
    tensors: Tensors = ()
    outputs: Tensors = ()
    freed: dict[int, FreedInput] | None = None
    tape: RNGTape | None = None
    autocast: tuple[AutocastState, ...] = ()
    passes_left: int = 0
    # Debug mode (invertnet.debug_reconstruction): copies of the freed inputs.
    debug: DebugSettings | None = None
    originals: dict[int, torch.Tensor] | None = None

    @property
    def direction(self) -> str:
        return "forward" if self.forward_direction else "inverse"

    @property
    def keep_flag(self) -> str:
        return "keep_input" if self.forward_direction else "keep_input_inverse"

    @property
    def run(self) -> Callable[..., Any]:
        return self.module.forward if self.forward_direction else self.module.inverse

    @property
    def undo(self) -> Callable[..., Any]:
        return self.module.inverse if self.forward_direction else self.module.forward

    @property
    def fused(self) -> FusedBackward | None:
        """The module's fused inverse-and-backward pass, for the forward direction."""
        if not self.forward_direction:
            return None
        return getattr(self.module, "inverse_and_vjp", None)

    @property
    def inputs(self) -> Tensors:
        return self.tensors[: self.num_inputs]

    @property
    def params(self) -> Tensors:
        return self.tensors[self.num_inputs :]


@torch.compiler.disable
def _prepare(call: _Call, inputs: Tensors) -> None:
    """Check the inputs and record what backward must replay (RNG, autocast, debug)."""
    wrapper = call.wrapper
    for i, x in enumerate(inputs):
        owner = getattr(x, FREED_ATTR, None)
        if owner is not None:
            raise RuntimeError(
                f"{type(call.module).__name__}.{call.direction}: input {i} was freed by "
                f"an earlier {owner} with keep_input=False and is used again here; pass "
                "keep_input=True (keep_input_inverse=True for inverse) to that wrapper"
            )
    call.debug = current_settings()
    call.tape = RNGTape(inputs) if wrapper.preserve_rng_state else None
    call.autocast = AutocastState.capture(inputs)


@torch.compiler.disable
def _free_inputs(call: _Call, inputs: Tensors, outputs: Tensors) -> None:
    """Free the inputs that nothing else holds; warn (once) about the others."""
    wrapper = call.wrapper
    # A tensor passed twice is kept at every position: checking it only from
    # its second occurrence on would see it already freed by the first.
    ids = [id(x) for x in inputs]
    for i, x in enumerate(inputs):
        own_alias = is_output_of(x, _InvertibleFunction)
        if ids.count(id(x)) > 1:
            reason: str | None = "it is passed more than once"
        else:
            reason = why_not_freeable(x, outputs, own_alias)
        if reason is None:
            if call.debug is not None:
                if call.originals is None:
                    call.originals = {}
                call.originals[i] = x.detach().clone()
            if call.freed is None:
                call.freed = {}
            call.freed[i] = free(
                x, f"InvertibleModuleWrapper({type(call.module).__name__})", call.keep_flag
            )
        else:
            wrapper._warn_kept(i, reason)


@torch.compiler.disable
def _run_eagerly(call: _Call, inputs: Tensors) -> Tensors:
    """Run the module uncompiled, as backward will (preserve_rng_state=True).

    Backward replays the random state recorded here into an eager recomputation;
    a compiled forward draws its random numbers differently (Inductor's own
    generator), so dropout masks would not match and gradients would be wrong.
    """
    return _as_tuple(call.run(*inputs), f"output of {type(call.module).__name__}")


class _InvertibleFunction(torch.autograd.Function):
    # torch.compile: Dynamo must not trace the storage bookkeeping (use counts,
    # storage resizing and set_ on graph inputs cannot be traced, and partial traces
    # of them are fragile), so this frame and the helpers above run eagerly; the
    # wrapped module's own forward, called from here, is still compiled.
    @staticmethod
    @torch.compiler.disable(recursive=False)
    def forward(ctx: Any, call: _Call, *tensors: torch.Tensor) -> Tensors:
        inputs = tensors[: call.num_inputs]
        _prepare(call, inputs)
        if call.tape is None:
            outputs = _as_tuple(call.run(*inputs), f"output of {type(call.module).__name__}")
        else:
            with call.tape.recording():
                outputs = _run_eagerly(call, inputs)
        if not call.keep_input:
            _free_inputs(call, inputs, outputs)
        call.tensors = tensors
        # Aliases share the storage: the next wrapper frees and restores it in place.
        call.outputs = tuple(o.detach() for o in outputs)
        call.passes_left = call.wrapper.num_bwd_passes
        ctx.call = call
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: _Call = ctx.call
        name = type(call.module).__name__
        freed_inputs = call.freed or {}
        for freed in freed_inputs.values():
            freed.unmark()  # ordinary tensors again, for the checks and the restore below
        if call.passes_left <= 0:
            raise RuntimeError(
                f"InvertibleModuleWrapper({name}): backward was run more times than "
                f"num_bwd_passes={call.wrapper.num_bwd_passes}; raise num_bwd_passes to the "
                "number of backward passes you run through this graph"
            )
        for i, o in enumerate(call.outputs):
            if o.numel() and o.untyped_storage().nbytes() == 0:
                raise RuntimeError(
                    f"InvertibleModuleWrapper({name}): output {i} is still freed; the wrapper "
                    "that consumed it has not run its backward (was its output discarded?)"
                )
        for i, freed in freed_inputs.items():
            if freed.mutated:
                raise RuntimeError(
                    f"InvertibleModuleWrapper({name}): input {i} was modified in place after "
                    f"the wrapper freed it, so it cannot be restored; pass {call.keep_flag}=True "
                    "if you need to use or modify the input after the call"
                )
        call.passes_left -= 1

        needs = ctx.needs_input_grad[1:]
        grad_outputs = tuple(
            g if g.dtype == o.dtype else g.to(o.dtype) for g, o in zip(grad_outputs, call.outputs)
        )
        buffers = BufferSnapshot(call.modules)
        try:
            replaying = contextlib.nullcontext() if call.tape is None else call.tape.replaying()
            with AutocastState.restored(call.autocast), replaying:
                reconstructed, grads = _recompute_and_differentiate(call, grad_outputs, needs)
        finally:
            buffers.restore()

        with torch.no_grad():
            for i, freed in freed_inputs.items():
                freed.restore(reconstructed[i])
        # Checked after restoring, so that a failing input can be inspected.
        label = module_name(call.debug, call.wrapper, call.module)
        if call.debug is not None:
            originals = call.originals or {}
            for i, freed in freed_inputs.items():
                check_reconstruction(label, i, freed.tensor, call.outputs, originals[i], call.debug)
        elif finite_check_enabled() and not _reconstruction_keeps_finite(call.module):
            restored = {i: freed.tensor for i, freed in freed_inputs.items()}
            check_finite_when_backward_ends(label, restored, call.outputs)
        if call.passes_left == 0:
            # Drop references so the memory goes when the graph does.
            call.tensors = call.outputs = ()
            call.modules = []
            call.freed = call.originals = call.tape = None
        return (None, *grads)


def _recompute_and_differentiate(
    call: _Call, grad_outputs: Tensors, needs: tuple[bool, ...]
) -> tuple[Tensors, tuple[torch.Tensor | None, ...]]:
    params = call.params
    fused = call.fused
    if call.freed and fused is not None:
        accepts = _keyword_parameters(getattr(fused, "__func__", fused))
        options: dict[str, Any] = {}
        if "out" in accepts:
            # Reconstruct straight into the freed inputs' own memory: the coupling
            # engine takes each when it first writes it (after the sub-module whose
            # output it needs has run its backward), others at once.
            takers: dict[int, Any] = {i: freed.reallocate for i, freed in call.freed.items()}
            if not _takes_memory_when_written(fused):
                takers = {i: take() for i, take in takers.items()}
            options["out"] = tuple(takers.get(i) for i in range(call.num_inputs))
        if "inputs_need_grad" in accepts:
            options["inputs_need_grad"] = needs[: call.num_inputs]
        inputs, grad_inputs, grad_params = fused(call.outputs, grad_outputs, params, **options)
        grads = tuple(
            None if not need or g is None else g if g.dtype == x.dtype else g.to(x.dtype)
            for g, x, need in zip(grad_inputs, call.inputs, needs)
        )
        return inputs, grads + tuple(grad_params)

    if call.freed:
        with torch.no_grad():
            inputs = _as_tuple(call.undo(*call.outputs), "reconstructed input")
        if call.tape is not None:
            call.tape.reset_to_initial()
    else:
        inputs = call.inputs
    leaves = tuple(
        x.detach().requires_grad_(need) for x, need in zip(inputs, needs[: call.num_inputs])
    )
    with torch.enable_grad():
        outputs = _as_tuple(call.run(*leaves), "recomputed output")
    wanted = [leaf for leaf in leaves if leaf.requires_grad] + list(params)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    found: tuple[torch.Tensor | None, ...] = ()
    if pairs and wanted:
        found = torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
        )
    found_iter = iter(found) if found else iter([None] * len(wanted))
    grad_inputs = tuple(next(found_iter) if leaf.requires_grad else None for leaf in leaves)
    return tuple(leaf.detach() for leaf in leaves), grad_inputs + tuple(found_iter)


def _reconstruction_keeps_finite(module: nn.Module) -> bool:
    """Whether ``module`` says its reconstructions of finite outputs are finite by
    construction (``reconstruction_keeps_finite()``, as couplings of additive steps
    do), so that the NaN/Inf check may skip them."""
    says = getattr(module, "reconstruction_keeps_finite", None)
    return callable(says) and says() is True


@functools.lru_cache(maxsize=256)
def _keyword_parameters(function: Callable[..., Any]) -> frozenset[str]:
    """The parameter names of a module's ``inverse_and_vjp``: whether it takes
    ``out=`` (the buffers to write the reconstructed inputs into) and
    ``inputs_need_grad=`` (the coupling engine's does; others may not)."""
    return frozenset(inspect.signature(function).parameters)


def _takes_memory_when_written(fused: FusedBackward) -> bool:
    """Whether ``fused`` is the coupling engine's own ``inverse_and_vjp``, which takes
    ``out=`` entries that are callables, called when first written."""
    return getattr(fused, "__func__", None) is CouplingBase.inverse_and_vjp


# The invertnet and torch package folders.
_LIBRARY_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside the
    invertnet and torch packages (the user's call), however deep the call chain
    through ``nn.Module.__call__`` and ``autograd.Function.apply`` is."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class InvertibleModuleWrapper(nn.Module):
    """Run an invertible module without keeping its input for backward.

    In training, the forward pass frees the input's memory; backward reconstructs
    the input from the output with the module's inverse and restores it. A chain of
    wrapped blocks therefore keeps activation memory for about one block, whatever
    its depth.

    For couplings (:class:`~invertnet.AdditiveCoupling`,
    :class:`~invertnet.AffineCoupling`, :class:`~invertnet.MomentumCoupling`) the
    reconstruction and the backward pass are fused: each sub-module is evaluated
    once, so a training step costs one extra forward, as with
    :func:`torch.utils.checkpoint.checkpoint`. Other modules are inverted and then
    run forward again.

    Parameters
    ----------
    fn : torch.nn.Module
        An invertible module: ``forward(*x)`` and ``inverse(*y)`` with
        ``inverse(forward(x)) == x`` up to rounding, deterministic given its
        parameters (and the RNG state, see ``preserve_rng_state``).
    keep_input : bool
        Keep the input of :meth:`forward` instead of freeing it. Required when the
        input is used again after the call, for example in a residual skip
        ``x + wrapper(x)``.
    keep_input_inverse : bool
        The same for the input of :meth:`inverse`.
    num_bwd_passes : int
        How many backward passes may run through one forward call (for
        ``retain_graph=True``); one more raises :class:`RuntimeError`.
    disable : bool
        Run ``fn`` directly with plain autograd (no memory saving).
    preserve_rng_state : bool
        Record the random-number state before each sub-module call and replay it
        in backward, so that dropout is reproduced exactly.

    Notes
    -----
    Inputs are freed only when that is safe and useful: in training mode
    (``wrapper.training``) with grad enabled, and when no other tensor holds the
    input's storage. A kept input is reported by an
    :class:`~invertnet.InputKeptWarning` once per wrapper. A freed input has a
    zero-element shape until backward restores it; do not read it in between.

    In eval mode (``wrapper.eval()``), under :func:`torch.no_grad`,
    :func:`torch.inference_mode`, or when neither the inputs nor the parameters
    require grad, the module runs directly with plain autograd and nothing is
    freed: gradients taken in eval mode are exact but keep the activations. To
    save memory while, say, BatchNorm layers stay frozen in eval mode, set
    ``wrapper.training = True`` on the wrappers alone after ``model.eval()``.

    Examples
    --------
    >>> import torch
    >>> from invertnet import AdditiveCoupling, InvertibleModuleWrapper
    >>> block = InvertibleModuleWrapper(AdditiveCoupling(torch.nn.Linear(4, 4)))
    >>> x = torch.randn(3, 8, requires_grad=True)
    >>> y = block(x)
    >>> x.shape  # freed until backward
    torch.Size([0])
    >>> y.sum().backward()
    >>> x.shape
    torch.Size([3, 8])
    """

    def __init__(
        self,
        fn: nn.Module,
        keep_input: bool = False,
        keep_input_inverse: bool = False,
        num_bwd_passes: int = 1,
        disable: bool = False,
        preserve_rng_state: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(fn, nn.Module):
            raise TypeError(
                f"InvertibleModuleWrapper expects an nn.Module, got {type(fn).__name__}"
            )
        if not callable(getattr(fn, "inverse", None)):
            raise TypeError(
                f"InvertibleModuleWrapper: {type(fn).__name__} has no inverse method; wrap a "
                "module that defines both forward(*x) and inverse(*y)"
            )
        if (
            isinstance(num_bwd_passes, bool)
            or not isinstance(num_bwd_passes, int)
            or num_bwd_passes < 1
        ):
            raise ValueError(f"num_bwd_passes must be an int >= 1, got {num_bwd_passes!r}")
        self._fn = fn
        self.keep_input = keep_input
        self.keep_input_inverse = keep_input_inverse
        self.num_bwd_passes = num_bwd_passes
        self.disable = disable
        self.preserve_rng_state = preserve_rng_state
        self._warned_kept = False

    @property
    def module(self) -> nn.Module:
        """The wrapped invertible module."""
        return self._fn

    def _warn_kept(self, index: int, reason: str) -> None:
        if self._warned_kept:
            return
        self._warned_kept = True
        warnings.warn(
            f"InvertibleModuleWrapper({type(self._fn).__name__}): input {index} is kept in "
            f"memory instead of freed because {reason}; results are unaffected, only the "
            "memory saving is lost (this warning is shown once per wrapper)",
            InputKeptWarning,
            stacklevel=_caller_stacklevel(),
        )

    def _recording(self) -> bool:
        """Whether this call saves memory: enabled, in training mode, grad mode on,
        not inference."""
        # In eval mode the module runs directly: inference (and torch.export) needs
        # none of the memory machinery, and the docstring promises freeing "in
        # training" only.
        if self.disable or not self.training or not torch.is_grad_enabled():
            return False
        # Inference mode turns grad mode off unless grad is re-enabled inside it.
        # Dynamo cannot trace this query (a graph break on every call), so it is
        # skipped while compiling, where that combination is not supported anyway.
        return torch.compiler.is_compiling() or not torch.is_inference_mode_enabled()

    def _run(self, xs: tuple[Any, ...], direction: str) -> Output:
        fn = self._fn
        if not xs:
            raise ValueError(f"InvertibleModuleWrapper.{direction} needs at least one input tensor")
        inputs = _as_tuple(xs, f"InvertibleModuleWrapper.{direction}: input")
        # One walk over the modules serves the decision, the Function and backward.
        recording = self._recording()
        modules = submodules(fn) if recording else []
        params = trainable_parameters(modules)
        if not (recording and (params or any(t.requires_grad for t in inputs))):
            y = fn(*inputs) if direction == "forward" else fn.inverse(*inputs)
        else:
            forward = direction == "forward"
            call = _Call(
                wrapper=self,
                module=fn,
                forward_direction=forward,
                keep_input=self.keep_input if forward else self.keep_input_inverse,
                num_inputs=len(inputs),
                modules=modules,
            )
            y = _InvertibleFunction.apply(call, *inputs, *params)
        if isinstance(y, (tuple, list)) and len(y) == 1:
            return y[0]
        return y

    def forward(self, *xin: torch.Tensor) -> Output:
        """Apply the wrapped module, freeing the inputs unless ``keep_input``.

        Parameters
        ----------
        *xin : torch.Tensor
            The module's inputs.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            One output bare, several as a tuple.
        """
        return self._run(xin, "forward")

    def inverse(self, *yin: torch.Tensor) -> Output:
        """Apply the wrapped module's inverse, freeing the inputs unless ``keep_input_inverse``.

        Parameters
        ----------
        *yin : torch.Tensor
            The module's outputs.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            The reconstructed inputs, one bare, several as a tuple.
        """
        return self._run(yin, "inverse")
