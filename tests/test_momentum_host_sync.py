"""A training step of MomentumNet(use_backprop=False) reads no tensor value on the host per layer.

On a GPU every such read (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``...)
waits for the device. The methods are patched on ``torch.Tensor`` for the
duration of one step and their calls counted: a ``TorchFunctionMode`` would not
see the backward, which autograd's engine runs outside it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invertnet import MomentumNet
from invertnet.momentum.fixed_point import (
    LIMIT,
    FixedPoint,
    RangeCheck,
    _assert_in_range_on_device,
)
from tests._host_reads import count_host_reads


def _net(depth: int, init: bool) -> MomentumNet:
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(depth)]
    return MomentumNet(
        functions,
        gamma=0.9,
        use_backprop=False,
        init_speed=init,
        init_function=nn.Linear(8, 8) if init else None,
    )


def _reads_in_a_step(depth: int, init: bool) -> int:
    net = _net(depth, init)
    x = torch.randn(4, 8, requires_grad=True)
    net(x).square().sum().backward()  # a first step: allocations, caches
    with count_host_reads() as counts:
        net(x).square().sum().backward()
    return sum(counts.values())


@pytest.mark.parametrize("init", [False, True])
def test_host_reads_per_step_do_not_grow_with_depth(exact_path: str, init: bool) -> None:
    shallow, deep = _reads_in_a_step(4, init), _reads_in_a_step(16, init)
    assert shallow == deep
    # One transfer per forward pass at most, for the range check; none on the C
    # loops' path, which returns the magnitudes it met.
    assert deep <= 1


def test_the_counter_sees_reads_in_backward() -> None:
    # The patching works where a TorchFunctionMode would not: inside backward.
    class Reads(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
            grad.sum().item()
            return grad

    x = torch.ones(3, requires_grad=True)
    with count_host_reads() as counts:
        Reads.apply(x).sum().backward()
    assert counts["item"] == 1


def test_overflow_is_still_reported_with_its_layer(exact_path: str) -> None:
    class Grows(nn.Module):
        def __init__(self, at: float) -> None:
            super().__init__()
            self.at = at

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, self.at)

    # Layer 3 returns a value whose update is out of range; the later layers run
    # on it, but the error names layer 3 and its magnitude.
    functions = [Grows(1.0)] * 3 + [Grows(1e7)] + [Grows(1.0)] * 4
    net = MomentumNet(functions, gamma=0.9, use_backprop=False)
    x = torch.zeros(2, 5, requires_grad=True)
    expected = r"\(1 - gamma\) \* f_3\(x_3\) reaches magnitude 1e\+06"
    with pytest.raises(OverflowError, match=expected):
        net(x)
    nan = MomentumNet([Grows(1.0), Grows(float("nan"))], gamma=0.9, use_backprop=False)
    with pytest.raises(OverflowError, match=r"f_1\(x_1\) reaches magnitude nan"):
        nan(x)


def test_an_error_of_a_later_function_names_the_value_out_of_range(exact_path: str) -> None:
    class Strict(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.abs().max() > 1e3:  # a function that fails on what it is given
                raise ValueError("input too large")
            return x

    class Push(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, 1e7)

    net = MomentumNet([Push(), Strict()], gamma=0.0, use_backprop=False)
    with pytest.raises(OverflowError, match=r"f_0\(x_0\) reaches") as caught:
        net(torch.zeros(3, requires_grad=True))
    assert isinstance(caught.value.__cause__, ValueError)


def _records(*values: float, scale: float = 1.0) -> RangeCheck:
    checks = RangeCheck(FixedPoint(torch.float32))
    for v in values:
        checks.measure("v", torch.tensor([v, -v / 2]), scale)
    checks.measure("w", torch.tensor([1.0], dtype=torch.float64))  # another dtype
    return checks


@pytest.mark.parametrize(
    "values, scale, in_range",
    [
        ((1.0, -3.0), 1.0, True),
        ((LIMIT / 4,), 2.0, True),
        ((LIMIT / 4,), 4.0, False),  # exactly the limit, in units: out of range
        ((1.0, -LIMIT * 2), 1.0, False),
        ((1.0, float("nan")), 1.0, False),
        ((float("inf"),), 1.0, False),
    ],
)
def test_the_device_side_range_check_decides_as_the_host_one(
    values: tuple[float, ...], scale: float, in_range: bool
) -> None:
    # The accelerator path (a device-side assert, which raises at once on the CPU)
    # and the host path (one read, OverflowError) agree on every record.
    host, device = _records(*values, scale=scale), _records(*values, scale=scale)
    if in_range:
        host.check()
        _assert_in_range_on_device(device._records, device.fixed)
    else:
        with pytest.raises(OverflowError):
            host.check()
        with pytest.raises(RuntimeError, match="beyond the .* that exact reversal supports"):
            _assert_in_range_on_device(device._records, device.fixed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_never_waits_for_the_device() -> None:
    net = _net(8, init=True).cuda()
    x = torch.randn(4, 8, device="cuda", requires_grad=True)
    net(x).square().sum().backward()  # a first step: allocations, caches
    torch.cuda.set_sync_debug_mode("error")
    try:
        net(x).square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None
