"""MomentumCoupling: interchangeable with the other couplings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from invertnet import (
    InvertibleModuleWrapper,
    MomentumCoupling,
    available_couplings,
    create_coupling,
    is_invertible_module,
)


class _Counted(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.conv(x))


def test_forward_is_the_momentum_step() -> None:
    torch.manual_seed(0)
    f = nn.Linear(3, 3)
    block = MomentumCoupling(f, gamma=0.8)
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    out = block(torch.cat([x, v], dim=1))
    v_new = 0.8 * v + 0.2 * f(x)
    torch.testing.assert_close(out, torch.cat([x + v_new, v_new], dim=1))
    # The same on an (x, v) pair.
    x2, v2 = block(x, v)
    torch.testing.assert_close(x2, x + v_new)
    torch.testing.assert_close(v2, v_new)
    y = block.inverse(x2, v2)
    torch.testing.assert_close(y[0], x, atol=1e-6, rtol=0)
    torch.testing.assert_close(y[1], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gamma", [0.99, 0.9, 0.5, 1.0])
def test_passes_the_invertibility_check(gamma: float) -> None:
    block = MomentumCoupling(nn.Conv2d(2, 2, 3, padding=1), gamma=gamma)
    assert is_invertible_module(block, test_input_shape=(2, 4, 5, 5), atol=1e-5)
    pair = MomentumCoupling(nn.Linear(3, 3), gamma=gamma)
    assert is_invertible_module(pair, test_input_shape=((2, 3), (2, 3)), atol=1e-5)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_wrapped_with_freed_input_matches_plain_autograd(dtype: torch.dtype, rtol: float) -> None:
    torch.manual_seed(0)
    blocks = [MomentumCoupling(_Counted(3), gamma=0.9).to(dtype) for _ in range(4)]
    plain = nn.Sequential(
        *[InvertibleModuleWrapper(copy.deepcopy(b), disable=True) for b in blocks]
    )
    light = nn.Sequential(*[InvertibleModuleWrapper(b, keep_input=False) for b in blocks])
    x = torch.randn(2, 6, 5, 5, dtype=dtype, requires_grad=True)
    # The wrapper frees the input, so each net gets a copy it may consume.
    x_light = x.detach().clone().requires_grad_(True)
    h = x_light * 1.0  # an intermediate the first wrapper can free
    y_light = light(h)
    assert h.numel() == 0 and h.untyped_storage().nbytes() == 0  # freed until backward
    y_plain = plain(x)
    torch.testing.assert_close(y_light, y_plain, rtol=rtol, atol=rtol)

    loss_plain = (y_plain * y_plain.detach().sin()).sum()
    loss_light = (y_light * y_light.detach().sin()).sum()
    grads_plain = torch.autograd.grad(loss_plain, [x, *plain.parameters()])
    grads_light = torch.autograd.grad(loss_light, [x_light, *light.parameters()])
    for a, b in zip(grads_plain, grads_light):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * a.abs().max().item())
    assert h.shape == (2, 6, 5, 5)  # restored


def test_backward_evaluates_fm_once() -> None:
    torch.manual_seed(0)
    f = _Counted(2)
    block = InvertibleModuleWrapper(MomentumCoupling(f, gamma=0.9), keep_input=False)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    h = x * 2.0
    y = block(h)
    assert f.calls == 1
    y.sum().backward()
    assert f.calls == 2  # one evaluation serves both the inverse and the gradient
    assert x.grad is not None and x.grad.shape == x.shape


def test_create_coupling_builds_it() -> None:
    assert "momentum" in available_couplings()
    block = create_coupling(nn.Linear(3, 3), coupling="momentum", gamma=0.7, split_dim=1)
    assert isinstance(block, MomentumCoupling) and block.gamma == 0.7
    with pytest.raises(ValueError, match="takes one sub-module Fm"):
        create_coupling(nn.Linear(3, 3), nn.Linear(3, 3), coupling="momentum")
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\]"):
        create_coupling(nn.Linear(3, 3), coupling="momentum", gamma=0.0)


@pytest.mark.parametrize("gamma", [0.0, -0.5, 1.5, float("nan")])
def test_bad_gamma(gamma: float) -> None:
    with pytest.raises(ValueError, match=r"MomentumCoupling: gamma must be in \(0, 1\]"):
        MomentumCoupling(nn.Linear(3, 3), gamma=gamma)


def test_gamma_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="gamma must be a real number"):
        MomentumCoupling(nn.Linear(3, 3), gamma=None)  # type: ignore[arg-type]


def test_shape_changing_fm_is_reported() -> None:
    block = MomentumCoupling(nn.Linear(3, 2), gamma=0.9)
    with pytest.raises(ValueError, match="Fm maps a half of shape"):
        block(torch.randn(2, 6))


def test_float_inverse_loses_precision_with_depth_as_documented() -> None:
    # The docstring's table: at gamma 0.5 float32 reconstruction fails within 50
    # blocks, while at gamma 0.99 it stays accurate.
    def error(gamma: float, depth: int) -> float:
        torch.manual_seed(0)
        blocks = [
            MomentumCoupling(nn.Sequential(nn.Linear(16, 16), nn.Tanh()), gamma=gamma)
            for _ in range(depth)
        ]
        x = torch.randn(8, 32)
        with torch.no_grad():
            y = x
            for b in blocks:
                y = b(y)
            for b in reversed(blocks):
                y = b.inverse(y)
        return ((y - x).norm() / x.norm()).item()

    assert error(0.99, 50) < 1e-4
    assert not error(0.5, 50) < 1e-1
