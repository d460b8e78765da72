"""Couplings compute memcnn's equations, invert exactly and reject bad shapes clearly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    available_couplings,
    create_coupling,
)
from invertnet.couplings.additive import Add
from invertnet.couplings.base import CouplingBase, Step
from tests._core_helpers import ScaleShiftNet, TwiceCoupling

torch.manual_seed(0)


def test_additive_matches_hand_computed_equations() -> None:
    F, G = nn.Linear(3, 3), nn.Linear(3, 3)
    block = AdditiveCoupling(F, G)
    x = torch.randn(5, 6)
    x1, x2 = x[:, :3], x[:, 3:]
    y1 = x1 + F(x2)
    y2 = x2 + G(y1)
    y = block(x)
    torch.testing.assert_close(y, torch.cat([y1, y2], dim=1))
    torch.testing.assert_close(block.inverse(y), x, rtol=1e-5, atol=1e-6)


def test_affine_matches_hand_computed_equations() -> None:
    F, G = ScaleShiftNet(3), ScaleShiftNet(3)
    block = AffineCoupling(F, G)
    x = torch.randn(5, 6)
    x1, x2 = x[:, :3], x[:, 3:]
    s1, t1 = F(x2)
    y1 = x1 * s1 + t1
    s2, t2 = G(y1)
    y2 = x2 * s2 + t2
    y = block(x)
    torch.testing.assert_close(y, torch.cat([y1, y2], dim=1))
    torch.testing.assert_close(block.inverse(y), x, rtol=1e-5, atol=1e-6)


def test_naive_adapter_returns_exp_and_value() -> None:
    f = nn.Linear(4, 4)
    s, t = AffineAdapterNaive(f)(x := torch.randn(2, 4))
    torch.testing.assert_close(t, f(x))
    torch.testing.assert_close(s, torch.exp(f(x)))


def test_sigmoid_adapter_splits_odd_and_even_channels() -> None:
    f = nn.Conv2d(3, 6, 1)
    x = torch.randn(2, 3, 4, 4)
    s, t = AffineAdapterSigmoid(f)(x)
    h = f(x)
    torch.testing.assert_close(s, torch.sigmoid(h[:, 1::2] + 2))
    torch.testing.assert_close(t, h[:, 0::2])


def test_sigmoid_adapter_rejects_odd_channel_count() -> None:
    with pytest.raises(ValueError, match=r"AffineAdapterSigmoid.*even.*\(2, 3\)"):
        AffineAdapterSigmoid(nn.Linear(4, 3))(torch.randn(2, 4))


@pytest.mark.parametrize("adapter", [AffineAdapterNaive, AffineAdapterSigmoid])
def test_affine_with_adapter_uses_adapted_submodules(adapter: type[nn.Module]) -> None:
    width_out = 2 if adapter is AffineAdapterNaive else 4
    F, G = nn.Conv2d(2, width_out, 3, padding=1), nn.Conv2d(2, width_out, 3, padding=1)
    block = AffineCoupling(F, G, adapter=adapter)
    assert isinstance(block.Fm, adapter) and block.Fm.f is F and block.Gm.f is G
    x = torch.randn(2, 4, 5, 5)
    x1, x2 = x[:, :2], x[:, 2:]
    s1, t1 = adapter(F)(x2)
    y1 = x1 * s1 + t1
    s2, t2 = adapter(G)(y1)
    torch.testing.assert_close(block(x), torch.cat([y1, x2 * s2 + t2], dim=1))
    torch.testing.assert_close(block.inverse(block(x)), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda F: AdditiveCoupling(F),
        lambda F: AffineCoupling(F, adapter=AffineAdapterNaive),
        lambda F: create_coupling(F, coupling="affine", adapter=AffineAdapterNaive),
    ],
    ids=["additive", "affine", "factory-affine"],
)
def test_default_Gm_is_an_independent_deep_copy(make) -> None:
    F = nn.Linear(3, 3)
    block = make(F)
    G = block.Gm.f if isinstance(block.Gm, AffineAdapterNaive) else block.Gm
    assert G is not F
    for pf, pg in zip(F.parameters(), G.parameters()):
        assert pf.data_ptr() != pg.data_ptr()
        torch.testing.assert_close(pf, pg)
    with torch.no_grad():
        F.weight.add_(1.0)
    assert not torch.equal(F.weight, G.weight)
    # Distinct parameters: both appear in the coupling's parameter list.
    assert len(list(block.parameters())) == 4


@pytest.mark.parametrize(
    "coupling", [AdditiveCoupling, lambda F: AffineCoupling(F, adapter=AffineAdapterNaive)]
)
def test_odd_size_along_split_dim_names_coupling_dim_and_shape(coupling) -> None:
    block = coupling(nn.Linear(3, 3))
    name = type(block).__name__
    with pytest.raises(ValueError, match=rf"{name}.*split_dim=1.*\(2, 5\)"):
        block(torch.randn(2, 5))
    with pytest.raises(ValueError, match=rf"{name}.*split_dim=1.*\(2, 5\)"):
        block.inverse(torch.randn(2, 5))


@pytest.mark.parametrize("which", ["Fm", "Gm"])
def test_submodule_output_shape_mismatch_is_a_value_error(which: str) -> None:
    good, bad = nn.Linear(3, 3), nn.Linear(3, 4)
    block = AdditiveCoupling(bad, good) if which == "Fm" else AdditiveCoupling(good, bad)
    with pytest.raises(ValueError) as info:
        block(torch.randn(2, 6))
    message = str(info.value)
    assert "AdditiveCoupling" in message and which in message
    assert "split_dim=1" in message and "(2, 4)" in message and "(2, 3)" in message


def test_affine_scale_shape_mismatch_is_a_value_error() -> None:
    block = AffineCoupling(nn.Linear(3, 4), adapter=AffineAdapterNaive)
    with pytest.raises(ValueError, match=r"AffineCoupling: Fm .*\(2, 3\).*\(2, 4\)"):
        block(torch.randn(2, 6))


def test_affine_without_pair_output_explains_the_adapter() -> None:
    block = AffineCoupling(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="AffineAdapterNaive"):
        block(torch.randn(2, 6))


@pytest.mark.parametrize("split_dim", [0, 2, -1])
def test_split_dim_other_than_channels(split_dim: int) -> None:
    F = nn.Tanh()
    block = AdditiveCoupling(F, split_dim=split_dim)
    x = torch.randn(4, 3, 6, 6)
    x1, x2 = torch.chunk(x, 2, dim=split_dim)
    y1 = x1 + F(x2)
    expected = torch.cat([y1, x2 + F(y1)], dim=split_dim)
    torch.testing.assert_close(block(x), expected)
    torch.testing.assert_close(block.inverse(block(x)), x, rtol=1e-5, atol=1e-6)


def test_split_dim_out_of_range_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"split_dim=3 is out of range.*\(2, 4\)"):
        AdditiveCoupling(nn.Tanh(), split_dim=3)(torch.randn(2, 4))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize(
    "make_block",
    [
        lambda: AdditiveCoupling(nn.Linear(3, 3)),
        lambda: AffineCoupling(nn.Linear(3, 3), adapter=AffineAdapterNaive),
    ],
    ids=["additive", "affine"],
)
def test_pair_form_equals_split_form(make_block: Callable[[], nn.Module], seed: int) -> None:
    # Built and fed under a seed of its own: an unseeded block drew its weights from
    # whatever state the tests before it left, and some float32 draws give the naive
    # affine scale exp(h) values far from 1, whose inverse loses more than the
    # tolerance. The round trip is checked in float64, where rounding is far below
    # it whatever the draw; the pair and split forms are compared in float32 too.
    torch.manual_seed(seed)
    block = make_block()
    x = torch.randn(4, 6)
    y1, y2 = block(x[:, :3], x[:, 3:])
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), block(x))
    block, x = block.double(), x.double()
    y1, y2 = block(x[:, :3], x[:, 3:])
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), block(x))
    x1, x2 = block.inverse(y1, y2)
    torch.testing.assert_close(torch.cat([x1, x2], dim=1), x, rtol=1e-10, atol=1e-12)


def test_three_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="AdditiveCoupling takes one tensor.*got 3 inputs"):
        AdditiveCoupling(nn.Tanh())(*torch.randn(3, 2, 2))


def test_create_coupling_builds_the_named_coupling() -> None:
    F, G = nn.Linear(2, 2), nn.Linear(2, 2)
    additive = create_coupling(F, G)
    assert isinstance(additive, AdditiveCoupling) and additive.Fm is F and additive.Gm is G
    affine = create_coupling(F, G, coupling="affine", adapter=AffineAdapterSigmoid)
    assert isinstance(affine, AffineCoupling) and isinstance(affine.Fm, AffineAdapterSigmoid)
    assert create_coupling(F, coupling="additive", split_dim=0).split_dim == 0


def test_create_coupling_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        create_coupling(nn.Linear(2, 2), coupling="bogus")
    message = str(info.value)
    assert "'bogus'" in message
    for name in available_couplings():
        assert name in message
    assert {"additive", "affine"} <= set(available_couplings())


def test_memcnn_implementation_arguments_warn_and_are_ignored() -> None:
    with pytest.warns(FutureWarning, match="implementation_fwd"):
        block = AdditiveCoupling(nn.Tanh(), implementation_fwd=0)
    x = torch.randn(2, 4)
    torch.testing.assert_close(block(x), AdditiveCoupling(nn.Tanh())(x))


def test_buffered_forward_and_inverse_compute_what_grad_mode_computes() -> None:
    # Without grad (a wrapper's forward) the halves are written into one buffer;
    # the rules applied must be the module's own, overridden ones included.
    torch.manual_seed(0)
    for block in (
        AdditiveCoupling(nn.Linear(3, 3)),
        AffineCoupling(nn.Linear(3, 3), adapter=AffineAdapterNaive),
        TwiceCoupling(nn.Linear(3, 3)),
    ):
        x = torch.randn(4, 6)
        with torch.enable_grad():
            y_graph, x_graph = block(x), block.inverse(block(x))
        with torch.no_grad():
            y, x_back = block(x), block.inverse(block(x))
        assert torch.equal(y, y_graph.detach()) and torch.equal(x_back, x_graph.detach())
        torch.testing.assert_close(x_back, x)


class _ScaledAdd(Add):
    """``a + m`` whose vjp (deliberately) reads ``a``, overriding Add's, which does not."""

    def vjp(self, a: torch.Tensor, m: torch.Tensor, grad: torch.Tensor):
        assert a is not None, "vjp was called without a"
        return grad * torch.ones_like(a), grad


class _ScaledAddCoupling(CouplingBase):
    def __init__(self, Fm: nn.Module, Gm: nn.Module) -> None:
        super().__init__()
        self.Fm, self.Gm = Fm, Gm

    def steps(self) -> tuple[Step, ...]:
        return (Step(0, 1, "Fm", _ScaledAdd()), Step(1, 0, "Gm", _ScaledAdd()))


def test_a_combine_whose_vjp_reads_a_gets_it_even_when_its_parent_says_it_does_not() -> None:
    torch.manual_seed(0)
    coupling = _ScaledAddCoupling(nn.Linear(3, 3), nn.Linear(3, 3))
    x = torch.randn(4, 6, requires_grad=True)
    y = coupling(x)
    (grad_y,) = torch.autograd.grad(y.square().sum(), [x])
    outputs, grads = (y.detach(),), (2 * y.detach(),)
    params = tuple(coupling.parameters())
    (x_back,), (grad_x,), _ = coupling.inverse_and_vjp(outputs, grads, params)
    torch.testing.assert_close(x_back, x.detach())
    torch.testing.assert_close(grad_x, grad_y)


@pytest.mark.parametrize("apart", [True, False], ids=["two-halves", "one-tensor"])
def test_out_entries_given_as_callables_are_called_once_and_written(apart: bool) -> None:
    torch.manual_seed(0)
    coupling = AdditiveCoupling(nn.Linear(3, 3), nn.Linear(3, 3))
    xs = (torch.randn(4, 3), torch.randn(4, 3)) if apart else (torch.randn(4, 6),)
    ys = coupling(*xs)
    ys = ys if apart else (ys,)
    grads = tuple(torch.ones_like(y) for y in ys)
    buffers = [torch.full_like(x, float("nan")) for x in xs]
    calls = [0] * len(xs)

    def taker(k: int):
        def take() -> torch.Tensor:
            calls[k] += 1
            return buffers[k]

        return take

    params = tuple(coupling.parameters())
    inputs, _, _ = coupling.inverse_and_vjp(
        ys, grads, params, out=[taker(k) for k in range(len(xs))]
    )
    assert calls == [1] * len(xs)
    for got, buffer, x in zip(inputs, buffers, xs):
        assert got is buffer
        torch.testing.assert_close(buffer, x)
