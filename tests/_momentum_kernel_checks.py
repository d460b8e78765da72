"""Checks that a backend of the exact momentum arithmetic gives the reference's bits.

Every check takes a backend (:mod:`invertnet.momentum.backends`) and runs it
through the interface, :class:`~invertnet.momentum.exact.ExactMomentum`, against
the reference (``"tensor"``). They are shared by ``test_momentum_kernels.py`` (the
fused backends this process can run: the C loops on the CPU, the compiled Triton
kernels on a GPU), ``momentum_triton_cases.py`` (the Triton kernels in Triton's
interpreter on CPU tensors, in CI) and ``test_momentum_triton_cuda.py``. Inputs are
drawn on the CPU with a seeded generator and moved to ``device``, so every device
sees the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

from invertnet import MomentumNet
from invertnet.momentum import backends
from invertnet.momentum.backends import REFERENCE, Backend
from invertnet.momentum.exact import ExactMomentum
from invertnet.momentum.fixed_point import (
    FixedPoint,
    MomentumState,
    RangeCheck,
    largest_magnitude,
)
from invertnet.momentum.gamma import MAX_DENOMINATOR, Gamma

#: The functions' input dtypes the fused backends serve, and the output dtypes
#: the Triton kernels read (the C loops read only the input's).
DTYPES = [torch.float32, torch.float64]
OUTPUT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def phase_cases(
    sizes: Sequence[int], output_dtypes: Sequence[torch.dtype | None] = (None, *OUTPUT_DTYPES)
) -> st.SearchStrategy[dict[str, Any]]:
    """The keyword arguments of :func:`check_phases_match` but the backend, the
    device and the steps: random gamma fractions, dtypes, residual or not, scales
    and signs, of the given sizes (an output dtype None is the input's)."""
    return st.fixed_dictionaries(
        {
            "numerator": st.integers(1, MAX_DENOMINATOR - 1),
            "denominator": st.integers(2, MAX_DENOMINATOR),
            "dtype": st.sampled_from(DTYPES),
            "output_dtype": st.sampled_from(list(output_dtypes)),
            "residual": st.booleans(),
            # Up to 10**3.5: with gamma near 1 the velocity barely decays, and 40
            # steps of it must stay within the supported range.
            "log_scale": st.floats(-6, 3.5),
            "size": st.sampled_from(list(sizes)),
            "seed": st.integers(0, 2**31),
        }
    )


def cores(backend: Backend, gamma: Gamma, fixed: FixedPoint) -> tuple[ExactMomentum, ...]:
    """Two cores of ``gamma``: one on ``backend``, one on the reference."""
    return ExactMomentum(gamma, fixed, backend), ExactMomentum(gamma, fixed, REFERENCE)


def copy_state(state: MomentumState) -> MomentumState:
    """An independent copy of ``state`` (position, velocity and bit store)."""
    store = type(state.store).from_tensors(state.store.tensors(), state.store.layout())
    store.head_bound = state.store.head_bound
    return MomentumState(state.position.clone(), state.velocity.clone(), store)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for 0.0 and fails on NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def assert_same_state(a: MomentumState, b: MomentumState, where: str) -> None:
    """Equal positions, velocities and store heads, and as many stored chunks."""
    # The kernels round with 1.5 * 2**52, which never gives -0.0 where torch's
    # round_() may: compare values there, bits everywhere else.
    assert torch.equal(a.position, b.position), f"position differs {where}"
    assert torch.equal(a.velocity, b.velocity), f"velocity differs {where}"
    assert torch.equal(a.store.head, b.store.head), f"store differs {where}"
    assert len(a.store.chunks) == len(b.store.chunks)


def recorded(checks: RangeCheck) -> list[tuple[str, float]]:
    """What ``checks`` recorded, read on the host: names and magnitudes in units."""
    values = []
    for record in checks._records:
        known = record.known
        if known is None:
            known = largest_magnitude(float(t) for t in record.tensors)
        values.append((record.what, known * record.scale))
    return values


def check_phases_match(
    backend: Backend,
    numerator: int,
    denominator: int,
    dtype: torch.dtype,
    output_dtype: torch.dtype | None,
    residual: bool,
    log_scale: float,
    size: int,
    seed: int,
    device: str,
    steps: int = 4,
) -> None:
    """``steps`` forward steps and their undoing on ``backend`` and on the reference,
    compared bit for bit, and the magnitudes each recorded.

    ``output_dtype`` is that of the functions' outputs (``None``: ``dtype``).
    """
    numerator = min(numerator, denominator - 1)
    scale = 10.0**log_scale
    gen = torch.Generator().manual_seed(seed)
    fixed = FixedPoint(dtype)
    fast_core, slow_core = cores(backend, Gamma(numerator, denominator), fixed)
    y_dtype = output_dtype or dtype

    def uniform() -> torch.Tensor:  # both signs
        drawn = (torch.rand(size, generator=gen, dtype=torch.float64) * 2 - 1) * scale
        return drawn.to(device)

    start = slow_core.start(fixed.to_fixed(uniform(), "x"), fixed.to_fixed(uniform(), "v"))
    fast, slow = copy_state(start), copy_state(start)
    fast_checks, slow_checks = RangeCheck(fixed), RangeCheck(fixed)
    outputs = []
    for t in range(steps):
        # Pulled back towards the noise, so the state stays of the order of `scale`.
        noise = uniform()
        y = (noise - slow.position if residual else noise).to(y_dtype)
        assert backend.serves(dtype, (fast.store.head, fast.velocity, fast.position), (y,))
        out_fast = fast_core.advance(fast, y, residual, t, fast_checks)
        out_slow = slow_core.advance(slow, y, residual, t, slow_checks)
        assert same_bits(out_fast, out_slow), f"inputs of layer {t + 1} differ"
        assert_same_state(fast, slow, f"after step {t}")
        outputs.append(y)
    # The magnitudes the backend reported are those the reference measured.
    assert recorded(fast_checks) == recorded(slow_checks)
    fast_checks.check()
    slow_checks.check()
    grad_v = torch.randn(size, generator=gen, dtype=torch.float64).to(device)
    for t in reversed(range(steps)):
        x_fast, g_fast = fast_core.retreat_position(fast, grad_v)
        fast_core.retreat_velocity(fast, outputs[t], residual)
        x_slow, g_slow = slow_core.retreat_position(slow, grad_v)
        slow_core.retreat_velocity(slow, outputs[t], residual)
        assert same_bits(x_fast, x_slow) and same_bits(g_fast, g_slow)
        assert_same_state(fast, slow, f"after undoing step {t}")
    assert_same_state(fast, start, "after undoing every step")
    assert fast.store.steps == 0 and torch.count_nonzero(fast.store.head) == 0


def backpropagate_both_ways(
    backend: Backend,
    grad_x: torch.Tensor,
    grad_v: torch.Tensor,
    found: torch.Tensor | None,
    residual: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient update (``gamma = 9/10``) on ``backend``, checked against the
    reference to the last bit; returns its ``(grad_x, grad_v)``."""
    results = []
    for core in cores(backend, Gamma(9, 10), FixedPoint(torch.float32)):
        gx, gv = grad_x.clone(), grad_v.clone()
        assert core.backend.serves(torch.float32, (gx, gv), () if found is None else (found,))
        core.backpropagate(gx, gv, found, residual)
        results.append((gx, gv))
    (gx_fast, gv_fast), (gx_slow, gv_slow) = results
    # Neither side may fuse a multiply-add where the other does not (numpy; torch's
    # CPU loops and CUDA kernels may): equal up to the last bit.
    torch.testing.assert_close(gx_fast, gx_slow, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(gv_fast, gv_slow, rtol=1e-15, atol=1e-15)
    return gx_fast, gv_fast


def check_gradient_update_matches(
    backend: Backend, residual: bool, found_dtype: torch.dtype | None, device: str
) -> None:
    """The gradient phase of ``backend`` against the reference, and against its formula.

    ``found_dtype`` is that of the function's gradient (``None``: there is none).
    """
    gen = torch.Generator().manual_seed(0)
    grad_x = torch.randn(3000, generator=gen, dtype=torch.float64).to(device)
    grad_v = torch.randn(3000, generator=gen, dtype=torch.float64).to(device)
    found = None
    if found_dtype is not None:
        found = torch.randn(3000, generator=gen).to(device=device, dtype=found_dtype)
    gx, gv = backpropagate_both_ways(backend, grad_x, grad_v, found, residual)
    expected = grad_x + (found.double() if found is not None else 0)
    if not residual:
        expected = expected - 0.1 * grad_v
    torch.testing.assert_close(gx, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(gv, expected + 0.9 * grad_v, rtol=1e-15, atol=1e-15)


@contextlib.contextmanager
def counting(
    monkeypatch: pytest.MonkeyPatch, backend: Backend, *phases: str
) -> Iterator[dict[str, int]]:
    """Count the calls of ``backend``'s ``phases``, to see which backend ran."""
    calls = dict.fromkeys(phases, 0)
    with monkeypatch.context() as patch:
        for phase in phases:
            original: Callable[..., Any] = getattr(backend, phase)

            def counted(*args: Any, _phase: str = phase, _original: Any = original) -> Any:
                calls[_phase] += 1
                return _original(*args)

            patch.setattr(backend, phase, counted)
        yield calls


def train_both_ways(
    backend: Backend, make: Callable[[], tuple[MomentumNet, torch.Tensor]]
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """A training step of ``make()``'s network on ``backend`` and on the reference."""
    results = []
    for names in ((backend.name,), ()):
        net, x = make()
        x.requires_grad_(True)
        with backends.use_backends(*names):
            out = net(x)
            wanted = [x, *net.parameters()]
            grads = torch.autograd.grad((out * out.detach().cos()).sum(), wanted)
        results.append((out.detach(), list(grads)))
    return results


def assert_same_training(
    backend: Backend, make: Callable[[], tuple[MomentumNet, torch.Tensor]]
) -> None:
    """The same output bit for bit, and gradients within rounding, on ``backend``."""
    (out_fast, grads_fast), (out_slow, grads_slow) = train_both_ways(backend, make)
    assert torch.equal(out_fast, out_slow)
    for fast, slow in zip(grads_fast, grads_slow):
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9)


def mlp_net(
    depth: int, dtype: torch.dtype, is_residual: bool, device: str = "cpu"
) -> Callable[[], tuple[MomentumNet, torch.Tensor]]:
    """A factory of a seeded MomentumNet(use_backprop=False) of ``depth`` MLPs and its input."""

    def make() -> tuple[MomentumNet, torch.Tensor]:
        torch.manual_seed(0)
        functions = [
            nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(depth)
        ]
        net = MomentumNet(functions, gamma=0.9, use_backprop=False, is_residual=is_residual)
        return net.to(device=device, dtype=dtype), torch.randn(4, 8, dtype=dtype, device=device)

    return make


def check_trains_the_same(
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
    dtype: torch.dtype,
    is_residual: bool,
    device: str = "cpu",
    depth: int = 20,
) -> None:
    """A MomentumNet trains the same on ``backend`` as on the reference, and every
    layer's phases ran on ``backend``."""
    with counting(monkeypatch, backend, "advance", "retreat_velocity") as calls:
        assert_same_training(backend, mlp_net(depth, dtype, is_residual, device))
    assert calls == {"advance": depth, "retreat_velocity": depth}  # once per layer
