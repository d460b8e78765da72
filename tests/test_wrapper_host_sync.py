"""A training step of wrapped blocks reads no tensor value on the host per block."""

from __future__ import annotations

import math
import weakref

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
from invertnet.couplings import Step
from invertnet.couplings.additive import Add
from invertnet.wrappers import _finite
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


@pytest.mark.parametrize("kind, reads", [("affine", 1), ("generic", 1), ("additive", 0)])
def test_a_step_reads_the_device_once_whatever_the_depth(kind: str, reads: int) -> None:
    # One read per backward pass: the NaN/Inf check of all the reconstructions. An
    # additive coupling's inverse cannot create NaN or Inf: nothing to check or read.
    assert _step_reads(kind, 2) == _step_reads(kind, 12) == reads


@pytest.mark.parametrize("kind", ["affine", "generic"])
def test_without_the_finite_check_a_step_reads_nothing(kind: str) -> None:
    set_finite_check(False)
    try:
        assert _step_reads(kind, 12) == 0
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
    assert sum(reads.values()) == 1  # all the sums of the pass, read at once


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
    assert sum(reads.values()) == 1


def _record(total: float, *outputs: float) -> _finite._Record:
    x = torch.full((3,), total)
    return _finite._Record(
        name="w",
        index=0,
        total=x.sum(),
        outputs_totals=tuple(torch.tensor(o) for o in outputs),
        numel=3,
        reconstructed=weakref.ref(x),
    )


@pytest.mark.parametrize(
    "records, at_fault",
    [
        ([_record(1.0, 2.0, 3.0), _record(4.0), _record(5.0, 6.0)], False),
        # Not finite, but so was one of the outputs it came from: not at fault.
        ([_record(1.0, 2.0), _record(math.nan, 3.0, math.inf)], False),
        ([_record(1.0, 2.0), _record(math.nan, 3.0, 4.0)], True),
        ([_record(math.inf)], True),  # no floating outputs: a non-finite result is a fault
        ([_record(-math.inf, 1.0), _record(2.0, 3.0, 4.0)], True),
    ],
)
def test_the_device_side_check_flags_exactly_what_the_host_check_does(
    records: list, at_fault: bool
) -> None:
    # The accelerator path (a device-side assert, which raises at once on the CPU)
    # and the CPU path (one read) decide alike, whatever the records' output counts.
    assert any(_finite._faults_read_on_host(records)) is at_fault
    if at_fault:
        with pytest.raises(RuntimeError, match="rebuilt an input with NaN/Inf"):
            _finite._assert_no_fault_on_device(records, torch.device("cpu"))
    else:
        _finite._assert_no_fault_on_device(records, torch.device("cpu"))


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
    h = x * 1  # an activation, as inside a model: rebuilt (the caller's leaf is hidden)
    with _RecordOps() as recorded:
        net(h).sum().backward()
    half = x.numel() // 2
    copies = [
        (op, n)
        for op, n in recorded.ops
        if op in ("aten.cat", "aten.copy_", "aten.clone", "aten._to_copy", "aten.stack")
        and n >= half
    ]
    assert copies == [("aten.copy_", half)] * half_copies
    assert x.grad is not None and x.shape == (32, 8)
    # The loss, and for the affine rule the finite check: one reduction per
    # reconstructed input and one for the last block's output (additive blocks
    # need no check). The other sums are the Linear layers' bias gradients.
    finite_check_sums = 4 + 1 if kind == "affine" else 0
    scalar_sums = sum(1 for op, n in recorded.ops if op == "aten.sum" and n == 1)
    del h
    assert scalar_sums == 1 + finite_check_sums


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


def _two_stream_sums(kinds: list[str]) -> int:
    """How many sums over a half-sized tensor one backward pass through wrapped
    couplings of ``kinds`` (on two tensors, as a RevNet stack carries its halves)
    takes."""
    torch.manual_seed(0)
    blocks = []
    for kind in kinds:
        net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh())
        coupling = (
            AdditiveCoupling(net)
            if kind == "additive"
            else AffineCoupling(net, adapter=AffineAdapterNaive)
        )
        blocks.append(InvertibleModuleWrapper(coupling))
    x1, x2 = torch.randn(32, 4, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    a, b = x1 * 1.0, x2 * 1.0
    for block in blocks:
        a, b = block(a, b)
    loss = torch.cat((a, b), dim=1).square().mean()
    with _CountReductions(numel=32 * 4) as sums:
        loss.backward()
    assert x1.grad is not None and x2.grad is not None
    return sums.count


def test_the_finite_check_reduces_each_activation_once() -> None:
    # Each restored input is summed once, and a block's outputs (the next block's
    # restored inputs) reuse those sums; only the last block's outputs are summed
    # on their own.
    assert _two_stream_sums(["affine"] * 4) == 2 * 4 + 2


def test_additive_blocks_are_not_checked_and_their_neighbours_sum_their_own_outputs() -> None:
    # Additive blocks add no sum; an affine block below one sums its own outputs.
    assert _two_stream_sums(["additive"] * 4) == 0
    assert _two_stream_sums(["affine", "additive", "affine", "additive"]) == 2 * 2 + 2 * 2


class _Zeros(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class _DividingAdd(Add):
    """A subclass that changes the rule but not ``keeps_finite``: ``a' = a + m``,
    inverted as ``(a' - m) / 0`` to make the inverse create NaN/Inf."""

    def invert(self, a_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (a_new - m) / 0.0

    def invert_into(self, a_new, m, out):
        return torch.div(a_new - m, 0.0, out=out)


class _DividingCoupling(AdditiveCoupling):
    def steps(self):
        return (Step(0, 1, "Fm", _DividingAdd()), Step(1, 0, "Gm", _DividingAdd()))


def test_a_combine_that_redefines_its_inverse_is_checked_again() -> None:
    coupling = _DividingCoupling(_Zeros())
    assert AdditiveCoupling(_Zeros()).reconstruction_keeps_finite()
    assert not coupling.reconstruction_keeps_finite()
    x = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(ReconstructionError, match="reconstructed input 0 contains"):
        # An activation (x * 1) is rebuilt; the caller's own leaf would be handed back.
        InvertibleModuleWrapper(coupling)(x * 1).sum().backward()
