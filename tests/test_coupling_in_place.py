"""The coupling engine writes results over tensors that nothing else holds, and
over those alone, and differentiates only what a wanted gradient needs.

Without a graph (a wrapper's forward, inference), a step's result is written over
its sub-module's fresh output; in the fused backward, the gradient with respect to
a step's source is accumulated into the tensor autograd returned. Both are decided
by reference counts (``held_only_by_caller``), so CI runs this file under the
oldest and the newest PyTorch release accepted.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    InvertibleModuleWrapper,
    MomentumCoupling,
)
from invertnet.couplings import base
from invertnet.couplings.additive import Add
from invertnet.couplings.base import Step, _source_gradients_needed
from tests._core_helpers import TwiceCoupling


@pytest.fixture(autouse=True)
def _write_over_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine writes over tensors of _WRITE_OVER_MIN_BYTES or more; these tests
    # check which tensors it may write over, on small ones.
    monkeypatch.setattr(base, "_WRITE_OVER_MIN_BYTES", 0)


def test_tensors_below_the_size_limit_are_not_written_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Below the limit a new tensor costs less than counting references.
    torch.manual_seed(0)
    monkeypatch.setattr(base, "_WRITE_OVER_MIN_BYTES", 4 * 4 * 4)
    for rows, written_over in ((3, False), (4, True)):  # 48 and 64 bytes of float32
        coupling = AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4))
        addresses: list[int] = []
        _record_output_addresses(coupling.Fm, addresses)
        _record_output_addresses(coupling.Gm, addresses)
        with torch.no_grad():
            y1, y2 = coupling(torch.randn(rows, 4), torch.randn(rows, 4))
        assert ([y1.data_ptr(), y2.data_ptr()] == addresses) is written_over


def _record_output_addresses(module: nn.Module, found: list[int]) -> None:
    # Addresses only: keeping the outputs would hold them, and so prevent the write.
    module.register_forward_hook(lambda m, args, out: found.append(out.data_ptr()))


def test_a_result_without_graph_is_written_over_the_sub_module_output() -> None:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4))
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    with torch.enable_grad():
        want = coupling(x1, x2)
    addresses: list[int] = []
    _record_output_addresses(coupling.Fm, addresses)
    _record_output_addresses(coupling.Gm, addresses)
    with torch.no_grad():
        y1, y2 = coupling(x1, x2)
    assert [y1.data_ptr(), y2.data_ptr()] == addresses
    assert torch.equal(y1, want[0].detach()) and torch.equal(y2, want[1].detach())

    addresses.clear()
    with torch.no_grad():
        back1, back2 = coupling.inverse(y1, y2)
    # The inverse evaluates G first: x2 = y2 - G(y1), then x1 = y1 - F(x2).
    assert [back2.data_ptr(), back1.data_ptr()] == addresses
    torch.testing.assert_close((back1, back2), (x1, x2))


def test_a_wrapper_forward_writes_its_outputs_over_the_sub_module_outputs() -> None:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4))
    addresses: list[int] = []
    _record_output_addresses(coupling.Fm, addresses)
    wrapper = InvertibleModuleWrapper(coupling)
    x1, x2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    y1, _ = wrapper(x1.clone(), x2.clone())
    assert y1.data_ptr() == addresses[0]


class _Stash(nn.Module):
    """Keeps its last output, as a module caching activations does."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.inner(x)
        return self.last


class _ReturnsBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("constant", torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.constant


class _KeepsAlias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.alias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        self.alias = out.detach()  # another tensor over the same memory
        return out


class _ReturnsView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (2 * x).view(x.shape)


def _hooked_linear() -> tuple[nn.Module, list[torch.Tensor]]:
    kept: list[torch.Tensor] = []
    module = nn.Linear(4, 4)
    module.register_forward_hook(lambda m, args, out: kept.append(out))
    return module, kept


@pytest.mark.parametrize("kind", ["stash", "buffer", "alias", "identity", "view", "hook"])
def test_an_output_held_elsewhere_is_not_written_over(kind: str) -> None:
    torch.manual_seed(0)
    kept: list[torch.Tensor] = []
    if kind == "hook":
        F, kept = _hooked_linear()
    else:
        F = {
            "stash": _Stash,
            "buffer": _ReturnsBuffer,
            "alias": _KeepsAlias,
            "identity": nn.Identity,
            "view": _ReturnsView,
        }[kind]()
    coupling = AdditiveCoupling(F, nn.Linear(4, 4))
    x1, x2 = torch.randn(3, 4), torch.randn(3, 4)
    x2_before = x2.clone()
    with torch.enable_grad():
        want = coupling(x1, x2)
        F_of_x2 = F(x2).detach().clone()
    kept.clear()
    with torch.no_grad():
        y1, y2 = coupling(x1, x2)
    assert torch.equal(y1, want[0].detach()) and torch.equal(y2, want[1].detach())
    # Whatever held F's output still sees F's output; the input is untouched.
    assert torch.equal(x2, x2_before)
    held = {
        "stash": lambda: F.last,
        "buffer": lambda: F.constant,
        "alias": lambda: F.alias,
        "hook": lambda: kept[0],
    }.get(kind)
    if held is not None:
        assert torch.equal(held(), F_of_x2)


@pytest.mark.parametrize("F", [nn.Identity(), _ReturnsView()], ids=["identity", "view"])
def test_a_gradient_passed_through_a_sub_module_is_not_accumulated_into(F: nn.Module) -> None:
    # Through an identity (or a view), autograd returns the incoming gradient itself
    # (or a view of it) as the source's gradient: writing the sum over it would
    # change the incoming gradient, which the caller still holds.
    torch.manual_seed(0)
    coupling = AdditiveCoupling(F, nn.Linear(4, 4))
    reference = copy.deepcopy(coupling)
    x1, x2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    g1, g2 = torch.randn(3, 4), torch.randn(3, 4)
    g1_before, g2_before = g1.clone(), g2.clone()

    y = InvertibleModuleWrapper(coupling)(x1.detach().clone().requires_grad_(), x2)
    torch.autograd.backward(y, (g1, g2))
    want_x2 = torch.autograd.grad(reference(x1, x2), [x2], (g1_before, g2_before))[0]

    assert torch.equal(g1, g1_before) and torch.equal(g2, g2_before)
    torch.testing.assert_close(x2.grad, want_x2)
    for p, q in zip(coupling.parameters(), reference.parameters()):
        torch.testing.assert_close(
            p.grad, torch.autograd.grad(reference(x1, x2), [q], (g1_before, g2_before))[0]
        )


def _out_of_place_adds(run) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::add")


def test_the_fused_backward_accumulates_source_gradients_in_place() -> None:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4))
    wrapper = InvertibleModuleWrapper(coupling)
    x1, x2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    y1, y2 = wrapper(x1.clone(), x2.clone())
    loss = y1.square().sum() + y2.square().sum()
    # Both source gradients (dL/dy1 through G, dL/dx2 through F) are sums; each is
    # written over the gradient autograd returned, not into a new tensor.
    assert _out_of_place_adds(loss.backward) == 0
    reference = copy.deepcopy(coupling)
    for p in reference.parameters():
        p.grad = None
    r1, r2 = reference(x1, x2)
    want = torch.autograd.grad(r1.square().sum() + r2.square().sum(), [x1, x2])
    torch.testing.assert_close((x1.grad, x2.grad), want)


ADDITIVE_STEPS = (Step(0, 1, "Fm", Add()), Step(1, 0, "Gm", Add()))


@pytest.mark.parametrize(
    ("part_needs", "has_params", "wanted"),
    [
        ((False, False), True, (False, True)),  # G's source feeds F's parameters
        ((False, False), False, (False, False)),
        ((True, False), True, (False, True)),
        ((False, True), False, (True, True)),  # x2's gradient also runs through G
        ((True, True), False, (True, True)),
    ],
)
def test_which_source_gradients_the_fused_backward_needs(part_needs, has_params, wanted) -> None:
    assert _source_gradients_needed(ADDITIVE_STEPS, part_needs, has_params) == wanted


def _sources_requiring_grad_in_backward(x_requires_grad: bool) -> tuple[list, list]:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4))
    seen: list[tuple[str, bool]] = []
    for name in ("Fm", "Gm"):
        getattr(coupling, name).register_forward_pre_hook(
            lambda m, args, name=name: seen.append((name, args[0].requires_grad))
        )
    x1, x2 = (torch.randn(3, 4, requires_grad=x_requires_grad) for _ in range(2))
    y1, y2 = InvertibleModuleWrapper(coupling)(x1.clone(), x2.clone())
    seen.clear()  # the forward pass evaluates without grad
    (y1.square().sum() + y2.square().sum()).backward()
    return seen, [p.grad for p in coupling.parameters()]


def test_a_first_block_input_that_needs_no_gradient_is_not_differentiated() -> None:
    seen, grads = _sources_requiring_grad_in_backward(x_requires_grad=False)
    # G's source y1 still needs one (F's parameters), F's source x2 does not.
    assert seen == [("Gm", True), ("Fm", False)]
    seen_all, grads_all = _sources_requiring_grad_in_backward(x_requires_grad=True)
    assert seen_all == [("Gm", True), ("Fm", True)]
    # The parameters' gradients are the same, to the bit.
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_all))


def test_inputs_need_grad_gives_none_for_an_input_not_wanted() -> None:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = coupling(x)
    params = tuple(coupling.parameters())
    (x_back,), grad_inputs, grad_params = coupling.inverse_and_vjp(
        (y,), (torch.ones_like(y),), params, inputs_need_grad=(False,)
    )
    assert grad_inputs == (None,)
    torch.testing.assert_close(x_back, x)
    assert all(g is not None for g in grad_params)


def test_inputs_need_grad_of_the_wrong_length_is_a_value_error() -> None:
    coupling = AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4))
    y = torch.randn(3, 8)
    with pytest.raises(ValueError, match="inputs_need_grad has 2 entries for 1 outputs"):
        coupling.inverse_and_vjp((y,), (y,), (), inputs_need_grad=(True, False))


@pytest.mark.parametrize("make", [AdditiveCoupling, AffineCoupling], ids=["additive", "affine"])
def test_a_batch_input_is_reconstructed_beside_a_sub_module_that_saved_its_source(make) -> None:
    # A single tensor's halves share its memory. The affine rule's gradients read the
    # reconstructed half, written into that memory while F's graph holds the other
    # half (Linear saves its input for the weight's gradient): F's source must be an
    # alias with a version counter of its own even when it needs no gradient.
    torch.manual_seed(0)
    kwargs = {"adapter": AffineAdapterNaive} if make is AffineCoupling else {}
    coupling = make(nn.Linear(4, 4), nn.Linear(4, 4), **kwargs).double()
    reference = copy.deepcopy(coupling)
    x = torch.randn(3, 8, dtype=torch.float64)
    InvertibleModuleWrapper(coupling)(x.clone()).square().sum().backward()
    reference(x).square().sum().backward()
    for p, q in zip(coupling.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "make",
    [
        lambda: AdditiveCoupling(nn.Linear(4, 4), nn.Linear(4, 4)),
        lambda: MomentumCoupling(nn.Linear(4, 4), gamma=0.9),
        lambda: MomentumCoupling(nn.Linear(4, 4), gamma=0.3),
        lambda: TwiceCoupling(nn.Linear(4, 4), nn.Linear(4, 4)),
    ],
    ids=["additive", "momentum-0.9", "momentum-0.3", "overridden-rule"],
)
def test_results_written_over_m_are_those_of_the_rules_to_the_bit(make, dtype) -> None:
    torch.manual_seed(0)
    coupling = make().to(dtype)
    x1, x2 = torch.randn(5, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    with torch.enable_grad():  # a graph is recorded: new tensors, the rules themselves
        want = [t.detach() for t in coupling(x1, x2)]
        want_back = [t.detach() for t in coupling.inverse(*want)]
    with torch.no_grad():
        got = coupling(x1, x2)
        got_back = coupling.inverse(*got)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(torch.equal(g, w) for g, w in zip(got_back, want_back))
