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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from invertnet._rng import RNGTape, call_recorded
from invertnet.momentum.arguments import (
    ArgumentRecord,
    Slot,
    grad_slots,
    slot_tensors,
    with_tensors,
)
from invertnet.momentum.exact import (
    BitStore,
    ExactMomentum,
    FixedPoint,
    MomentumState,
    RangeCheck,
)
from invertnet.wrappers._recompute import AutocastState, buffers_unchanged

if TYPE_CHECKING:
    from invertnet.momentum.net import MomentumNet

__all__ = ["run_without_activations"]


@dataclass
class _Run:
    """What the nodes of one call share besides the tensors autograd tracks."""

    net: MomentumNet
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # Where the extra-argument tensors that require grad sit in args/kwargs.
    grad_slots: list[Slot]
    fixed: FixedPoint
    core: ExactMomentum
    tape: RNGTape
    autocast: tuple[AutocastState, ...]
    # Forward only: the magnitudes the steps reached, checked once at the end.
    checks: RangeCheck
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

    @contextlib.contextmanager
    def recomputing(self, module: torch.nn.Module) -> Iterator[None]:
        """Recompute under the forward's autocast and RNG, leaving buffers alone."""
        with (
            AutocastState.restored(self.autocast),
            buffers_unchanged(module),
            self.tape.replaying(),
            torch.enable_grad(),
        ):
            yield

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


def _trainable(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    return tuple(p for p in module.parameters() if p.requires_grad)


# torch.compile: the whole call runs eagerly, functions included. The exact
# reversal in backward needs every f_t to return bit for bit what it returned in
# forward, and backward (run by the autograd engine) is always eager; a compiled
# f_t rounds differently, and the difference grows by 1/gamma per layer (gradients
# off by 70% for 30 layers at gamma 0.5). It also keeps Dynamo out of the
# fixed-point bookkeeping (host-side bounds, per-layer counters).
@torch.compiler.disable
def run_without_activations(
    net: MomentumNet, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """Run ``net`` on ``x`` keeping only what exact reversal needs for backward."""
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
    link = _Start.apply(run, x, *(_trainable(init) if init is not None else ()))
    run.record = ArgumentRecord(args, kwargs)
    try:
        for t, f in enumerate(net.functions):
            link = _Layer.apply(run, t, link, *grad_args, *_trainable(f))
    except Exception as error:
        # A function that fails on an input out of range: name what left the range.
        try:
            run.checks.check(read_on_host=True)
        except OverflowError as overflow:
            raise overflow from error
        raise
    run.record.check(args, kwargs, "while the functions ran in the forward pass")
    return link


# The type of the node that accumulates a leaf's gradient.
_ACCUMULATE_GRAD = type(torch.zeros(1, requires_grad=True).view(1).grad_fn.next_functions[0][0])


def _unowned_leaves(y: torch.Tensor, wanted: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The leaves that ``y`` reaches besides ``wanted`` and that require grad.

    Such tensors are used by a function without being its parameters or call
    arguments: a parameter of another module, captured in a closure, for example.
    The node of a layer does not list them among its inputs (it cannot know them
    in forward), so :func:`_vjp` gives them their gradients separately.

    The graph is walked at every backward: which tensors it reaches, and which
    of them require grad, may change between calls (a module frozen, then
    unfrozen; a closure over a tensor computed without grad, then with it), so
    a remembered answer could withhold a gradient. The walk is a pass over the
    graph's nodes in Python, about a microsecond per node, with no look at a
    tensor's values.
    """
    root = y.grad_fn
    if root is None:
        return []
    known = {id(w) for w in wanted}
    stack, seen, leaves = [root], {root}, {}
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node) is _ACCUMULATE_GRAD:
                variable = node.variable
                if id(variable) not in known:
                    leaves[id(variable)] = variable
            else:
                stack.append(node)
    return list(leaves.values())


def _vjp(
    y: torch.Tensor,
    wanted: tuple[torch.Tensor, ...],
    grad_y: torch.Tensor,
    unowned: list[torch.Tensor],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``wanted``, returned; those of ``unowned``, accumulated.

    ``grad_y`` is the gradient for ``y``, in its dtype.

    ``unowned`` tensors get their gradients as autograd would give them in the
    plain mode: accumulated into ``.grad`` (hooks included) by a second pass
    through the recomputed graph. The graph is retained by both passes, since a
    closure may reach into the graph of the enclosing computation, which the
    backward that is running still has to go through.
    """
    if not y.requires_grad:
        return (None,) * len(wanted)
    found = torch.autograd.grad(y, wanted, grad_y, allow_unused=True, retain_graph=bool(unowned))
    if unowned:
        torch.autograd.backward(y, grad_y, inputs=unowned, retain_graph=True)
    return found


class _Start(torch.autograd.Function):
    """Convert ``x`` to fixed point and compute ``v_0``; backward gives ``x`` its gradient."""

    @staticmethod
    def forward(ctx: Any, run: _Run, x: torch.Tensor, *init_params: torch.Tensor) -> torch.Tensor:
        net, fixed = run.net, run.fixed
        position = fixed.to_fixed(x, "the input x", run.checks)
        if net.init_function is not None:
            # init_function sees x as the functions do: rounded to fixed point.
            x_0 = (position * fixed.unit).to(x.dtype)
            with run.tape.recording():
                v_0 = call_recorded("init", net.call_init, x_0)
            velocity = fixed.to_fixed(v_0, "the initial velocity init_function(x)", run.checks)
        else:
            velocity = torch.zeros_like(position)
        known = None if net.init_function is not None else 0.0
        run.state = run.core.start(position, velocity, velocity_peak=known)
        run.inputs = run.core.inputs(run.state)
        run.layer = 0
        ctx.run = run
        ctx.init_params = init_params
        return x.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, _: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: _Run = ctx.run
        state = run.state_at(0)
        assert run.grad_x is not None and run.grad_v_total is not None
        grad_x, grad_init = run.grad_x, [None] * len(ctx.init_params)
        init = run.net.init_function
        if init is not None:
            x_0 = run.core.inputs(state).requires_grad_(True)
            grad_v = run.grad_v_total - grad_x
            # The vjp too: restoring the buffers after it keeps the versions that
            # autograd saved (BatchNorm saves its running statistics).
            with run.recomputing(init):
                v_0 = call_recorded("init", run.net.call_init, x_0)
                wanted = (x_0, *ctx.init_params)
                unowned = _unowned_leaves(v_0, wanted)
                found = _vjp(v_0, wanted, grad_v.to(v_0.dtype), unowned)
            if found[0] is not None:
                grad_x.add_(found[0])
            grad_init = list(found[1:])
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
        state = run.state
        assert state is not None and run.inputs is not None and run.layer == t
        x_t = run.inputs
        with run.tape.recording():
            y = call_recorded(t, net.call_function, t, x_t, run.args, run.kwargs)
        run.inputs = core.advance(state, y, net.is_residual, t, run.checks)
        run.layer = t + 1
        ctx.run, ctx.t = run, t
        ctx.params = tensors[len(run.grad_slots) :]
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
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: _Run = ctx.run
        t: int = ctx.t
        net, core = run.net, run.core
        if t == len(net.functions) - 1:
            _begin_backward(ctx, run, grad_output)
        state = run.state_at(t + 1)
        grad_x, grad_v_total = run.grad_x, run.grad_v_total
        assert grad_x is not None and grad_v_total is not None
        f = net.functions[t]

        # x_{t+1} = x_t + v_{t+1} and v_{t+1} = gamma v_t + (1 - gamma) f_t(x_t).
        x_t, grad_y = core.retreat_position(state, grad_v_total)
        x_t.requires_grad_(True)
        with run.recomputing(f):
            y = call_recorded(t, net.call_function, t, x_t, run.leaf_args, run.leaf_kwargs)
            if grad_y.dtype != y.dtype:  # f changed the dtype (autocast): round once
                grad_y = (grad_v_total * core.mix).to(y.dtype)
            wanted = (x_t, *run.arg_leaves, *ctx.params)
            unowned = _unowned_leaves(y, wanted)
            found = _vjp(y, wanted, grad_y, unowned)
        core.retreat_velocity(state, y, net.is_residual)
        run.layer = t
        core.backpropagate(grad_x, grad_v_total, found[0], net.is_residual)

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
