"""The fused backends of the exact momentum iteration give the states the reference gives.

Each check runs through the backends' interface against the reference
(``tests/_momentum_kernel_checks.py``), for every fused backend this process can
run: the C loops (``"native"``) where the extension is built, and the Triton
kernels on a CUDA GPU where Triton loads. ``momentum_triton_cases.py`` runs the
same checks on the Triton kernels in Triton's interpreter.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from invertnet import MomentumNet
from invertnet.momentum import backends
from invertnet.momentum.backends import REFERENCE, Backend, native, native_kernels
from invertnet.momentum.exact import ExactMomentum
from invertnet.momentum.fixed_point import FixedPoint, MomentumState
from invertnet.momentum.gamma import Gamma
from tests._momentum_kernel_checks import (
    assert_same_state,
    assert_same_training,
    check_gradient_update_matches,
    check_phases_match,
    check_trains_the_same,
    copy_state,
    cores,
    counting,
    phase_cases,
)


def _fused_backends() -> list[tuple[Backend, str]]:
    """The fused backends this process can run, each with the device it serves."""
    found = []
    if backends.NATIVE:
        found.append((backends.get("native"), "cpu"))
    if torch.cuda.is_available() and backends.triton_available():
        found.append((backends.get("triton"), "cuda"))
    return found


# The dtypes of the functions' outputs each backend reads (None: the input's), and
# those of the functions' input gradients.
_OUTPUT_DTYPES = {"native": [None], "triton": [None, torch.bfloat16, torch.float32]}
_FOUND_DTYPES = {"native": [None, torch.float32], "triton": [None, torch.float32, torch.bfloat16]}


def _cases(table: dict[str, list[Any]]) -> list[Any]:
    return [
        pytest.param(backend, device, value, id=f"{backend.name}-{value}")
        for backend, device in _fused_backends()
        for value in table[backend.name]
    ]


FUSED = pytest.mark.parametrize(
    "backend, device", _fused_backends(), ids=lambda v: getattr(v, "name", v)
)


def test_the_c_loops_are_built() -> None:
    # Installing from source compiles them; without them every step falls back to
    # the tensor operations, several times slower for small tensors.
    assert backends.NATIVE, "invertnet.momentum.backends._native is missing: no C compiler?"


def test_every_backend_implements_the_four_phases() -> None:
    for name in backends.registered():
        backend = backends.get(name)
        assert isinstance(backend, Backend) and backend.name == name
        for phase in ("advance", "retreat_position", "retreat_velocity", "backpropagate"):
            assert callable(getattr(backend, phase))
    assert backends.registered()[-1] == "tensor"


@pytest.mark.parametrize("backend, device, output_dtype", _cases(_OUTPUT_DTYPES))
def test_steps_and_their_undoing_match_the_reference_bit_for_bit(
    backend: Backend, device: str, output_dtype: torch.dtype | None
) -> None:
    @settings(max_examples=60 if output_dtype is None else 20, deadline=None)
    @given(case=phase_cases(sizes=[7, 35, 1100], output_dtypes=[output_dtype]))
    def check(case: dict[str, Any]) -> None:
        check_phases_match(backend, **case, device=device, steps=40)

    check()


@pytest.mark.parametrize("backend, device, found_dtype", _cases(_FOUND_DTYPES))
@pytest.mark.parametrize("residual", [True, False])
def test_gradient_update_matches_the_reference(
    backend: Backend, device: str, found_dtype: torch.dtype | None, residual: bool
) -> None:
    check_gradient_update_matches(backend, residual, found_dtype, device)


@FUSED
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("is_residual", [True, False])
def test_momentum_net_trains_the_same_on_the_backend(
    monkeypatch: pytest.MonkeyPatch,
    backend: Backend,
    device: str,
    dtype: torch.dtype,
    is_residual: bool,
) -> None:
    check_trains_the_same(monkeypatch, backend, dtype, is_residual, device)


def test_select_is_called_once_per_forward_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import invertnet.momentum.exact as exact

    calls = []

    def select(*args: Any) -> Backend:
        calls.append(args)
        return backends.select(*args)

    monkeypatch.setattr(exact, "select", select)
    net, x = _conv_net(5)
    net(x.requires_grad_(True)).sum().backward()
    assert len(calls) == 1


def _conv_net(depth: int, gamma: float = 0.5) -> tuple[MomentumNet, torch.Tensor]:
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Tanh()) for _ in range(depth)]
    net = MomentumNet(functions, gamma=gamma, use_backprop=False)
    net = net.to(memory_format=torch.channels_last)
    return net, torch.randn(2, 3, 6, 5).to(memory_format=torch.channels_last)


def test_channels_last_states_take_the_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = backends.get("native")
    with counting(monkeypatch, backend, "advance") as calls:
        assert_same_training(backend, lambda: _conv_net(5))
    assert calls == {"advance": 5}


def test_an_expanded_output_gradient_takes_the_loops_in_the_state_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The gradient of out.sum() is a tensor of ones expanded (stride 0); the state
    # gradients are made in the state's own layout (here channels_last) from it.
    net, x = _conv_net(4, gamma=0.9)
    plain = MomentumNet(list(net.functions), gamma=0.9)
    x.requires_grad_(True)
    with counting(monkeypatch, backends.get("native"), "backpropagate") as calls:
        net(x).sum().backward()
    assert calls == {"backpropagate": 4}
    expected = torch.autograd.grad(plain(x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


class _Transposed(nn.Module):
    """A layer whose output is a transposed view: not in the state's memory order."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.t().contiguous().t())).t().contiguous().t()


@pytest.mark.parametrize(
    "make_function, dtype",
    [
        (_Transposed, torch.float32),  # strides differ from the state's
        (lambda: nn.Sequential(nn.Linear(6, 6), nn.Tanh()), torch.float16),  # no loop for it
    ],
)
def test_tensors_the_loops_cannot_walk_take_the_tensor_operations(
    monkeypatch: pytest.MonkeyPatch, make_function: Callable[[], nn.Module], dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    net = MomentumNet([make_function() for _ in range(4)], gamma=0.9, use_backprop=False)
    plain = MomentumNet(list(net.functions), gamma=0.9)
    net, plain = net.to(dtype), plain.to(dtype)
    x = torch.randn(6, 5, dtype=dtype).t().requires_grad_(True)  # (5, 6), column-major
    with counting(monkeypatch, backends.get("native"), "advance") as calls:
        out = net(x)
        out.float().square().sum().backward()
    assert calls == {"advance": 0}
    assert x.grad is not None
    torch.testing.assert_close(out, plain(x), rtol=2e-3, atol=1e-3)


def test_autocast_outputs_get_gradients_in_their_dtype() -> None:
    # Under autocast the functions return bfloat16 for float32 inputs: the loops do
    # not apply, and the output gradient is converted once, from float64.
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)]
    light = MomentumNet(functions, gamma=0.9, use_backprop=False)
    plain = MomentumNet(functions, gamma=0.9)
    x = torch.randn(4, 8, requires_grad=True)
    grads = []
    for net in (plain, light):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        wanted = [x, *functions[0].parameters()]
        grads.append(torch.autograd.grad(out.float().square().sum(), wanted))
    for g_plain, g_light in zip(*grads):
        torch.testing.assert_close(g_light, g_plain, rtol=2e-2, atol=2e-2)


def test_native_kernels_requires_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "NATIVE", False)
    with (
        pytest.raises(RuntimeError, match=r"invertnet.momentum.backends._native is not built"),
        native_kernels(True),
    ):
        pass
    with native_kernels(False):  # turning them off needs nothing
        pass


def test_the_earlier_switches_set_the_one_switch() -> None:
    from invertnet.momentum import kernels

    # The earlier home of the switches still has them.
    assert kernels.native_kernels is native_kernels and kernels.NATIVE is backends.NATIVE
    everything = backends.enabled_backends()
    with native_kernels(False):
        assert backends.enabled_backends() == ("triton", "tensor")
        with backends.triton_kernels(False):
            assert backends.enabled_backends() == ("tensor",)
        with native_kernels(True):
            assert backends.enabled_backends() == everything
    with backends.use_backends("native"):
        assert backends.enabled_backends() == ("native", "tensor")
    with pytest.raises(ValueError, match="no momentum backend 'cuda'; registered: triton, native"):
        backends.use_backends("cuda").__enter__()


def test_native_kernels_restores_the_setting_after_an_error() -> None:
    doubles = (torch.zeros(2, dtype=torch.float64),)
    with pytest.raises(ValueError, match="inside"), native_kernels(False):
        assert backends.select(torch.float32, doubles) is REFERENCE
        raise ValueError("inside")
    assert backends.select(torch.float32, doubles) is backends.get("native")


def _step_and_undo(core: ExactMomentum, start: MomentumState, y: torch.Tensor) -> list[Any]:
    state = copy_state(start)
    out = core.advance(state, y, True, 0)
    after = copy_state(state)
    x, grad_y = core.retreat_position(state, torch.ones_like(state.velocity))
    core.retreat_velocity(state, y, True)
    return [out, after.position, after.velocity, after.store.head, x, grad_y, state.store.head]


def test_large_tensors_are_cut_into_ranges_that_give_the_same_bits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fixed = FixedPoint(torch.float32)
    core = ExactMomentum(Gamma(9, 10), fixed, backends.get("native"))
    gen = torch.Generator().manual_seed(0)
    x, v, y = (torch.randn(1001, generator=gen) for _ in range(3))
    start = core.start(fixed.to_fixed(x, "x"), fixed.to_fixed(v, "v"))
    whole = _step_and_undo(core, start, y)
    # 1001 elements in ranges of at least 100: as many as threads (cut unevenly).
    monkeypatch.setattr(native, "PARALLEL_GRAIN", 100)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        cut = _step_and_undo(core, start, y)
    finally:
        torch.set_num_threads(threads)
    assert native._pool is not None and native._pool[1] == 3
    for a, b in zip(whole, cut):
        assert torch.equal(a, b)


def test_a_process_does_not_use_a_pool_inherited_from_its_parent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A forked child inherits the parent's pool object but not its threads: work
    # sent to it would wait forever. The pool is kept per process id.
    monkeypatch.setattr(native, "_pool", None)  # restored afterwards
    parent = native._executor(2)
    assert native._executor(2) is parent
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as seen from a child
    child = native._executor(2)
    assert child is not parent
    assert child.submit(sum, [1, 2]).result(timeout=10) == 3
    parent.shutdown()
    child.shutdown()


def test_the_loops_take_the_one_product_form_only_where_their_velocity_peak_allows() -> None:
    # The C loops return the largest velocity they wrote; the next step computes
    # n v + r in one product only if d |v| stays in range, else in the split form.
    fixed = FixedPoint(torch.float64)
    gen = torch.Generator().manual_seed(0)
    for gamma, scale, direct in [(Gamma(9, 10), 1.0, True), (Gamma(1929, 15625), 1e4, False)]:
        core, reference_core = cores(backends.get("native"), gamma, fixed)
        x = torch.randn(50, generator=gen, dtype=torch.float64) * scale
        state = core.start(fixed.to_fixed(x, "x"), torch.zeros_like(x), velocity_peak=0.0)
        reference = copy_state(state)
        reference.velocity_peak = 0.0
        outputs = [torch.randn(50, generator=gen, dtype=torch.float64) * scale for _ in range(5)]
        for t, y in enumerate(outputs):
            core.advance(state, y, True, t)
            reference_core.advance(reference, y, True, t)
            assert_same_state(state, reference, f"after step {t}")
        # The reference always takes the split form, and knows no peak on the host.
        assert state.velocity_peak is not None and reference.velocity_peak is None
        assert state.direct_at == ({0, 1, 2, 3, 4} if direct else {0})
        assert not reference.direct_at
        for t in reversed(range(5)):
            core.retreat_position(state, torch.zeros_like(x))
            core.retreat_velocity(state, outputs[t], True)
            reference_core.retreat_position(reference, torch.zeros_like(x))
            reference_core.retreat_velocity(reference, outputs[t], True)
            assert_same_state(state, reference, f"after undoing step {t}")
        assert torch.count_nonzero(state.velocity) == 0
