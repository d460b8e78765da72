"""Normalizing flows: log-determinants of every block, Flow, and memory-saving flows."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.distributions import Independent, Normal

import invertnet
from invertnet import (
    ActNorm,
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    Flow,
    InputKeptWarning,
    InvertibleConv1x1,
    InvertibleModuleWrapper,
    MomentumCoupling,
    Permutation,
    Squeeze,
    is_invertible_module,
)
from invertnet.bench.memory import SavedBytes

# -- helpers -------------------------------------------------------------------


def mlp(width: int, out: int | None = None) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, out or width))


def conv_net(channels: int, out: int, hidden: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, out, 3, padding=1)
    )


def initialised_actnorm(shape: tuple[int, ...]) -> ActNorm:
    norm = ActNorm(shape[1])
    norm.initialize(3.0 + 2.0 * torch.randn(16, *shape[1:]))
    with torch.no_grad():  # away from the exact normalisation, so nothing cancels
        norm.bias.add_(0.3 * torch.randn_like(norm.bias))
        norm.log_scale.add_(0.3 * torch.randn_like(norm.log_scale))
    return norm


def trained_conv(channels: int) -> InvertibleConv1x1:
    conv = InvertibleConv1x1(channels)
    with torch.no_grad():  # away from a rotation, whose log-determinant is 0
        for p in conv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return conv


# name -> (builder, input shape); built with the default dtype, converted after.
BLOCKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "additive": (lambda: AdditiveCoupling(mlp(2)), (3, 4)),
    "affine-naive": (lambda: AffineCoupling(mlp(2), adapter=AffineAdapterNaive), (3, 4)),
    "affine-sigmoid": (lambda: AffineCoupling(mlp(2, 4), adapter=AffineAdapterSigmoid), (3, 4)),
    "affine-conv": (
        lambda: AffineCoupling(conv_net(1, 2), adapter=AffineAdapterSigmoid),
        (2, 2, 3, 3),
    ),
    "momentum": (lambda: MomentumCoupling(mlp(3), gamma=0.7), (3, 6)),
    "actnorm": (lambda: initialised_actnorm((2, 3, 2, 2)), (2, 3, 2, 2)),
    "actnorm-features": (lambda: initialised_actnorm((3, 4)), (3, 4)),
    "conv1x1": (lambda: trained_conv(3), (2, 3, 2, 2)),
    "conv1x1-features": (lambda: trained_conv(4), (3, 4)),
    "permutation": (lambda: Permutation(5), (3, 5)),
    "squeeze": (lambda: Squeeze(), (2, 2, 4, 4)),
}


def make_block(name: str, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    build, shape = BLOCKS[name]
    block = build().to(dtype)
    x = torch.randn(shape, dtype=dtype)
    return block, x


def jacobian_log_det(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``log|det J|`` of ``block.forward`` per sample, from autograd's full Jacobian."""
    values = []
    for sample in x:
        jac = torch.autograd.functional.jacobian(
            lambda v: block(v.unsqueeze(0)).reshape(-1), sample
        )
        jac = jac.reshape(sample.numel(), sample.numel())
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0, "the Jacobian is singular"
        values.append(logabsdet)
    return torch.stack(values)


# -- 1. every block reports its log-determinant ------------------------------------


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_log_det_equals_slogdet_of_the_jacobian(name: str) -> None:
    block, x = make_block(name)
    y, log_det = block.forward_and_log_det(x)
    assert log_det.shape == (x.shape[0],)
    assert log_det.dtype == torch.float64
    torch.testing.assert_close(y, block(x), rtol=0, atol=0)
    torch.testing.assert_close(log_det, jacobian_log_det(block, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_block_is_invertible(name: str) -> None:
    block, x = make_block(name)
    assert is_invertible_module(block, tuple(x.shape), test_input_dtype=torch.float64, atol=1e-10)


def test_log_det_is_not_trivially_zero_where_it_should_not_be() -> None:
    # Guards the slogdet test against blocks that happen to preserve volume.
    for name in ("affine-naive", "affine-sigmoid", "momentum", "actnorm", "conv1x1"):
        block, x = make_block(name)
        assert block.forward_and_log_det(x)[1].abs().min() > 1e-3, name


def test_momentum_log_det_is_d_log_gamma() -> None:
    block, x = make_block("momentum")
    _, log_det = block.forward_and_log_det(x)
    torch.testing.assert_close(log_det, torch.full((3,), 3 * math.log(0.7), dtype=torch.float64))


def test_couplings_take_two_tensors_with_the_same_log_det() -> None:
    block, x = make_block("affine-naive")
    (y1, y2), log_det = block.forward_and_log_det(*x.chunk(2, dim=1))
    y, expected = block.forward_and_log_det(x)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(log_det, expected)


FUSED = [n for n in sorted(BLOCKS) if n != "additive"] + ["additive"]


@pytest.mark.parametrize("name", FUSED)
def test_fused_backward_with_log_det_matches_autograd(name: str) -> None:
    """``inverse_and_vjp_with_log_det`` rebuilds the input and gives autograd's gradients."""
    block, x = make_block(name)
    params = tuple(p for p in block.parameters())
    x = x.requires_grad_()
    y, log_det = block.forward_and_log_det(x)
    grad_y, grad_log_det = torch.randn_like(y), torch.randn_like(log_det)
    loss = (y * grad_y).sum() + (log_det * grad_log_det).sum()
    expected = torch.autograd.grad(loss, (x, *params), allow_unused=True)
    with torch.no_grad():
        (x_rebuilt,), (grad_x,), grad_params = block.inverse_and_vjp_with_log_det(
            (y.detach(),), (grad_y,), grad_log_det, params
        )
    torch.testing.assert_close(x_rebuilt, x.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_x, expected[0], rtol=1e-10, atol=1e-10)
    for got, want in zip(grad_params, expected[1:]):
        if want is None:
            assert got is None or not got.any()
        else:
            assert got is not None, "a parameter's gradient is missing"
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["actnorm", "conv1x1", "permutation", "squeeze"])
def test_new_blocks_are_fused_under_the_plain_wrapper(name: str) -> None:
    block, x = make_block(name)
    reference = copy.deepcopy(block)
    wrapped = InvertibleModuleWrapper(block)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    (wrapped(x1) ** 2).sum().backward()
    (reference(x2) ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for p, q in zip(block.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_coupling_log_det_needs_a_batch_dimension_not_split() -> None:
    block = AffineCoupling(mlp(3), adapter=AffineAdapterNaive, split_dim=0)
    with pytest.raises(ValueError, match="halves the batch dimension"):
        block.forward_and_log_det(torch.randn(6, 3))


# -- the new blocks --------------------------------------------------------------


def test_actnorm_initialises_on_the_first_batch_only() -> None:
    norm = ActNorm(3)
    x = 4.0 + 3.0 * torch.randn(256, 3, 2, 2)
    y = norm(x)
    mean, std = y.mean(dim=(0, 2, 3)), y.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-4, rtol=0)
    assert bool(norm.initialized)
    bias = norm.bias.detach().clone()
    norm(torch.randn(8, 3, 2, 2))  # a second batch changes nothing
    torch.testing.assert_close(norm.bias, bias)


def test_actnorm_state_dict_keeps_the_initialisation() -> None:
    trained = ActNorm(2)
    trained(5 + torch.randn(32, 2))
    loaded = ActNorm(2)
    loaded.load_state_dict(trained.state_dict())
    x = torch.randn(4, 2)
    torch.testing.assert_close(loaded(x), trained(x))  # no re-initialisation on x


def test_actnorm_initialisation_needs_two_values_per_channel() -> None:
    with pytest.raises(ValueError, match="at least two values per channel"):
        ActNorm(3)(torch.randn(1, 3))


@pytest.mark.parametrize(
    "block, x, match",
    [
        (ActNorm(3), torch.randn(2, 4), r"ActNorm\(3\) expects a batch of shape \(batch, 3, ...\)"),
        (InvertibleConv1x1(3), torch.randn(2, 2, 4, 4), "3 channels in dimension 1"),
        (Permutation(3), torch.randn(2, 4), "Permutation"),
        (Squeeze(), torch.randn(2, 3, 5, 4), "divisible by 2"),
        (Squeeze(), torch.randn(2, 3, 4), r"images of shape \(batch, C, H, W\)"),
    ],
)
def test_blocks_reject_bad_input(block: nn.Module, x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        block(x)


def test_bad_block_arguments() -> None:
    with pytest.raises(ValueError, match="not a permutation of 0..2"):
        Permutation([0, 0, 2])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        Permutation([0.0, 1.0])
    with pytest.raises(ValueError, match="num_channels must be a positive int"):
        InvertibleConv1x1(0)
    with pytest.raises(ValueError, match="factor must be a positive int"):
        Squeeze(1.5)  # type: ignore[arg-type]


@pytest.fixture
def float64_default() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def test_conv1x1_is_built_in_the_default_dtype(float64_default: None) -> None:
    # It stored float32 parameters next to a float64 mask: the forward pass crashed
    # ("expected m1 and m2 to have the same dtype").
    torch.manual_seed(0)
    conv = InvertibleConv1x1(4)
    assert {t.dtype for t in conv.state_dict().values()} == {torch.float64}
    x = torch.randn(3, 4, 2, 2)
    y, log_det = conv.forward_and_log_det(x)
    assert y.dtype == log_det.dtype == torch.float64
    torch.testing.assert_close(conv.inverse(y), x, rtol=1e-12, atol=1e-12)
    assert is_invertible_module(conv, (3, 4, 2, 2), atol=1e-12)
    flow = Flow(glow(2, channels=1), (1, 4, 4))  # the whole flow, memory-saving
    flow.log_prob(torch.randn(4, 1, 4, 4)).mean().backward()


@pytest.mark.parametrize("convert", ["double", "to"])
def test_conv1x1_converts_every_parameter_and_buffer(convert: str) -> None:
    torch.manual_seed(0)
    conv = InvertibleConv1x1(4)
    assert {t.dtype for t in conv.state_dict().values()} == {torch.float32}
    conv = conv.double() if convert == "double" else conv.to(torch.float64)
    assert {t.dtype for t in conv.state_dict().values()} == {torch.float64}
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(conv.inverse(conv(x)), x, rtol=1e-12, atol=1e-12)


def test_conv1x1_weight_starts_as_a_rotation_and_inverse_weight_inverts_it() -> None:
    conv = InvertibleConv1x1(6).double()
    w = conv.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(conv.inverse_weight() @ w, torch.eye(6, dtype=torch.float64))


# -- 2. Flow -----------------------------------------------------------------------


def realnvp(depth: int = 4) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [
            ActNorm(2),
            AffineCoupling(mlp(1, 2), adapter=AffineAdapterSigmoid),
            Permutation.reversed(2),
        ]
    return blocks


def glow(depth: int, channels: int = 3, hidden: int = 8) -> list[nn.Module]:
    blocks: list[nn.Module] = [Squeeze()]
    c = 4 * channels
    for _ in range(depth):
        blocks += [
            ActNorm(c),
            InvertibleConv1x1(c),
            AffineCoupling(conv_net(c // 2, c, hidden), adapter=AffineAdapterSigmoid),
        ]
    return blocks


def saving_twin(plain: Flow, x: torch.Tensor) -> Flow:
    """A copy of ``plain`` that frees its inputs (``keep_input=False``), with
    ``plain``'s state after a no-grad pass on ``x`` (ActNorm's initialisation)."""
    saving = copy.deepcopy(plain)
    saving.keep_input = False
    with torch.no_grad():
        plain(x)
    saving.load_state_dict(plain.state_dict())
    return saving


def test_flow_log_prob_is_base_plus_log_det() -> None:
    torch.manual_seed(0)
    flow = Flow(realnvp(), event_shape=(2,)).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    z, log_det = flow(x)
    assert z.shape == (16, 2) and log_det.shape == (16,)
    base = Independent(Normal(torch.zeros(2, dtype=torch.float64), 1.0), 1)
    torch.testing.assert_close(flow.log_prob(x), base.log_prob(z) + log_det)
    # The whole flow's log-determinant is that of its Jacobian.
    flow.eval()
    jac = torch.func.vmap(torch.func.jacrev(lambda v: flow(v)[0]))(x)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(flow.inverse(z), x)


def test_flow_with_a_given_base_distribution() -> None:
    torch.manual_seed(0)
    base = Independent(Normal(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 2.0])), 1)
    flow = Flow(realnvp(2), event_shape=2, base=base)
    x = torch.randn(8, 2)
    z, log_det = flow(x)
    torch.testing.assert_close(flow.log_prob(x), base.log_prob(z) + log_det)
    assert flow.base is base
    assert flow.sample(3).shape == (3, 2)


def test_flow_follows_distribution_shape_conventions() -> None:
    torch.manual_seed(0)
    flow = Flow(realnvp(2), event_shape=(2,))
    flow.eval()
    x = torch.randn(4, 5, 2)
    lp = flow.log_prob(x)
    assert lp.shape == (4, 5)
    torch.testing.assert_close(lp[1], flow.log_prob(x[1]))
    assert flow.log_prob(x[0, 0]).shape == ()
    assert flow.sample().shape == (2,)
    assert flow.sample(7).shape == (7, 2)
    assert flow.sample((2, 3)).shape == (2, 3, 2)
    assert not flow.sample(4).requires_grad
    assert flow.rsample(4).requires_grad


def test_sample_inverts_forward() -> None:
    torch.manual_seed(0)
    flow = Flow(glow(2), event_shape=(3, 8, 8)).double()
    flow(torch.randn(8, 3, 8, 8, dtype=torch.float64))  # ActNorm initialisation
    assert flow.latent_shape == (12, 4, 4)
    x = flow.sample(4)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float64
    z, _ = flow(x)
    torch.testing.assert_close(flow.inverse(z), x)


def test_flow_state_dict_does_not_depend_on_keep_input() -> None:
    torch.manual_seed(0)
    a = Flow(realnvp(2), (2,), keep_input=False)
    b = Flow(realnvp(2), (2,), keep_input=True)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(k.startswith("blocks.") for k in a.state_dict())


class NoShapeSqueeze(nn.Module):
    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return Squeeze()(x), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return Squeeze().inverse(y)


def test_flow_errors() -> None:
    with pytest.raises(TypeError, match=r"block 1 \(Linear\) has no forward_and_log_det"):
        Flow([ActNorm(2), nn.Linear(2, 2)], (2,))
    with pytest.raises(TypeError, match="block 0 must be an nn.Module"):
        Flow([lambda x: x], (2,))
    with pytest.raises(TypeError, match="pass \\[block\\]"):
        Flow(ActNorm(2), (2,))
    with pytest.raises(ValueError, match="blocks is empty"):
        Flow([], (2,))
    with pytest.raises(ValueError, match="event_shape must be the shape of one sample"):
        Flow([ActNorm(2)], (2, -1))
    with pytest.raises(TypeError, match="base must be a torch.distributions.Distribution"):
        Flow([ActNorm(2)], (2,), base="normal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"it must have event_shape \(12, 2, 2\)"):
        Flow([Squeeze()], (3, 4, 4), base=Independent(Normal(torch.zeros(3, 4, 4), 1.0), 3))
    with pytest.raises(ValueError, match="batch_shape"):
        Flow([ActNorm(2)], (2,), base=Normal(torch.zeros(2), 1.0))
    with pytest.raises(ValueError, match="H and W divisible by 2"):
        Flow([Squeeze()], (3, 5, 4))

    flow = Flow(realnvp(1), (2,))
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(..., 2\)"):
        flow.log_prob(torch.randn(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        flow.log_prob(torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match="log_prob: the tensor is float64 on cpu but the flow's parameters are float32",
    ):
        flow.log_prob(torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="expects a tensor"):
        flow.log_prob([[0.0, 1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_shape must be"):
        flow.sample(-1)
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(..., 2\)"):
        flow.inverse(torch.randn(3))  # shape (3,) is not (..., 2)

    bad = Flow([NoShapeSqueeze()], (3, 4, 4))
    with pytest.raises(ValueError, match="must define output_shape"):
        bad.log_prob(torch.randn(2, 3, 4, 4))


# -- 3. memory-saving flows ----------------------------------------------------------


def gradients(flow: Flow, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    flow.zero_grad()
    flow.log_prob(x).mean().backward()
    return x.grad, [p.grad.clone() for p in flow.parameters()]


def assert_gradients_equal(a: Flow, b: Flow, x: torch.Tensor, rtol: float) -> None:
    gx_a, gp_a = gradients(a, x)
    gx_b, gp_b = gradients(b, x)
    # rtol relative to each tensor's largest entry: float32 sums in another order
    # differ by a few ulps of the largest term, not of the (possibly tiny) entry.
    torch.testing.assert_close(gx_a, gx_b, rtol=rtol, atol=rtol * gx_b.abs().max().item())
    for (name, _), ga, gb in zip(b.named_parameters(), gp_a, gp_b):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=rtol * gb.abs().max().item(), msg=name)


@pytest.mark.parametrize(
    "dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["float32", "float64"]
)
@pytest.mark.parametrize("kind", ["glow", "realnvp", "additive-momentum"])
def test_memory_saving_gradients_equal_keep_input(
    kind: str, dtype: torch.dtype, rtol: float
) -> None:
    torch.manual_seed(0)
    if kind == "glow":
        blocks, shape = glow(4), (3, 8, 8)
    elif kind == "realnvp":
        blocks, shape = realnvp(6), (2,)
    else:
        blocks = [
            AdditiveCoupling(mlp(2)),
            MomentumCoupling(mlp(2), gamma=0.8),
            Permutation(4),
            AdditiveCoupling(mlp(2)),
        ]
        shape = (4,)
    plain = Flow(blocks, shape, keep_input=True).to(dtype)
    x = torch.randn(16, *shape, dtype=dtype)
    saving = saving_twin(plain, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputKeptWarning)  # every input is freed
        assert_gradients_equal(saving, plain, x, rtol)
    torch.testing.assert_close(saving.log_prob(x), plain.log_prob(x), rtol=rtol, atol=0)


class Unfused(nn.Module):
    """A flow block without a fused backward: y = x * exp(w) + tanh(v)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(width))
        self.v = nn.Parameter(torch.randn(width))

    def forward_and_log_det(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * torch.exp(self.w) + torch.tanh(self.v), self.w.sum().expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - torch.tanh(self.v)) * torch.exp(-self.w)


def test_blocks_without_a_fused_backward_still_get_exact_gradients() -> None:
    torch.manual_seed(0)
    plain = Flow([Unfused(2), *realnvp(2), Unfused(2), Unfused(2)], (2,), keep_input=True)
    plain = plain.double()
    x = torch.randn(8, 2, dtype=torch.float64)
    saving = saving_twin(plain, x)
    assert_gradients_equal(saving, plain, x, 1e-12)


def block_inputs(flow: Flow) -> list[torch.Tensor]:
    """Record the input of every wrapper call as the memory-saving flow runs.

    A wrapper runs a group of consecutive blocks without a graph: the inputs of the
    blocks inside a group are never stored, and the group's own input is freed.
    """
    seen: list[torch.Tensor] = []
    for wrapper in flow._wrappers:
        wrapper.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    return seen


def test_every_block_input_is_freed_and_restored() -> None:
    torch.manual_seed(0)
    flow = Flow(glow(3), (3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        flow(x)
    seen = block_inputs(flow)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputKeptWarning)
        loss = -flow.log_prob(x).mean()
    assert len(flow.blocks) == 10
    assert len(seen) == len(flow._wrappers) == 4  # blocks 0, 1-4, 5-8, 9
    assert seen[0].untyped_storage().nbytes() > 0  # the caller's x is kept
    assert x.shape == (4, 3, 8, 8)
    assert all(t.untyped_storage().nbytes() == 0 for t in seen[1:]), "an input was kept"
    loss.backward()
    assert all(t.untyped_storage().nbytes() > 0 for t in seen)
    assert seen[1].shape == (4, 12, 4, 4)


def test_keep_input_and_eval_mode_free_nothing() -> None:
    torch.manual_seed(0)
    flow = Flow(glow(2), (3, 8, 8), keep_input=True)
    x = torch.randn(4, 3, 8, 8)
    flow.log_prob(x).mean().backward()  # plain autograd: the wrappers are not used
    flow.keep_input = False
    flow.eval()
    seen = block_inputs(flow)
    flow.log_prob(x).mean().backward()
    assert seen == []


def saved_bytes(flow: Flow, x: torch.Tensor) -> int:
    counter = SavedBytes(flow)
    with counter.counting():
        loss = -flow.log_prob(x).mean()
    loss.backward()
    return counter.nbytes


def test_saved_bytes_are_flat_in_depth_while_plain_autograd_grows() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    figures = {}
    for depth in (2, 8):
        for keep in (True, False):
            flow = Flow(glow(depth), (3, 8, 8), keep_input=keep)
            with torch.no_grad():
                flow(x)
            figures[depth, keep] = saved_bytes(flow, x)
    assert figures[8, True] > 3 * figures[2, True]  # plain autograd grows with depth
    assert figures[8, False] == figures[2, False]  # the memory-saving flow does not
    assert figures[8, False] < 0.05 * figures[8, True]


def test_flow_is_exported_at_top_level() -> None:
    assert invertnet.Flow is Flow
    for name in ("ActNorm", "InvertibleConv1x1", "Permutation", "Squeeze", "Flow"):
        assert name in invertnet.__all__


def test_fused_backward_without_a_log_det_gradient_is_inverse_and_vjp() -> None:
    block, x = make_block("affine-sigmoid")
    params = tuple(block.parameters())
    y = block(x).detach()
    g = torch.randn_like(y)
    got = block.inverse_and_vjp_with_log_det((y,), (g,), None, params)
    want = block.inverse_and_vjp((y,), (g,), params)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b)


def test_dropout_in_coupling_networks_gets_the_same_masks_in_backward() -> None:
    torch.manual_seed(0)

    def noisy() -> nn.Module:
        return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 2))

    blocks: list[nn.Module] = []
    for _ in range(4):
        blocks += [
            ActNorm(2),
            AffineCoupling(noisy(), adapter=AffineAdapterSigmoid),
            Permutation.reversed(2),
        ]
    plain = Flow(blocks, (2,), keep_input=True).double()
    x = torch.randn(32, 2, dtype=torch.float64)
    saving = saving_twin(plain, x)
    torch.manual_seed(1)
    gx_plain, gp_plain = gradients(plain, x)
    torch.manual_seed(1)
    gx_saving, gp_saving = gradients(saving, x)
    torch.testing.assert_close(gx_saving, gx_plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(gp_saving, gp_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- 4. keep_every: bounded reconstruction drift ----------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "2"])
def test_keep_every_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match=r"keep_every must be None .* or a positive int N"):
        Flow(realnvp(1), (2,), keep_every=bad)  # type: ignore[arg-type]


def ill_conditioned(depth: int, width: int = 8, gain: float = 5.0) -> list[nn.Module]:
    """Steps of ActNorm, an additive coupling adding ``gain``-sized values, and a
    permutation: each inverse subtracts large values from large values, so float32
    reconstruction loses digits at every block and the errors compound."""
    blocks: list[nn.Module] = []
    for _ in range(depth):
        f = nn.Sequential(nn.Linear(width // 2, 16), nn.Tanh(), nn.Linear(16, width // 2))
        with torch.no_grad():
            f[2].weight.mul_(gain)
            f[2].bias.mul_(gain)
        blocks += [ActNorm(width), AdditiveCoupling(f), Permutation(width)]
    return blocks


def worst_gradient_difference(flow: Flow, reference: Flow, x: torch.Tensor) -> float:
    _, grads = gradients(flow, x)
    _, wanted = gradients(reference, x)
    return max(float((g - w).norm() / w.norm()) for g, w in zip(grads, wanted))


def test_keep_every_brings_deep_float32_gradients_back_to_keep_input() -> None:
    torch.manual_seed(0)
    blocks = ill_conditioned(8)  # 24 blocks
    x = torch.randn(64, 8)
    plain = Flow(blocks, (8,), keep_input=True)
    with torch.no_grad():
        plain(x)  # ActNorm's initialisation; the flows below share the blocks
    drifting = worst_gradient_difference(Flow(blocks, (8,)), plain, x)
    bounded = worst_gradient_difference(Flow(blocks, (8,), keep_every=6), plain, x)
    assert drifting > 1e-5, "the flow does not drift: the test proves nothing"
    assert bounded < drifting / 100
    assert bounded < 1e-5


def test_keep_every_gradients_are_exact_in_float64() -> None:
    torch.manual_seed(0)
    plain = Flow(realnvp(4), (2,), keep_input=True).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    saving = saving_twin(plain, x)
    bounded = Flow(saving.blocks, (2,), keep_every=2)
    assert_gradients_equal(bounded, plain, x, 1e-12)


def test_keep_every_keeps_every_nth_input_and_frees_the_others() -> None:
    torch.manual_seed(0)
    flow = Flow(realnvp(4), (2,), keep_every=6)  # 12 blocks
    x = torch.randn(8, 2)
    with torch.no_grad():
        flow(x)
    starts = [w.module.first for w in flow._wrappers]
    assert starts == [0, 1, 5, 6, 10]  # a group starts at block 6, the one kept
    seen = block_inputs(flow)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputKeptWarning)  # kept by choice: no warning
        loss = -flow.log_prob(x).mean()
    kept = [t.untyped_storage().nbytes() > 0 for t in seen]
    assert kept == [start % 6 == 0 for start in starts] == [True, False, False, True, False]
    loss.backward()
    assert all(t.untyped_storage().nbytes() > 0 for t in seen)
    assert flow.keep_every == 6 and "keep_every=6" in repr(flow)
    assert Flow(realnvp(1), (2,)).keep_every is None
