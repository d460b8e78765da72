"""``use_backprop=False``: train a MomentumNet without storing per-layer activations.

The forward pass runs the iteration in exact fixed point
(:mod:`invertnet.momentum.exact`) with autograd off, one autograd node per layer,
and saves only the final state and the bit store. Backward runs the iteration
backwards: the node of layer ``t`` restores ``x_t`` bit for bit, evaluates ``f_t``
once, with grad, on it, and uses that one evaluation both to undo the velocity
update and to back-propagate, the fused scheme of
:meth:`invertnet.CouplingBase.inverse_and_vjp`.

One node per layer, rather than one for the whole network, lets autograd
accumulate each layer's parameter gradients as soon as they are computed, as it
does for ordinary layers: one node would have to return every layer's gradients
at once, a transient the size of all the parameters. The nodes pass the state and
its gradients to each other through the :class:`_Run` they share; the tensors that
link them in the graph are empty and only order them.

Between the forward pass and backward the user's code runs, and may change what
the recomputation depends on. Each call of a function (and of ``init_function``)
is recorded in a :class:`~invertnet._runtime.forward_state.ForwardState` and
recomputed inside :meth:`~invertnet._runtime.forward_state.ForwardState.replayed`:
the random state (dropout), autocast, the training flags of the forward pass
(``model.eval()`` called before backward), the tensors the modules held then
(those :func:`torch.func.functional_call` swapped in for the call), and buffers
as the forward pass left them; a parameter written in place meanwhile
(``optimizer.step()``) raises, before any gradient is computed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from invertnet._runtime.first_order import first_order
from invertnet._runtime.forward_state import (
    AutocastState,
    ForwardState,
    submodules,
    trainable_parameters,
)
from invertnet._runtime.graph import unowned_leaves
from invertnet._runtime.rng import RNGTape, call_recorded
from invertnet._runtime.torch_private import (
    forward_ad_active,
    functorch_transforms_active,
    graph_kept,
)
from invertnet.momentum.arguments import (
    ArgumentRecord,
    Slot,
    grad_slots,
    slot_tensors,
    with_tensors,
)
from invertnet.momentum.exact import ExactMomentum
from invertnet.momentum.fixed_point import BitStore, FixedPoint, MomentumState, RangeCheck
from invertnet.momentum.gamma import Gamma

__all__ = ["Network", "before_plain_call", "run_without_activations"]


class Network(Protocol):
    """What the memory-saving pass needs of a :class:`~invertnet.MomentumNet`.

    Written out here so that this module, which ``net.py`` imports, imports
    nothing back from it.
    """

    _gamma: Gamma
    is_residual: bool

    @property
    def functions(self) -> nn.ModuleList: ...

    @property
    def init_function(self) -> nn.Module | None: ...

    def call_function(
        self, t: int, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor: ...

    def call_init(self, x: torch.Tensor) -> torch.Tensor: ...


#: The name of the layer in the errors of the forward-state record.
_LAYER = "MomentumNet(use_backprop=False)"

_DOUBLE_BACKWARD = (
    f"{_LAYER}: differentiating its gradients (double backward, after backward or "
    "torch.autograd.grad with create_graph=True) is not supported. Backward recomputes "
    "each layer from its reconstructed input and returns gradients that carry no graph "
    "of their own, so their derivatives would come out zero or wrong. Use "
    "use_backprop=True for higher-order derivatives (gradient penalties, Hessian-vector "
    "products, MAML without the first-order approximation)"
)


@dataclass(eq=False)
class _Step:
    """One call of a function (or of ``init_function``) in the forward pass."""

    # The record of what it ran under, replayed for its recomputation.
    state: ForwardState
    # Its trainable parameters when it ran (those functional_call swapped in, say),
    # inputs of its autograd node.
    params: tuple[torch.Tensor, ...]
    # Its modules that hold buffers (see _pending).
    with_buffers: tuple[torch.nn.Module, ...]
    # Whether it wrote over its input (nn.ReLU(inplace=True) first, x.mul_(...)).
    writes_input: bool = False

    def release(self) -> None:
        """Mark the step's backward as ended: its modules may run again freely."""
        self.state.awaiting_backward = False


# The last step to have run each module that holds buffers, by the module's id: a
# module run again before the backward of an earlier call (the same module at
# several layers, or a network called twice before one backward, as a siamese
# pair is) updates its running statistics in place, so that earlier step must
# first keep a copy of what its forward pass left (ForwardState.keep_buffer_values).
# By module rather than by buffer, for one entry per BatchNorm rather than three;
# the entries go with the steps, and an id cannot be reused while its step, which
# holds the module, lives.
_pending: weakref.WeakValueDictionary[int, ForwardState] = weakref.WeakValueDictionary()


def _keep_earlier_buffers(with_buffers: Iterable[torch.nn.Module]) -> None:
    """Before ``with_buffers`` run again: the calls that ran them last and await
    their backward keep copies of their buffers (see :data:`_pending`)."""
    for module in with_buffers:
        earlier = _pending.get(id(module))
        if earlier is not None and earlier.awaiting_backward:
            earlier.keep_buffer_values()


def before_plain_call(net: nn.Module) -> None:
    """Called before ``net`` runs its plain iteration in training mode.

    Without grad the functions run directly, and in training mode they update
    their running statistics: an earlier call of the memory-saving pass that
    awaits its backward must first keep copies of what its forward pass left,
    or its backward would find the buffers changed and raise. Costs one check
    of an empty dictionary when no call awaits its backward.
    """
    if _pending:
        _keep_earlier_buffers(m for m in submodules(net) if m._buffers)


def _prepare(name: str, module: torch.nn.Module, run: _Run) -> _Step:
    modules = submodules(module)
    state = ForwardState(f"{_LAYER} {name}", modules, run.tape, run.autocast)
    with_buffers = tuple(m for m in modules if m._buffers)
    return _Step(state, trainable_parameters(modules), with_buffers)


def _call_recorded(
    step: _Step, key: Any, x: torch.Tensor, fn: Callable[..., torch.Tensor], *args: Any
) -> Any:
    """Run ``fn(*args)``, the call of ``step`` on the input ``x``, and record it."""
    _keep_earlier_buffers(step.with_buffers)
    version = x._version
    with step.state.recording():
        y = call_recorded(key, fn, *args)
    # Host metadata only: the version counter says whether it wrote over x.
    step.writes_input = x._version != version
    step.state.seal()
    for module in step.with_buffers:
        _pending[id(module)] = step.state
    return y


@contextlib.contextmanager
def _recomputing(step: _Step, x: torch.Tensor) -> Iterator[tuple[torch.Tensor, tuple]]:
    """Recompute ``step`` in its forward pass's state, with grad.

    Yields the input to call the function on, and leaves standing for its
    trainable parameters, swapped for the call into every module that holds
    them. The input is a copy of ``x`` where the function writes over its input
    (``x`` is a leaf, which autograd will not let it write into).

    With leaves of its own for the parameters, the recomputation's backward
    gives gradients to nothing but them: a hook registered on a parameter runs
    once, when the node returns the parameter's gradient (not also inside the
    recomputation's backward), and for a tensor that
    :func:`torch.func.functional_call` computed from others (first-order MAML's
    fast weights) the recomputed graph stops at it, so that its gradient goes
    back through its history once, when the node returns it.
    """
    with step.state.replayed(), torch.enable_grad():
        swapped = []
        leaves = ()
        if step.params:
            by_id = {id(p): p.detach().requires_grad_(True) for p in step.params}
            for module in step.state.modules:
                tensors = module._parameters
                for name, p in tensors.items():
                    leaf = by_id.get(id(p))
                    if leaf is not None:
                        swapped.append((tensors, name, p))
                        tensors[name] = leaf  # type: ignore[assignment]
            leaves = tuple(by_id[id(p)] for p in step.params)
        try:
            yield (x.clone() if step.writes_input else x), leaves
        finally:
            for tensors, name, p in swapped:
                tensors[name] = p


@dataclass
class _Run:
    """What the nodes of one call share besides the tensors autograd tracks."""

    net: Network
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # Where the extra-argument tensors that require grad sit in args/kwargs.
    grad_slots: list[Slot]
    fixed: FixedPoint
    core: ExactMomentum
    # Shared by the steps' records: one tape and one autocast setting per call.
    tape: RNGTape
    autocast: tuple[AutocastState, ...]
    # Forward only: the magnitudes the steps reached, checked once at the end.
    checks: RangeCheck
    # The calls of init_function and of each function, for their recomputation;
    # None once the backward that used them has released them.
    init_step: _Step | None = None
    steps: list[_Step | None] = field(default_factory=list)
    # The state, and the layer whose input it holds; None once it is not needed.
    state: MomentumState | None = None
    layer: int = 0
    # Forward only: the next function's input (the start, then each step, makes it).
    inputs: torch.Tensor | None = None
    # Backward only, in float64 like the plain mode's state: the gradient with
    # respect to the position at `layer`, and the total one with respect to the
    # velocity there (through the position too); and the leaves standing for the
    # extra-argument tensors.
    grad_x: torch.Tensor | None = None
    grad_v_total: torch.Tensor | None = None
    arg_leaves: tuple[torch.Tensor, ...] = ()
    leaf_args: tuple[Any, ...] = ()
    leaf_kwargs: dict[str, Any] = field(default_factory=dict)
    # The state of args and kwargs at the start of the call, which every replay
    # must find again (see invertnet.momentum.arguments.ArgumentRecord).
    record: ArgumentRecord | None = None

    def check_steps(self) -> None:
        """Raise, before any layer is recomputed, if a step cannot be replayed.

        Each recomputation checks its own step again; checking all of them when
        backward reaches the network means that no gradient of its parameters is
        accumulated by a backward that then fails (plain autograd would raise at
        the first layer whose weights changed, after the layers above it).
        """
        for step in (self.init_step, *self.steps):
            if step is not None:
                step.state.check()

    def state_at(self, layer: int) -> MomentumState:
        """The state, checked to hold the input of ``layer`` (backward order).

        ``layer`` is that of the node asking, or 0 for the one that converted the
        input (and ran ``init_function``), which needs the state of layer 0.
        """
        if self.state is not None and self.layer == layer:
            return self.state
        asking = (
            "the network's input (the node before functions[0])"
            if layer == 0
            else f"functions[{layer - 1}]"
        )
        held = (
            "holds no reconstructed state (the backward that reconstructed it has ended)"
            if self.state is None
            else f"holds the reconstructed input of functions[{self.layer}]"
            if self.layer < len(self.net.functions)
            else "holds the final state, that of the output"
        )
        raise RuntimeError(
            f"MomentumNet(use_backprop=False): backward reached {asking}, but this call "
            f"{held}. The layers of one call must be back-propagated together, from the "
            "output to the input: a partial or interleaved backward through the same call "
            "is not supported. Back-propagate from the network's output (once, or with "
            "retain_graph=True for more), or use use_backprop=True"
        )


def _refuse_transforms() -> None:
    """Raise where the memory-saving training pass cannot give autograd's result.

    Its forward pass runs the functions inside one custom autograd node per layer,
    without a graph, and backward reconstructs their inputs: a :mod:`torch.func`
    transform or a forward-mode tangent would have to follow values that are
    rebuilt rather than computed, and the nodes define neither a batching rule nor
    a forward derivative. Raised before anything runs, with the fix, rather than
    PyTorch's errors about ``setup_context`` or ``jvp``. Reading the two flags
    is host metadata; the check runs eagerly, in the frame that torch.compile
    leaves uncompiled, so that it costs a compiled model no graph break.
    """
    if functorch_transforms_active():
        feature = "torch.func transforms (grad, vjp, jvp, vmap, jacrev, ...)"
    elif forward_ad_active():
        feature = "forward-mode AD (a torch.autograd.forward_ad.dual_level is open)"
    else:
        return
    raise RuntimeError(
        f"MomentumNet(use_backprop=False): {feature} cannot run through the memory-saving "
        "training pass, which runs the functions outside autograd and reconstructs their "
        "inputs in backward. Use use_backprop=True, or call the network in eval mode or "
        "under torch.no_grad(), where both modes run the plain iteration"
    )


# torch.compile: the whole call runs eagerly, functions included. The exact
# reversal in backward needs every f_t to return bit for bit what it returned in
# forward, and backward (run by the autograd engine) is always eager; a compiled
# f_t rounds differently, and the difference grows by 1/gamma per layer (gradients
# off by 70% for 30 layers at gamma 0.5). It also keeps Dynamo out of the
# fixed-point bookkeeping (host-side bounds, per-layer counters).
@torch.compiler.disable
def run_without_activations(
    net: Network, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """Run ``net`` on ``x`` keeping only what exact reversal needs for backward."""
    _refuse_transforms()
    fixed = FixedPoint(x.dtype)
    run = _Run(
        net=net,
        args=args,
        kwargs=kwargs,
        grad_slots=grad_slots(args, kwargs),
        fixed=fixed,
        core=ExactMomentum(net._gamma, fixed),
        tape=RNGTape([x]),
        autocast=AutocastState.capture([x]),
        checks=RangeCheck(fixed),
    )
    grad_args = slot_tensors(args, kwargs, run.grad_slots)
    init = net.init_function
    if init is not None:
        run.init_step = _prepare("init_function", init, run)
    link = _Start.apply(run, x, *(run.init_step.params if run.init_step is not None else ()))
    run.record = ArgumentRecord(args, kwargs)
    try:
        for t, f in enumerate(net.functions):
            # The parameters the function holds now, before it runs: those that
            # functional_call swapped in are the ones to differentiate.
            step = _prepare(f"functions[{t}]", f, run)
            run.steps.append(step)
            link = _Layer.apply(run, t, link, *grad_args, *step.params)
    except Exception as error:
        # A function that fails on an input out of range: name what left the range.
        try:
            run.checks.check(read_on_host=True)
        except OverflowError as overflow:
            raise overflow from error
        raise
    run.record.check(args, kwargs, "while the functions ran in the forward pass")
    return link


def _vjp(
    y: torch.Tensor,
    leaves: tuple[torch.Tensor, ...],
    grad_y: torch.Tensor,
    params: tuple[torch.Tensor, ...],
) -> list[torch.Tensor | None]:
    """Gradients of ``leaves``, returned; those of tensors ``y`` reaches besides, accumulated.

    ``leaves`` are the recomputation's own: its input, the extra-argument leaves,
    and last the leaves standing for ``params`` (see :func:`_recomputing`).
    ``grad_y`` is the gradient for ``y``, in its dtype.

    Tensors that the function reaches without owning them
    (``unowned_leaves``) get their gradients as autograd would give them in
    the plain mode: accumulated into ``.grad`` (hooks included). The same
    backward pass computes those of ``leaves``, read from their ``.grad``: one
    pass, so that the hooks of the function's modules (full backward hooks) run
    once, as in the plain mode. The graph is retained, since a closure may reach
    into the graph of the enclosing computation, which the backward that is
    running still has to go through. A parameter reached directly rather than
    through its leaf (a module that keeps its own list of its weights, as the
    recurrent ones do) is given the gradient it gets that way as well.
    """
    if not y.requires_grad:
        return [None] * len(leaves)
    others = unowned_leaves((y,), leaves)
    if not others:
        return list(torch.autograd.grad(y, leaves, grad_y, allow_unused=True))
    at = {id(p): len(leaves) - len(params) + i for i, p in enumerate(params)}
    if all(id(t) in at for t in others):
        found = list(torch.autograd.grad(y, (*leaves, *others), grad_y, allow_unused=True))
        for t, grad in zip(others, found[len(leaves) :]):
            i = at[id(t)]
            if grad is not None:
                found[i] = grad if found[i] is None else found[i] + grad
        return found[: len(leaves)]
    torch.autograd.backward(y, grad_y, inputs=[*leaves, *others], retain_graph=True)
    found = [leaf.grad for leaf in leaves]
    for leaf in leaves:  # the extra-argument leaves serve every layer
        leaf.grad = None
    return found


class _Start(torch.autograd.Function):
    """Convert ``x`` to fixed point and compute ``v_0``; backward gives ``x`` its gradient."""

    @staticmethod
    def forward(ctx: Any, run: _Run, x: torch.Tensor, *init_params: torch.Tensor) -> torch.Tensor:
        net, fixed = run.net, run.fixed
        position = fixed.to_fixed(x, "the input x", run.checks)
        if run.init_step is not None:
            # init_function sees x as the functions do: rounded to fixed point.
            x_0 = (position * fixed.unit).to(x.dtype)
            v_0 = _call_recorded(run.init_step, "init", x_0, net.call_init, x_0)
            velocity = fixed.to_fixed(v_0, "the initial velocity init_function(x)", run.checks)
        else:
            velocity = torch.zeros_like(position)
        known = None if run.init_step is not None else 0.0
        run.state = run.core.start(position, velocity, velocity_peak=known)
        run.inputs = run.core.inputs(run.state)
        run.layer = 0
        ctx.run = run
        return x.new_empty(0)

    @staticmethod
    @first_order(lambda ctx: _DOUBLE_BACKWARD)
    def backward(ctx: Any, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: _Run = ctx.run
        state = run.state_at(0)
        assert run.grad_x is not None and run.grad_v_total is not None
        grad_x, grad_init = run.grad_x, []
        step = run.init_step
        if step is not None:
            x_0 = run.core.inputs(state).requires_grad_(True)
            grad_v = run.grad_v_total - grad_x
            # The vjp too: restoring the buffers after it keeps the versions that
            # autograd saved (BatchNorm saves its running statistics).
            with _recomputing(step, x_0) as (given, params):
                v_0 = call_recorded("init", run.net.call_init, given)
                found = _vjp(v_0, (x_0, *params), grad_v.to(v_0.dtype), step.params)
            if found[0] is not None:
                grad_x.add_(found[0])
            grad_init = found[1:]
            if not graph_kept():
                step.release()
                run.init_step = None
        run.state = run.grad_x = run.grad_v_total = None
        dtype = run.fixed.dtype
        return (None, grad_x.to(dtype) if ctx.needs_input_grad[1] else None, *grad_init)


class _Layer(torch.autograd.Function):
    """Layer ``t`` of the iteration; the last layer's node returns the network's output."""

    @staticmethod
    def forward(
        ctx: Any, run: _Run, t: int, link: torch.Tensor, *tensors: torch.Tensor
    ) -> torch.Tensor:
        net, core = run.net, run.core
        state, step = run.state, run.steps[t]
        assert state is not None and step is not None
        assert run.inputs is not None and run.layer == t
        x_t = run.inputs
        y = _call_recorded(step, t, x_t, net.call_function, t, x_t, run.args, run.kwargs)
        run.inputs = core.advance(state, y, net.is_residual, t, run.checks)
        run.layer = t + 1
        ctx.run, ctx.t = run, t
        if t < len(net.functions) - 1:
            return link.new_empty(0)
        # Once per forward pass, before it returns: one read on the CPU, a device-side
        # assert on an accelerator.
        run.checks.check()
        # The last layer keeps the final state for backward; the shared object lets
        # it go, so that saved-tensor hooks (offloading, accounting) see all of it.
        ctx.save_for_backward(state.position, state.velocity, *state.store.tensors())
        ctx.layout = state.store.layout()
        ctx.direct_at = set(state.direct_at)
        run.state = None
        output, run.inputs = run.inputs, None
        return output

    @staticmethod
    @first_order(lambda ctx: _DOUBLE_BACKWARD)
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: _Run = ctx.run
        t: int = ctx.t
        net, core = run.net, run.core
        if t == len(net.functions) - 1:
            _begin_backward(ctx, run, grad_output)
        state = run.state_at(t + 1)
        grad_x, grad_v_total = run.grad_x, run.grad_v_total
        assert grad_x is not None and grad_v_total is not None
        step = run.steps[t]
        assert step is not None  # released only by a backward that freed the graph

        # x_{t+1} = x_t + v_{t+1} and v_{t+1} = gamma v_t + (1 - gamma) f_t(x_t).
        x_t, grad_y = core.retreat_position(state, grad_v_total)
        x_t.requires_grad_(True)
        with _recomputing(step, x_t) as (given, params):
            y = call_recorded(t, net.call_function, t, given, run.leaf_args, run.leaf_kwargs)
            if grad_y.dtype != y.dtype:  # f changed the dtype (autocast): round once
                grad_y = (grad_v_total * core.mix).to(y.dtype)
            found = _vjp(y, (x_t, *run.arg_leaves, *params), grad_y, step.params)
        core.retreat_velocity(state, y, net.is_residual)
        run.layer = t
        core.backpropagate(grad_x, grad_v_total, found[0], net.is_residual)
        if not graph_kept():
            # The graph goes after this backward: nothing will replay the step, and
            # its buffers need no copy when their modules run again.
            step.release()
            run.steps[t] = None

        needs = ctx.needs_input_grad
        if not needs[2]:
            # No earlier node takes part in this backward: the state can go now.
            run.state = run.grad_x = run.grad_v_total = None
        n_args = len(run.grad_slots)
        grad_args = [g if need else None for g, need in zip(found[1 : 1 + n_args], needs[3:])]
        grad_link = grad_output.new_empty(0) if needs[2] else None
        return (None, None, grad_link, *grad_args, *found[1 + n_args :])


def _begin_backward(ctx: Any, run: _Run, grad_output: torch.Tensor) -> None:
    """Restore the final state saved by the last layer and seed the state gradients."""
    # First, before anything is computed: a step that cannot be replayed raises
    # with no gradient given to any of the network's parameters.
    run.check_steps()
    position, velocity, *store_tensors = ctx.saved_tensors
    store = BitStore.from_tensors(store_tensors, ctx.layout)
    # Copies: undoing the steps writes over the state, and a backward with
    # retain_graph=True must find the saved tensors intact for the next one.
    run.state = MomentumState(position.clone(), velocity.clone(), store, direct_at=ctx.direct_at)
    run.layer = len(run.net.functions)
    # In the state's layout, which the fused loops need (the gradient of a sum is
    # an expanded tensor, for one).
    run.grad_x = torch.empty_like(position).copy_(grad_output)
    run.grad_v_total = run.grad_x.clone()
    assert run.record is not None
    run.record.check(run.args, run.kwargs, "between the forward pass and backward")
    tensors = slot_tensors(run.args, run.kwargs, run.grad_slots)
    run.arg_leaves = tuple(t.detach().requires_grad_(True) for t in tensors)
    run.leaf_args, run.leaf_kwargs = with_tensors(
        run.args, run.kwargs, run.grad_slots, run.arg_leaves
    )
