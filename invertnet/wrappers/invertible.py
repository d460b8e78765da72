"""InvertibleModuleWrapper: trade compute for memory with any invertible module."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from invertnet._runtime.contract import (
    FUSED_PARAMETERS,
    INVERTIBLE_METHODS,
    as_tensors,
    block_traits,
    missing_methods,
)
from invertnet._runtime.first_order import first_order
from invertnet._runtime.forward_state import (
    AutocastState,
    ForwardState,
    keep_awaiting_buffer_values,
    same_objects,
    submodules,
    submodules_and_trainable_parameters,
)
from invertnet._runtime.graph import unowned_leaves
from invertnet._runtime.rng import RNGTape, calls_never_draw
from invertnet._runtime.torch_private import (
    ModuleHooks,
    forward_ad_active,
    functorch_transforms_active,
    is_output_of,
    module_hooks,
    version,
)
from invertnet.wrappers._finite import check_finite_when_backward_ends
from invertnet.wrappers._sharding import refuse_sharded_submodules
from invertnet.wrappers._storage import (
    FREED_ATTR,
    FreedInput,
    InputKeptWarning,
    free,
    hide,
    may_free_memory,
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


def _kwarg_tensors(kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The tensors among keyword arguments, also inside lists, tuples and dicts, each
    with the keyword it came by."""
    found: list[tuple[str, torch.Tensor]] = []
    for name, value in kwargs.items():
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                found.append((name, item))
            elif isinstance(item, (list, tuple)):
                stack.extend(reversed(item))
            elif isinstance(item, dict):
                stack.extend(reversed(list(item.values())))
    return found


def _refuse_grad_kwargs(layer: str, kwargs: dict[str, Any]) -> None:
    """Raise, before anything is freed, for a keyword argument that requires grad.

    Keywords are context (a mask, say) that the wrapper hands through unchanged;
    it differentiates only the positional inputs and the parameters, so a tensor
    passed by keyword would silently get no gradient.
    """
    for name, t in _kwarg_tensors(kwargs):
        if t.requires_grad:
            raise ValueError(
                f"{layer}: keyword argument {name!r} is a tensor that requires grad, "
                "but keyword arguments are context the wrapper passes through and "
                "gets no gradient for. Pass it positionally (as an input of the "
                "invertible module), or detach it"
            )


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
    # The wrapped module and those under it.
    modules: list[nn.Module]
    # The call's keyword arguments (an attention mask, say): context, not inputs.
    # The recomputation in backward gets these very objects; none is freed.
    kwargs: dict[str, Any]
    # Filled in by the forward pass: the inputs then the parameters, as passed.
    tensors: Tensors = ()
    outputs: Tensors = ()
    # The version counters of the outputs and of the kept inputs after the forward
    # pass, which backward checks as autograd checks what it saved.
    versions: tuple[int, ...] = ()
    # The version counters of the tensors among ``kwargs`` (empty without any).
    kwarg_versions: tuple[int, ...] = ()
    freed: dict[int, FreedInput] | None = None
    # What the forward pass ran under (RNG, autocast, flags, parameters, buffers).
    state: ForwardState | None = None
    # The wrapped module's own call hooks (forward direction), if it has any.
    hooks: ModuleHooks | None = None
    passes_left: int = 0
    # Whether no module the call runs can draw random numbers (calls_never_draw):
    # the random state is then recorded around the whole call, not before each
    # sub-module call.
    never_draws: bool = False
    # Debug mode (invertnet.debug_reconstruction): copies of the freed inputs, and
    # the tensors the modules held as plain attributes before the forward pass.
    debug: DebugSettings | None = None
    originals: dict[int, torch.Tensor] | None = None
    attributes: dict[tuple[int, str], int] | None = None

    @property
    def direction(self) -> str:
        return "forward" if self.forward_direction else "inverse"

    @property
    def keep_flag(self) -> str:
        return "keep_input" if self.forward_direction else "keep_input_inverse"

    @property
    def layer(self) -> str:
        return _layer_name(type(self.module))

    @property
    def run(self) -> Callable[..., Any]:
        return self.module.forward if self.forward_direction else self.module.inverse

    @property
    def undo(self) -> Callable[..., Any]:
        return self.module.inverse if self.forward_direction else self.module.forward

    @property
    def fused(self) -> FusedBackward | None:
        """The module's fused inverse-and-backward pass (the block contract's
        ``inverse_and_vjp``), for the forward direction."""
        if not self.forward_direction or not block_traits(type(self.module)).fused:
            return None
        return self.module.inverse_and_vjp

    @property
    def inputs(self) -> Tensors:
        return self.tensors[: self.num_inputs]

    @property
    def params(self) -> Tensors:
        return self.tensors[self.num_inputs :]


@functools.lru_cache(maxsize=256)
def _layer_name(module_type: type) -> str:
    """How errors and records name a wrapper of ``module_type`` (formatted once)."""
    return f"InvertibleModuleWrapper({module_type.__name__})"


#: What an input is called in the error for a non-tensor, by direction (constant:
#: a message formatted on every call would cost more than the check).
_INPUT = {
    "forward": "InvertibleModuleWrapper.forward: input",
    "inverse": "InvertibleModuleWrapper.inverse: input",
}


@torch.compiler.disable
def _prepare(call: _Call, inputs: Tensors) -> tuple[int, ...]:
    """Check the inputs and record what backward must replay (RNG, autocast, debug);
    return the inputs' version counters."""
    for i, x in enumerate(inputs):
        owner = getattr(x, FREED_ATTR, None)
        if owner is not None:
            raise RuntimeError(
                f"{type(call.module).__name__}.{call.direction}: input {i} was freed by "
                f"an earlier {owner} with keep_input=False and is used again here; pass "
                "keep_input=True (keep_input_inverse=True for inverse) to that wrapper"
            )
    call.debug = current_settings()
    if call.debug is not None:
        call.attributes = _tensor_attributes(call.modules)
    # The random state is always taped: with preserve_rng_state=True to be replayed,
    # and otherwise to find out whether the module drew random numbers, which its
    # recomputation would then not reproduce. Where no module can draw, only the
    # state around the whole call is kept, to check that (debug mode keeps all).
    call.never_draws = call.debug is None and calls_never_draw(call.modules)
    call.state = ForwardState(
        call.layer, call.modules, RNGTape(inputs), AutocastState.capture(inputs)
    )
    if call.kwargs:
        call.kwarg_versions = tuple(t._version for _, t in _kwarg_tensors(call.kwargs))
    return tuple(x._version for x in inputs)


@torch.compiler.disable
def _finish_forward(
    call: _Call, tensors: Tensors, outputs: Tensors, before: tuple[int, ...]
) -> None:
    """Check what the forward pass did, seal its record and free the inputs."""
    inputs = tensors[: call.num_inputs]
    refuse_written_inputs(call.layer, call.direction, inputs, before)
    _check_rng_replayable(call)
    state = call.state
    assert state is not None
    state.seal(previous=call.wrapper._last_state)
    if call.attributes is not None:
        _warn_of_side_outputs(call, call.attributes)
        call.attributes = None
    # Aliases share the storage: the next wrapper frees and restores it in place.
    call.outputs = tuple(o.detach() for o in outputs)
    # Read before freeing, which changes no version but makes reading one slower.
    call.versions = tuple(t._version for t in (*call.outputs, *inputs))
    if not call.keep_input:
        _free_inputs(call, inputs, outputs)
    call.tensors = tensors
    call.passes_left = call.wrapper.num_bwd_passes
    call.wrapper._last_state = state


def _free_inputs(call: _Call, inputs: Tensors, outputs: Tensors) -> None:
    """Free the inputs that nothing else holds; warn (once) about the others.

    Activations (inputs with a ``grad_fn``) are freed and rebuilt in backward; data
    the caller made (the batch) is hidden and handed back bit for bit
    (:func:`~invertnet.wrappers._storage.may_free_memory`).
    """
    wrapper = call.wrapper
    # A tensor passed twice is kept at every position: checking it only from
    # its second occurrence on would see it already freed by the first.
    ids = [id(x) for x in inputs]
    for i, x in enumerate(inputs):
        own_alias = is_output_of(x, _InvertibleFunction)
        if ids.count(id(x)) > 1:
            reason: str | None = "it is passed more than once"
        else:
            base_own_alias = x._base is not None and is_output_of(x._base, _InvertibleFunction)
            reason = why_not_freeable(x, outputs, own_alias, base_own_alias)
        if reason is None:
            rebuilt = may_free_memory(x)
            if call.debug is not None and rebuilt:
                if call.originals is None:
                    call.originals = {}
                call.originals[i] = x.detach().clone()
            if call.freed is None:
                call.freed = {}
            call.freed[i] = (free if rebuilt else hide)(x, call.layer, call.keep_flag)
        else:
            wrapper._warn_kept(i, reason)


def _tensor_attributes(modules: list[nn.Module]) -> dict[tuple[int, str], int]:
    """The tensors ``modules`` hold as plain attributes (not parameters or buffers),
    by module position and name, as their ids."""
    return {
        (i, name): id(value)
        for i, module in enumerate(modules)
        for name, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    }


def _warn_of_side_outputs(call: _Call, before: dict[tuple[int, str], int]) -> None:
    """Debug mode: name the tensors a module stored on itself in the forward pass.

    Under the wrapper the forward pass runs without a graph, so such a side output
    (an auxiliary loss, attention weights) carries none: a loss built from it gives
    the module's parameters no gradient. The wrapper cannot see every side output
    (a list outside the module), so this is a debug check, not a guard.
    """
    names = {id(m): name for name, m in call.module.named_modules(remove_duplicate=False)}
    for (i, attribute), ident in _tensor_attributes(call.modules).items():
        if before.get((i, attribute)) == ident:
            continue
        where = names.get(id(call.modules[i]), "")
        warnings.warn(
            f"{call.layer}: the forward pass stored a tensor on the module, "
            f"{'.'.join(filter(None, (where, attribute)))!r}; under the wrapper it is "
            "computed without a graph, so a loss built from it gives no gradient. "
            "Return it from forward instead, or pass disable=True to this wrapper",
            stacklevel=_caller_stacklevel(),
        )


def _call_module(call: _Call, inputs: Tensors) -> Tensors:
    """Run the module in the call's direction, with its own call hooks if it has any."""
    hooks = call.hooks
    if hooks is None:
        return as_tensors(
            call.run(*inputs, **call.kwargs), lambda: f"output of {type(call.module).__name__}"
        )
    return as_tensors(_forward_with_hooks(call, hooks, inputs), lambda: f"output of {call.layer}")


def _forward_with_hooks(call: _Call, hooks: ModuleHooks, inputs: Tensors) -> Any:
    """``module(*inputs)``: its forward between its forward pre-hooks and hooks.

    The wrapper calls the module's ``forward`` itself, so it runs the hooks that
    ``module(*inputs)`` would have run, once, in the forward pass (their backward
    counterparts run in backward, with the gradients plain autograd would give
    them). A hook that replaces the inputs or the output is refused: the inverse
    and the recomputation in backward could not see what it did.
    """
    module = call.module
    kwargs = call.kwargs
    for hook, with_kwargs in hooks.forward_pre:
        result = hook(module, inputs, kwargs) if with_kwargs else hook(module, inputs)
        if result is not None and _pre_hook_changed(result, inputs, kwargs, with_kwargs):
            raise RuntimeError(
                f"{call.layer}: a forward pre-hook on the wrapped module returned new "
                "inputs; the wrapper cannot invert or recompute what a hook changes. "
                "Register the hook on the wrapper instead "
                "(wrapper.register_forward_pre_hook), which runs it before the block"
            )
    output = module.forward(*inputs, **kwargs)
    for hook, with_kwargs in hooks.forward:
        result = (
            hook(module, inputs, kwargs, output) if with_kwargs else hook(module, inputs, output)
        )
        if result is not None and not _same_tensors(result, output):
            raise RuntimeError(
                f"{call.layer}: a forward hook on the wrapped module returned a new "
                "output; the wrapper cannot invert or recompute what a hook changes. "
                "Register the hook on the wrapper instead "
                "(wrapper.register_forward_hook), which runs it after the block"
            )
    return output


def _pre_hook_changed(
    result: Any, inputs: Tensors, kwargs: dict[str, Any], with_kwargs: bool
) -> bool:
    """Whether a forward pre-hook's non-``None`` result replaces what it was given:
    the inputs, or (registered ``with_kwargs=True``) an ``(args, kwargs)`` pair."""
    if not with_kwargs:
        return not _same_tensors(result, inputs)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        return True
    args, new_kwargs = result
    return not (
        _same_tensors(args, inputs)
        and list(new_kwargs) == list(kwargs)
        and same_objects(tuple(new_kwargs.values()), tuple(kwargs.values()))
    )


def _same_tensors(a: Any, b: Any) -> bool:
    """Whether a hook's result is what it was given (one tensor or a sequence)."""
    return same_objects(
        a if isinstance(a, (tuple, list)) else (a,), b if isinstance(b, (tuple, list)) else (b,)
    )


@torch.compiler.disable
def _run_eagerly(call: _Call, inputs: Tensors) -> Tensors:
    """Run the module uncompiled, as backward will (preserve_rng_state=True).

    Backward replays the random state recorded here into an eager recomputation;
    a compiled forward draws its random numbers differently (Inductor's own
    generator), so dropout masks would not match and gradients would be wrong.
    """
    state = call.state
    assert state is not None
    if call.never_draws:
        return _call_module(call, inputs)
    with state.recording():
        return _call_module(call, inputs)


def refuse_written_inputs(
    layer: str, direction: str, inputs: Tensors, before: tuple[int, ...]
) -> None:
    """Raise if a block's ``direction`` call (``"forward"`` or ``"inverse"``) wrote
    over one of its ``inputs`` in place: their version counters differ from
    ``before``, read just before the call."""
    for i, (x, seen) in enumerate(zip(inputs, before)):
        if x._version != seen:
            raise RuntimeError(
                f"{layer}.{direction} wrote over its input {i} in place (an "
                "in-place operation such as nn.ReLU(inplace=True) or x.mul_() applied to "
                "the input, or to a view of it); the recomputation in backward needs the "
                "input as it was passed. Make that operation out of place "
                "(inplace=False, x = x * 2)"
            )


def _check_rng_replayable(call: _Call) -> None:
    """Drop the random state where the module drew nothing; refuse a module that
    drew random numbers while ``preserve_rng_state=False``.

    A module that draws under its own :func:`torch.random.fork_rng` without seeding
    leaves the generators unmoved although it depends on their state: the layer
    cannot see that (the docs say so), and debug mode finds it.
    """
    state = call.state
    assert state is not None and state.tape is not None
    if not state.tape.drawn_since_start():
        # Nothing to replay: the record keeps no states, backward restores none.
        state.tape = None
    elif call.never_draws:
        raise RuntimeError(
            f"{call.layer}: the random number generators moved during the forward "
            "pass, although every module it ran is of a kind that draws none "
            "(convolutions, linear layers, normalisations, activations, containers, "
            "couplings), so no state was recorded before each of them: a function "
            "they call was replaced by one that draws (a patched "
            "torch.nn.functional, say). The recomputation in "
            "backward could not draw the same numbers, and the gradients would be "
            "wrong. Draw them in a module of your own class, whose calls the wrapper "
            "then records one by one"
        )
    elif not call.wrapper.preserve_rng_state:
        raise RuntimeError(
            f"{call.layer}: the module drew random numbers (dropout, say) in its "
            "forward pass, but the wrapper was built with preserve_rng_state=False, so "
            "its recomputation in backward would draw different ones and give wrong "
            "gradients. Pass preserve_rng_state=True (the default)"
        )


class _InvertibleFunction(torch.autograd.Function):
    # torch.compile: Dynamo must not trace the storage bookkeeping (use counts,
    # storage resizing and set_ on graph inputs cannot be traced, and partial traces
    # of them are fragile), so this frame and the helpers above run eagerly; the
    # wrapped module's own forward, called from here, is still compiled.
    @staticmethod
    @torch.compiler.disable(recursive=False)
    def forward(ctx: Any, call: _Call, *tensors: torch.Tensor) -> Tensors:
        inputs = tensors[: call.num_inputs]
        before = _prepare(call, inputs)
        if call.wrapper.preserve_rng_state:
            outputs = _run_eagerly(call, inputs)
        else:
            # The tape only tells, afterwards, whether the module drew random numbers.
            outputs = _call_module(call, inputs)
        _finish_forward(call, tensors, outputs, before)
        ctx.call = call
        # An output the loss does not use gets None, not zeros: its parameters then
        # get None as under plain autograd, not zeros that Adam would still follow.
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    # A compiled training step (loss.backward() inside a torch.compile-d function)
    # runs backward from the compiled frame: Dynamo must not trace the bookkeeping
    # here, which reads freed tensors' metadata, any more than it does in forward.
    @torch.compiler.disable
    @first_order(lambda ctx: _double_backward_refused(ctx.call))
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _backward(ctx.call, ctx.needs_input_grad[1:], grad_outputs)


def _double_backward_refused(call: _Call) -> str:
    # backward(create_graph=True): differentiating the gradients would need the
    # recomputation's graph, which the wrapper does not keep.
    return (
        f"{call.layer}: differentiating its gradients (double backward, "
        "create_graph=True, as in a gradient penalty) is not supported, since the "
        "wrapper does not keep the graph of its recomputation. Use disable=True on this "
        "wrapper for higher-order gradients"
    )


def _refuse_unsupported(call: _Call) -> None:
    """Raise, before anything runs, for the autograd features the wrapper cannot serve."""
    if functorch_transforms_active():
        raise RuntimeError(
            f"{call.layer}: torch.func transforms (grad, vjp, jvp, vmap, jacrev...) "
            "cannot run through a wrapper that frees its inputs. Call the model with "
            "torch.func.functional_call and differentiate with torch.autograd.grad or "
            "backward(), which the wrapper supports, or pass disable=True"
        )
    if forward_ad_active():
        raise RuntimeError(
            f"{call.layer}: forward-mode AD (torch.autograd.forward_ad, dual tensors) "
            "is not supported by the wrapper, which implements reverse mode only. "
            "Pass disable=True to run the module with plain autograd"
        )
    hooks = call.hooks
    if hooks is not None and hooks.old_style_backward:
        raise RuntimeError(
            f"{call.layer}: the wrapped module has a backward hook registered with the "
            "deprecated register_backward_hook, whose gradients PyTorch itself gets "
            "wrong for modules of several operations. Use register_full_backward_hook"
        )
    refuse_sharded_submodules(call.layer, call.modules)


def _check_before_backward(call: _Call) -> None:
    """Raise, before anything is touched, where backward cannot give plain autograd's
    result: every check here reads host metadata only."""
    if call.passes_left <= 0:
        raise RuntimeError(
            f"{call.layer}: backward was run more times than "
            f"num_bwd_passes={call.wrapper.num_bwd_passes}; raise num_bwd_passes to the "
            "number of backward passes you run through this graph"
        )
    for i, o in enumerate(call.outputs):
        if o.numel() and o.untyped_storage().nbytes() == 0:
            raise RuntimeError(
                f"{call.layer}: output {i} is still freed; the wrapper "
                "that consumed it has not run its backward (was its output discarded?)"
            )
    freed_inputs = call.freed or {}
    for i, freed in freed_inputs.items():
        if freed.mutated:
            raise RuntimeError(
                f"{call.layer}: input {i} was modified in place after "
                f"the wrapper freed it, so it cannot be restored; pass {call.keep_flag}=True "
                "if you need to use or modify the input after the call"
            )
    num_outputs = len(call.outputs)
    for i, (t, seen) in enumerate(zip((*call.outputs, *call.inputs), call.versions)):
        if i >= num_outputs and i - num_outputs in freed_inputs:
            continue
        if version(t) != seen:
            what = f"output {i}" if i < num_outputs else f"input {i - num_outputs}"
            raise RuntimeError(
                f"{call.layer}: its {what} was modified in place between the forward "
                f"pass and backward (version {seen} then, {version(t)} now). Backward "
                f"needs it as the forward pass {'returned' if i < num_outputs else 'saw'} "
                "it, to rebuild the input and recompute the block; plain autograd "
                "refuses a change to a tensor it saved too. Use an out-of-place "
                "operation (y = y.relu() rather than y.relu_()), or clone the tensor "
                "before changing it"
            )
    if call.kwarg_versions:
        _check_kwargs_unwritten(call)
    assert call.state is not None
    call.state.check()


def _check_kwargs_unwritten(call: _Call) -> None:
    """Raise if a tensor passed by keyword was written in place since the forward
    pass: the recomputation in backward reads it again and would see other values."""
    for (name, t), seen in zip(_kwarg_tensors(call.kwargs), call.kwarg_versions):
        if t._version != seen:
            raise RuntimeError(
                f"{call.layer}: the tensor passed as keyword argument {name!r} was "
                "modified in place between the forward pass and backward (version "
                f"{seen} then, {t._version} now); the recomputation in backward needs it "
                "as the forward pass saw it. Clone it before changing it"
            )


def _backward(
    call: _Call, needs: tuple[bool, ...], grad_outputs: tuple[torch.Tensor | None, ...]
) -> tuple[torch.Tensor | None, ...]:
    freed_inputs = call.freed or {}
    # Hidden inputs (the caller's own data) are handed back first, exactly, also
    # where a check below raises: the recomputation uses them as they are, as it
    # does a kept input.
    for freed in freed_inputs.values():
        if freed.hidden is not None:
            freed.restore(freed.tensor)
    _check_before_backward(call)
    for freed in freed_inputs.values():
        freed.unmark()  # ordinary tensors again, for the restore below
    rebuilt = {i: f for i, f in freed_inputs.items() if f.hidden is None}
    call.passes_left -= 1

    grad_outputs = tuple(
        g if g is None or g.dtype == o.dtype else g.to(o.dtype)
        for g, o in zip(grad_outputs, call.outputs)
    )
    hooks = call.hooks
    if hooks is not None:
        grad_outputs = _run_backward_pre_hooks(call, hooks, grad_outputs)
    state = call.state
    assert state is not None
    finite_check = (
        bool(rebuilt) and finite_check_enabled() and not reconstruction_keeps_finite(call.module)
    )
    # Where nothing after this pass reads the outputs (the last backward pass, no
    # debug or finite check of the rebuilt inputs), the fused backward takes them
    # over: a chain of blocks lets go of its output once its last block has run its
    # backward, rather than hold it through all the others'.
    hand_over = call.passes_left == 0 and call.debug is None and not finite_check
    # Checked by _check_before_backward just now, unless a hook has run since.
    with state.replayed(checked=hooks is None):
        reconstructed, grads = _recompute_and_differentiate(
            call, grad_outputs, needs, rebuilt, hand_over
        )

    for i, freed in rebuilt.items():
        freed.restore(reconstructed[i])
    # Checked after restoring, so that a failing input can be inspected.
    if call.debug is not None:
        label = module_name(call.debug, call.wrapper, call.module)
        originals = call.originals or {}
        for i, freed in rebuilt.items():
            check_reconstruction(label, i, freed.tensor, call.outputs, originals[i], call.debug)
        _check_no_unowned_tensors(call, state)
    elif finite_check:
        restored = {i: freed.tensor for i, freed in rebuilt.items()}
        label = module_name(None, call.wrapper, call.module)
        check_finite_when_backward_ends(label, restored, call.outputs)
    if hooks is not None:
        grads = _run_backward_hooks(call, hooks, grads, grad_outputs)
    if call.passes_left == 0:
        # Drop references so the memory goes when the graph does.
        state.awaiting_backward = False
        call.tensors = call.outputs = ()
        call.modules = []
        call.kwargs = {}
        call.freed = call.originals = call.state = None
    else:
        # A later pass checks for writes made after this one.
        call.versions = tuple(version(t) for t in (*call.outputs, *call.inputs))
    return (None, *grads)


def _check_no_unowned_tensors(call: _Call, state: ForwardState) -> None:
    """Debug mode: raise if the module reaches tensors that require grad but that it
    does not hold (a weight of another module in a plain list or a closure).

    The wrapper gives gradients to its inputs and to the parameters of the wrapped
    modules, which it passes to autograd; it cannot know of others in forward,
    where no graph is recorded, so they would get none. Finding them takes one
    more forward pass with grad, which debug mode pays.
    """
    with state.replayed(), torch.enable_grad():
        leaves = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in call.inputs)
        outputs = as_tensors(call.run(*leaves, **call.kwargs), "recomputed output")
        found = unowned_leaves(outputs, (*leaves, *call.params))
    if found:
        shapes = ", ".join(str(tuple(t.shape)) for t in found)
        raise RuntimeError(
            f"{call.layer}: the module uses {len(found)} tensor(s) that require grad but "
            f"that it does not hold as parameters (shapes {shapes}): a weight of another "
            "module kept in a list or a closure, say. The wrapper gives gradients only to "
            "its inputs and to the wrapped modules' parameters, so these would get none. "
            "Register them on the module (as a parameter or a sub-module), or pass "
            "disable=True"
        )


def _run_backward_pre_hooks(call: _Call, hooks: ModuleHooks, grad_outputs: Tensors) -> Tensors:
    for hook, _ in hooks.backward_pre:
        result = hook(call.module, grad_outputs)
        if result is not None:
            grad_outputs = as_tensors(result, f"{call.layer}: gradient from a backward pre-hook")
    return grad_outputs


def _run_backward_hooks(
    call: _Call, hooks: ModuleHooks, grads: tuple[torch.Tensor | None, ...], grad_outputs: Tensors
) -> tuple[torch.Tensor | None, ...]:
    n = call.num_inputs
    grad_inputs = grads[:n]
    for hook, _ in hooks.backward:
        result = hook(call.module, grad_inputs, grad_outputs)
        if result is not None:
            result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
            if len(result) != n:
                raise RuntimeError(
                    f"{call.layer}: a full backward hook returned {len(result)} gradients "
                    f"for {n} inputs"
                )
            grad_inputs = result
    return (*grad_inputs, *grads[n:])


def _recompute_and_differentiate(
    call: _Call,
    grad_outputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    rebuilt: dict[int, FreedInput],
    hand_over: bool,
) -> tuple[Tensors, tuple[torch.Tensor | None, ...]]:
    params = call.params
    # A parameter frozen (requires_grad_(False)) since the forward pass gets no
    # gradient, as under plain autograd, which accumulates none into it.
    frozen_since = not all(p.requires_grad for p in params)
    if frozen_since:
        live = tuple(p for p in params if p.requires_grad)
        inputs, grads = _differentiate(call, grad_outputs, needs, rebuilt, live, hand_over)
        found = iter(grads[call.num_inputs :])
        expanded = tuple(next(found) if p.requires_grad else None for p in params)
        return inputs, grads[: call.num_inputs] + expanded
    return _differentiate(call, grad_outputs, needs, rebuilt, params, hand_over)


def _differentiate(
    call: _Call,
    grad_outputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    rebuilt: dict[int, FreedInput],
    params: Tensors,
    hand_over: bool = False,
) -> tuple[Tensors, tuple[torch.Tensor | None, ...]]:
    fused = call.fused
    # Hidden inputs take this path too, although they are back: a coupling's
    # forward under grad would have its inner wrappers free what it reads next.
    # An output that got no gradient (None) takes the general path, whose
    # autograd.grad leaves None where no used output reaches, as plain autograd does.
    # A context keyword named as one of the fused backward's own parameters cannot
    # be handed through it.
    if (
        (call.freed or block_traits(type(call.module)).fuses_kept_inputs)
        and fused is not None
        and all(g is not None for g in grad_outputs)
        and (not call.kwargs or FUSED_PARAMETERS.isdisjoint(call.kwargs))
    ):
        # The contract's options, each passed only where it differs from its default.
        options: dict[str, Any] = dict(call.kwargs) if call.kwargs else {}
        if rebuilt:
            # Reconstruct straight into the freed inputs' own memory: a block that
            # takes it deferred (the coupling engine) takes each when it first
            # writes it, after the sub-module whose output it needs has run its
            # backward; others get it at once.
            if block_traits(type(call.module)).deferred_out:
                takers: dict[int, Any] = {i: freed.reallocate for i, freed in rebuilt.items()}
            else:
                takers = {i: freed.reallocate() for i, freed in rebuilt.items()}
            options["out"] = tuple(takers.get(i) for i in range(call.num_inputs))
        need_inputs = needs[: call.num_inputs]
        if not all(need_inputs):
            options["inputs_need_grad"] = need_inputs
        outputs: Sequence[torch.Tensor] = call.outputs
        if hand_over and block_traits(type(call.module)).takes_outputs:
            # In a list of their own, which the block empties once done with them;
            # the call keeps none (see _backward).
            outputs, call.outputs = list(outputs), ()
        inputs, grad_inputs, grad_params = fused(outputs, grad_outputs, params, **options)
        grads = tuple(
            None if not need or g is None else g if g.dtype == x.dtype else g.to(x.dtype)
            for g, x, need in zip(grad_inputs, call.inputs, needs)
        )
        return inputs, grads + tuple(grad_params)

    state = call.state
    assert state is not None
    kwargs = call.kwargs
    if rebuilt:
        with torch.no_grad():
            inputs = as_tensors(call.undo(*call.outputs, **kwargs), "reconstructed input")
        if state.tape is not None:
            state.tape.reset_to_initial()
        inputs = tuple(inputs[i] if i in rebuilt else x for i, x in enumerate(call.inputs))
    else:
        inputs = call.inputs
    leaves = tuple(
        x.detach().requires_grad_(need) for x, need in zip(inputs, needs[: call.num_inputs])
    )
    with torch.enable_grad():
        outputs = as_tensors(call.run(*leaves, **kwargs), "recomputed output")
    wanted = [leaf for leaf in leaves if leaf.requires_grad] + list(params)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
    found: tuple[torch.Tensor | None, ...] = ()
    if pairs and wanted:
        found = torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
        )
    found_iter = iter(found) if found else iter([None] * len(wanted))
    grad_inputs = tuple(next(found_iter) if leaf.requires_grad else None for leaf in leaves)
    return tuple(leaf.detach() for leaf in leaves), grad_inputs + tuple(found_iter)


def reconstruction_keeps_finite(module: nn.Module) -> bool:
    """Whether ``module`` says its reconstructions of finite outputs are finite by
    construction (``reconstruction_keeps_finite()`` of the block contract, as
    couplings of additive steps do), so that the NaN/Inf check may skip them."""
    return (
        block_traits(type(module)).says_if_finite and module.reconstruction_keeps_finite() is True
    )


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
        in backward, so that dropout is reproduced exactly (the default; memcnn's
        was ``False``). With ``False``, a module that draws random numbers raises
        in its forward pass, since its recomputation would draw others; under
        :func:`torch.compile` the module is then compiled rather than run eagerly.

    Notes
    -----
    Inputs are freed only when that is safe and useful: in training mode
    (``wrapper.training``) with grad enabled, and when no other tensor holds the
    input's storage. A kept input is reported by an
    :class:`~invertnet.InputKeptWarning` once per wrapper. A freed input has a
    zero-element shape until backward restores it; do not read it in between.
    An input without a ``grad_fn`` (the batch) is not rebuilt but hidden: it looks
    freed until backward, which hands back its very bits (see
    :func:`~invertnet.allow_free`).

    Backward gives plain autograd's gradients or raises: what the recomputation
    depends on (random state, autocast, training flags, the parameters and buffers
    the modules held, with their versions) is recorded with the forward pass and
    replayed, and a parameter, output or kept input written in place before
    backward raises, as plain autograd does. Hooks registered on the wrapped
    module run once, as without the wrapper. See :doc:`/guide/guarantees`.

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
    >>> before = x.detach().clone()
    >>> y = block(x)
    >>> x.shape  # looks freed until backward
    torch.Size([0])
    >>> y.sum().backward()
    >>> x.shape, torch.equal(x.detach(), before)  # handed back bit for bit
    (torch.Size([3, 8]), True)
    """

    def __init__(
        self,
        fn: nn.Module,
        keep_input: bool = False,
        keep_input_inverse: bool = False,
        num_bwd_passes: int = 1,
        disable: bool = False,
        preserve_rng_state: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(fn, nn.Module):
            raise TypeError(
                f"InvertibleModuleWrapper expects an nn.Module, got {type(fn).__name__}"
            )
        if missing_methods(fn, INVERTIBLE_METHODS):  # the block contract's forward and inverse
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
        # The record of the last recorded call: while it awaits its backward, a new
        # call makes it keep its buffer values first (siamese use); and the next
        # record shares its module list and tensor tuple where they are the same.
        # (A record holds no activations: keeping one costs nothing.)
        self._last_state: ForwardState | None = None

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

    def _run(self, xs: tuple[Any, ...], direction: str, kwargs: dict[str, Any]) -> Output:
        # Straight from _modules: self._fn would go through nn.Module.__getattr__.
        fn = self._modules["_fn"]
        if not xs:
            raise ValueError(f"InvertibleModuleWrapper.{direction} needs at least one input tensor")
        inputs = as_tensors(xs, _INPUT[direction])
        last = self._last_state
        if last is not None and last.awaiting_backward and last.has_buffers:
            # Running the modules again before an earlier call's backward (a siamese
            # network) updates buffers in place: that call keeps its values first.
            # (Below, every layer's records of these modules do too.)
            last.keep_buffer_values()
        y = self._record(fn, inputs, direction, kwargs) if self._recording() else None
        if y is None:
            if self.training and not torch.compiler.is_compiling():
                # Unrecorded, in training mode (no_grad, disable=True): the modules
                # may still update their buffers, which other calls awaiting
                # backward then keep first, as _record does for recorded calls.
                # (Not while compiling, where it would break the graph: such a
                # write then raises in the waiting call's backward, naming it.)
                keep_awaiting_buffer_values(submodules(fn))
            y = fn(*inputs, **kwargs) if direction == "forward" else fn.inverse(*inputs, **kwargs)
        if isinstance(y, (tuple, list)) and len(y) == 1:
            return y[0]
        return y

    # torch.compile: the walk over the modules and the hand-over to the Function run
    # eagerly (Dynamo in PyTorch 2.4 traced the walk to no parameters at all, which
    # then got no gradient); the wrapped module's forward is still compiled.
    @torch.compiler.disable(recursive=False)
    def _record(
        self, fn: nn.Module, inputs: Tensors, direction: str, kwargs: dict[str, Any]
    ) -> Any:
        """Run ``fn`` through the memory-saving Function, or return ``None`` where
        nothing needs a gradient (then the caller runs it directly)."""
        # One walk over the modules serves the decision, the Function and backward.
        modules, params = self._submodules(fn)
        # Another layer's call awaiting backward may hold these modules too (one
        # block twice in a stack): it keeps its buffer values before they change.
        keep_awaiting_buffer_values(modules)
        if not (params or any(t.requires_grad for t in inputs)):
            return None
        forward = direction == "forward"
        call = _Call(
            wrapper=self,
            module=fn,
            forward_direction=forward,
            keep_input=self.keep_input if forward else self.keep_input_inverse,
            num_inputs=len(inputs),
            modules=modules,
            kwargs=kwargs,
            hooks=module_hooks(fn) if forward else None,
        )
        if kwargs:
            _refuse_grad_kwargs(call.layer, kwargs)
        _refuse_unsupported(call)
        return _InvertibleFunction.apply(call, *inputs, *params)

    # Eager, as the rest of the record: Dynamo in PyTorch 2.4 can neither trace the
    # cached trait lookup nor be trusted with the walk (see _record).
    @torch.compiler.disable
    def _submodules(self, fn: nn.Module) -> tuple[list[nn.Module], tuple[nn.Parameter, ...]]:
        """The wrapped module ``fn`` and those under it, the same list object as last
        time where they are the same modules (so that calls awaiting backward share
        it), and their parameters that require grad."""
        if block_traits(type(fn)).lists_own_modules:
            modules, params = fn.modules_and_trainable_parameters()
        else:
            modules, params = submodules_and_trainable_parameters(fn)
        last = self._last_state
        if last is not None and same_objects(last.modules, modules):
            return last.modules, params
        return modules, params

    def __getstate__(self) -> dict[str, Any]:
        # Pickling or copying between a forward pass and its backward: the copy has
        # no calls of its own awaiting backward (and weak references do not pickle).
        state = super().__getstate__()
        state = dict(state)
        state["_last_state"] = None
        return state

    def forward(self, *xin: torch.Tensor, **kwargs: Any) -> Output:
        """Apply the wrapped module, freeing the inputs unless ``keep_input``.

        Parameters
        ----------
        *xin : torch.Tensor
            The module's inputs.
        **kwargs
            Context for the module (an attention mask, say), passed unchanged to its
            ``forward`` and, in backward, the very same objects to the
            recomputation. They are never freed, and get no gradient: a tensor
            among them that requires grad raises :class:`ValueError`.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            One output bare, several as a tuple.
        """
        return self._run(xin, "forward", kwargs)

    def inverse(self, *yin: torch.Tensor, **kwargs: Any) -> Output:
        """Apply the wrapped module's inverse, freeing the inputs unless ``keep_input_inverse``.

        Parameters
        ----------
        *yin : torch.Tensor
            The module's outputs.
        **kwargs
            Context for the module's ``inverse``, as for :meth:`forward`.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            The reconstructed inputs, one bare, several as a tuple.
        """
        return self._run(yin, "inverse", kwargs)
