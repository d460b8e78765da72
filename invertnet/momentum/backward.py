"""``use_backprop=False``: train a MomentumNet without storing per-layer activations.

The forward pass runs the iteration in exact fixed point
(:mod:`invertnet.momentum.exact`) with autograd off, and saves only the final
state and the bit store. Backward runs the iteration backwards: at each layer it
restores ``x_t`` bit for bit, evaluates ``f_t`` once, with grad, on it, and uses
that one evaluation both to undo the velocity update and to back-propagate, the
fused scheme of :meth:`invertnet.CouplingBase.inverse_and_vjp`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.function import once_differentiable

from invertnet._rng import RNGTape, call_recorded
from invertnet.momentum.exact import BitStore, ExactMomentum, FixedPoint, MomentumState
from invertnet.wrappers._recompute import AutocastState, buffers_unchanged

if TYPE_CHECKING:
    from invertnet.momentum.net import MomentumNet

__all__ = ["run_without_activations"]

Slot = tuple[str, int | str]


@dataclass
class _Run:
    """What one call needs besides the tensors autograd tracks."""

    net: MomentumNet
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # Where the extra-argument tensors that require grad sit in args/kwargs.
    grad_slots: list[Slot]
    # Parameters that require grad, and which of them each layer (and init) owns.
    params: tuple[torch.Tensor, ...]
    layer_params: list[list[int]]
    init_params: list[int]
    # Filled in by the forward pass.
    fixed: FixedPoint | None = None
    layout: tuple[list[int], int, int] = field(default_factory=lambda: ([], 0, 0))
    tape: RNGTape | None = None
    autocast: list[AutocastState] = field(default_factory=list)


def _nested_grad_tensor(value: Any) -> bool:
    from invertnet.momentum.net import _requires_grad

    return isinstance(value, (list, tuple, dict)) and _requires_grad(value)


def _grad_slots(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Slot]:
    for where, value in [*enumerate(args), *kwargs.items()]:
        if _nested_grad_tensor(value):
            name = f"argument {where}" if isinstance(where, int) else f"keyword {where!r}"
            raise TypeError(
                f"MomentumNet(use_backprop=False): {name} is a container holding a tensor "
                "that requires grad; pass such tensors as direct arguments so that they get "
                "gradients (or use use_backprop=True)"
            )
    slots: list[Slot] = [
        ("arg", i) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad
    ]
    slots += [
        ("kwarg", k) for k, a in kwargs.items() if isinstance(a, torch.Tensor) and a.requires_grad
    ]
    return slots


def _with_tensors(
    run: _Run, tensors: tuple[torch.Tensor, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``run``'s args and kwargs with the grad slots filled by ``tensors``."""
    args, kwargs = list(run.args), dict(run.kwargs)
    for (kind, key), t in zip(run.grad_slots, tensors):
        if kind == "arg":
            args[key] = t  # type: ignore[index]
        else:
            kwargs[key] = t  # type: ignore[index]
    return tuple(args), kwargs


def _param_indices(module: torch.nn.Module, index: dict[int, int]) -> list[int]:
    return sorted({index[id(p)] for p in module.parameters() if id(p) in index})


def run_without_activations(
    net: MomentumNet, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor:
    """Run ``net`` on ``x`` keeping only what exact reversal needs for backward."""
    params = tuple(p for p in net.parameters() if p.requires_grad)
    index = {id(p): i for i, p in enumerate(params)}
    init = net.init_function
    run = _Run(
        net=net,
        args=args,
        kwargs=kwargs,
        grad_slots=_grad_slots(args, kwargs),
        params=params,
        layer_params=[_param_indices(f, index) for f in net.functions],
        init_params=_param_indices(init, index) if init is not None else [],
    )
    grad_args = [args[k] if kind == "arg" else kwargs[k] for kind, k in run.grad_slots]  # type: ignore[index]
    return _MomentumFunction.apply(run, x, *grad_args, *params)


def _update(run: _Run, t: int, position: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(1 - gamma) * f_t`` in fixed point, from the function's output ``y``."""
    assert run.fixed is not None
    step = y.detach().to(torch.float64)
    if not run.net.is_residual:
        step = step - run.fixed.to_float(position)
    return run.fixed.to_fixed(run.net._gamma.complement * step, f"(1 - gamma) * f_{t}(x_{t})")


class _MomentumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: _Run, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        net = run.net
        fixed = FixedPoint(x.dtype)
        core = ExactMomentum(net._gamma, fixed)
        args, kwargs = _with_tensors(run, tensors[: len(run.grad_slots)])
        run.fixed = fixed
        run.tape = RNGTape([x])
        run.autocast = AutocastState.capture([x])

        position = fixed.to_fixed(x, "the input x")
        # The functions see the fixed-point state as floats, from the first layer on,
        # so that backward can give them the very same values.
        x_float = fixed.to_float(position).to(x.dtype)
        with run.tape.recording():
            if net.init_function is not None:
                v0 = call_recorded("init", net.call_init, x_float)
                velocity = fixed.to_fixed(v0, "the initial velocity init_function(x)")
            else:
                velocity = torch.zeros_like(position)
            state = core.start(position, velocity)
            for t in range(len(net.functions)):
                y = call_recorded(t, net.call_function, t, x_float, args, kwargs)
                core.step(state, _update(run, t, state.position, y), t)
                x_float = fixed.to_float(state.position).to(x.dtype)
        core.check(state, len(net.functions))

        run.layout = state.store.layout()
        ctx.save_for_backward(state.position, state.velocity, *state.store.tensors())
        ctx.run = run
        return x_float

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        run: _Run = ctx.run
        assert run.fixed is not None and run.tape is not None
        position, velocity, *store_tensors = ctx.saved_tensors
        state = MomentumState(position, velocity, BitStore.from_tensors(store_tensors, run.layout))
        n_args = len(run.grad_slots)
        with contextlib.ExitStack() as stack:
            stack.enter_context(AutocastState.restored(run.autocast))
            stack.enter_context(buffers_unchanged(run.net))
            stack.enter_context(run.tape.replaying())
            grad_x, grad_args, grad_params = _reverse(run, state, grad_output)
        needs = ctx.needs_input_grad
        grad_x = grad_x.to(grad_output.dtype) if needs[1] else None
        grad_args = [g if need else None for g, need in zip(grad_args, needs[2 : 2 + n_args])]
        return (None, grad_x, *grad_args, *grad_params)


def _accumulate(total: list[torch.Tensor | None], indices: list[int], grads: Any) -> None:
    for i, g in zip(indices, grads):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g


def _reverse(
    run: _Run, state: MomentumState, grad_output: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Undo the iteration layer by layer, back-propagating as it goes."""
    net, fixed = run.net, run.fixed
    assert fixed is not None
    core = ExactMomentum(net._gamma, fixed)
    keep, mix = net._gamma.value, net._gamma.complement
    dtype = grad_output.dtype
    arg_leaves = tuple(
        (run.args[k] if kind == "arg" else run.kwargs[k]).detach().requires_grad_(True)  # type: ignore[index]
        for kind, k in run.grad_slots
    )
    args, kwargs = _with_tensors(run, arg_leaves)
    n_args = len(arg_leaves)
    grad_args: list[torch.Tensor | None] = [None] * n_args
    grad_params: list[torch.Tensor | None] = [None] * len(run.params)
    # Gradients with respect to the state, accumulated in float64 like the plain mode.
    grad_x = grad_output.to(torch.float64)
    grad_v = torch.zeros_like(grad_x)
    for t in reversed(range(len(net.functions))):
        position = core.unstep_position(state)
        x_t = fixed.to_float(position).to(dtype).requires_grad_(True)
        with torch.enable_grad():
            y = call_recorded(t, net.call_function, t, x_t, args, kwargs)
        core.unstep_velocity(state, _update(run, t, position, y))

        grad_new_v = grad_x + grad_v  # x_{t+1} = x_t + v_{t+1}
        grad_y = mix * grad_new_v
        layer_params = [run.params[i] for i in run.layer_params[t]]
        wanted = (x_t, *arg_leaves, *layer_params)
        found = _vjp(y, wanted, grad_y)
        if found[0] is not None:
            grad_x = grad_x + found[0].to(torch.float64)
        if not net.is_residual:
            grad_x = grad_x - grad_y
        grad_v = keep * grad_new_v
        _accumulate(grad_args, list(range(n_args)), found[1 : 1 + n_args])
        _accumulate(grad_params, run.layer_params[t], found[1 + n_args :])

    if net.init_function is not None:
        x_0 = fixed.to_float(state.position).to(dtype).requires_grad_(True)
        with torch.enable_grad():
            v_0 = call_recorded("init", net.call_init, x_0)
        init_params = [run.params[i] for i in run.init_params]
        found = _vjp(v_0, (x_0, *init_params), grad_v)
        if found[0] is not None:
            grad_x = grad_x + found[0].to(torch.float64)
        _accumulate(grad_params, run.init_params, found[1:])
    return grad_x, grad_args, grad_params


def _vjp(
    y: torch.Tensor, wanted: tuple[torch.Tensor, ...], grad_y: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    if not y.requires_grad:
        return (None,) * len(wanted)
    return torch.autograd.grad(y, wanted, grad_y.to(y.dtype), allow_unused=True)
