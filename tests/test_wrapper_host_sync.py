"""A training step of wrapped blocks reads no tensor value on the host per block."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    InvertibleModuleWrapper,
    ReconstructionError,
    set_finite_check,
)
from tests._core_helpers import TwoWay
from tests._host_reads import count_host_reads


def _block(kind: str) -> nn.Module:
    if kind == "additive":
        return AdditiveCoupling(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    if kind == "affine":
        return AffineCoupling(nn.Linear(4, 4), adapter=AffineAdapterNaive)
    return TwoWay(8)


def _chain(kind: str, depth: int) -> nn.Sequential:
    torch.manual_seed(depth)
    return nn.Sequential(*[InvertibleModuleWrapper(_block(kind)) for _ in range(depth)])


def _step_reads(kind: str, depth: int) -> int:
    net = _chain(kind, depth)
    n_in = 2 if kind == "generic" else 1
    xs = [torch.randn(5, 8, requires_grad=True) for _ in range(n_in)]
    with count_host_reads() as reads:
        out = xs[0]
        if kind == "generic":
            a, b = xs
            for blk in net:
                a, b = blk(a, b)
            out = a + b
        else:
            out = net(out)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    assert all(x.grad is not None for x in xs)
    assert all(x.shape == (5, 8) for x in xs)  # freed and restored
    return sum(reads.values())


@pytest.mark.parametrize("kind", ["additive", "affine", "generic"])
def test_a_step_reads_the_device_once_whatever_the_depth(kind: str) -> None:
    # One read per backward pass: the NaN/Inf check of all the reconstructions.
    assert _step_reads(kind, 2) == _step_reads(kind, 12) == 1


def test_without_the_finite_check_a_step_reads_nothing() -> None:
    set_finite_check(False)
    try:
        assert _step_reads("additive", 12) == 0
    finally:
        set_finite_check(True)


class _Scale(nn.Module):
    """Multiplies by a learnable factor; a zero factor makes the inverse 0/0."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.factor


def test_the_deferred_check_names_the_first_faulty_block_in_backward_order() -> None:
    # Block 1's inverse yields NaN (0/0); block 0's reconstruction then is NaN too,
    # but its outputs (block 1's reconstruction) were not finite, so it is not blamed.
    net = nn.Sequential(
        InvertibleModuleWrapper(_Scale(2.0)),
        InvertibleModuleWrapper(_Scale(0.0)),
        InvertibleModuleWrapper(_Scale(3.0)),
    )
    x = torch.randn(4, 6, requires_grad=True)
    with count_host_reads() as reads, pytest.raises(ReconstructionError) as info:
        net(x).sum().backward()
    assert info.value.module_name == "InvertibleModuleWrapper(_Scale)"
    # Block 1's input (block 0's output) is gone by the end of backward: its
    # NaN count is unknown, and the message says what was seen instead.
    assert info.value.nonfinite == -1
    assert "sum over its 24 elements is not finite" in str(info.value)
    assert reads["__bool__"] == 1


def test_a_nested_backward_pass_is_checked_when_it_ends() -> None:
    # Reentrant checkpointing runs the wrapper's backward inside a backward pass of
    # its own, nested in the outer one; the check runs when the inner pass ends,
    # and its error comes out of the outer backward().
    from torch.utils.checkpoint import checkpoint

    inner = InvertibleModuleWrapper(_Scale(0.0))
    x = torch.randn(3, 8, requires_grad=True)
    y = checkpoint(lambda t: inner(t * 1.0), x, use_reentrant=True)
    with count_host_reads() as reads, pytest.raises(ReconstructionError) as info:
        (y * 2).sum().backward()
    assert info.value.module_name == "InvertibleModuleWrapper(_Scale)"
    assert reads["__bool__"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_never_waits_for_the_device() -> None:
    net = _chain("additive", 8).cuda()
    x = torch.randn(5, 8, device="cuda", requires_grad=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        net(x).sum().backward()  # the finite check is on: a device-side assert
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None


class _RecordOps(TorchDispatchMode):
    """Records every operator run (forward and backward) with its output's size."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        numel = out.numel() if isinstance(out, torch.Tensor) else 0
        self.ops.append((str(func.overloadpacket), numel))
        return out


@pytest.mark.parametrize("kind, half_copies", [("additive", 0), ("affine", 4)])
def test_a_step_copies_and_concatenates_no_activation(kind: str, half_copies: int) -> None:
    # The output is built in one buffer, the input reconstructed straight into its
    # freed memory and the input gradient accumulated in one buffer: no torch.cat of
    # halves, no restore copy. What remains is the arithmetic and a sum per block;
    # the affine rule's gradient of the scaled half (grad * s) is a new tensor,
    # copied into the gradient buffer: one half-sized copy per block.
    net = _chain(kind, 4)
    x = torch.randn(32, 8, requires_grad=True)
    with _RecordOps() as recorded:
        net(x).sum().backward()
    half = x.numel() // 2
    copies = [
        (op, n)
        for op, n in recorded.ops
        if op in ("aten.cat", "aten.copy_", "aten.clone", "aten._to_copy", "aten.stack")
        and n >= half
    ]
    assert copies == [("aten.copy_", half)] * half_copies
    assert x.grad is not None and x.shape == (32, 8)
    # One reduction per reconstructed input, one for the last block's output: the
    # finite check; the others are the Linear layers' bias gradients.
    assert sum(1 for op, n in recorded.ops if op == "aten.sum" and n == 1) == 4 + 1 + 1


def test_a_backward_pass_that_fails_does_not_disable_the_checks_of_later_ones() -> None:
    # The failing pass never reaches its end, where its checks would run; the next
    # pass must still get checks of its own.
    first, second = InvertibleModuleWrapper(_Scale(2.0)), InvertibleModuleWrapper(_Scale(2.0))
    h = first(torch.randn(4, 6, requires_grad=True))
    y = second(h)

    def fail(grad: torch.Tensor) -> torch.Tensor:
        raise ValueError("a failure elsewhere in the graph")

    h.register_hook(fail)  # runs after `second` queued its checks, before `first`
    with pytest.raises(ValueError, match="failure elsewhere"):
        y.sum().backward()
    bad = nn.Sequential(InvertibleModuleWrapper(_Scale(3.0)), InvertibleModuleWrapper(_Scale(0.0)))
    with pytest.raises(ReconstructionError):
        bad(torch.randn(4, 6, requires_grad=True)).sum().backward()


class _CountReductions(TorchDispatchMode):
    """Counts sums over tensors of at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) == "aten.sum" and args[0].numel() >= self.numel:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_finite_check_reduces_each_activation_once() -> None:
    # Blocks on two tensors, as in a RevNet stack carrying its halves: each restored
    # input is summed once, and a block's outputs (the next block's restored inputs)
    # reuse those sums; only the last block's outputs are summed on their own.
    torch.manual_seed(0)
    depth = 4
    blocks = [
        InvertibleModuleWrapper(
            AdditiveCoupling(nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh()))
        )
        for _ in range(depth)
    ]
    x1, x2 = torch.randn(32, 4, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    a, b = x1 * 1.0, x2 * 1.0
    for block in blocks:
        a, b = block(a, b)
    loss = torch.cat((a, b), dim=1).square().mean()
    with _CountReductions(numel=32 * 4) as sums:
        loss.backward()
    assert sums.count == 2 * depth + 2
