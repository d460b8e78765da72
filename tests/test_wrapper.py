"""InvertibleModuleWrapper: memcnn's API, and gradients equal to plain autograd."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    InvertibleModuleWrapper,
)
from invertnet._runtime.forward_state import BufferSnapshot, submodules
from tests._core_helpers import (
    Counting,
    DropoutTwoWay,
    ScaleShiftNet,
    ThreeToOne,
    TwoWay,
    Unary,
    assert_all_close,
    run_and_grads,
    tolerances,
    wrapped_pair,
)

torch.manual_seed(0)  # the parametrized modules below are built at collection

# -- API ----------------------------------------------------------------------


def test_signature_is_memcnns_and_defaults_are_safe() -> None:
    # memcnn's names and order; preserve_rng_state defaults to True (memcnn: False),
    # so that dropout is replayed without the user asking.
    params = inspect.signature(InvertibleModuleWrapper).parameters
    assert list(params) == [
        "fn",
        "keep_input",
        "keep_input_inverse",
        "num_bwd_passes",
        "disable",
        "preserve_rng_state",
    ]
    defaults = {name: p.default for name, p in params.items() if name != "fn"}
    assert defaults == {
        "keep_input": False,
        "keep_input_inverse": False,
        "num_bwd_passes": 1,
        "disable": False,
        "preserve_rng_state": True,
    }
    w = InvertibleModuleWrapper(Unary(), True, True, 3, True, True)
    assert (w.keep_input, w.keep_input_inverse, w.num_bwd_passes) == (True, True, 3)
    assert w.disable and w.preserve_rng_state


def test_module_without_inverse_is_a_type_error_naming_its_class() -> None:
    with pytest.raises(TypeError, match="Linear has no inverse"):
        InvertibleModuleWrapper(nn.Linear(2, 2))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_num_bwd_passes_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="num_bwd_passes must be an int >= 1"):
        InvertibleModuleWrapper(Unary(), num_bwd_passes=bad)


@pytest.mark.parametrize("disable", [False, True])
def test_several_inputs_and_outputs_and_bare_single_result(disable: bool) -> None:
    module = TwoWay()
    w = InvertibleModuleWrapper(module, disable=disable, keep_input=True)
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    ys = w(a, b)
    assert isinstance(ys, tuple) and len(ys) == 2
    assert_all_close(list(ys), list(module(a, b)), 0, 0)
    xs = w.inverse(*ys)
    assert_all_close(list(xs), [a, b], 1e-5, 1e-6)

    three = InvertibleModuleWrapper(ThreeToOne(), disable=disable, keep_input=True)
    parts = [torch.randn(2, n, requires_grad=True) for n in (1, 2, 3)]
    y = three(*parts)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 6)
    back = three.inverse(y)
    assert isinstance(back, tuple) and [t.shape[1] for t in back] == [1, 2, 3]

    single = InvertibleModuleWrapper(Unary(), disable=disable)
    assert isinstance(single(torch.randn(2, 6, requires_grad=True)), torch.Tensor)


def test_non_tensor_input_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="input 0 must be a tensor, got list"):
        InvertibleModuleWrapper(Unary())([1.0, 2.0])


def _memcnn_state_dict(Fm: nn.Module, Gm: nn.Module, f_prefix: str) -> dict[str, torch.Tensor]:
    """The keys memcnn 1.5 writes for a wrapped coupling, built independently here."""
    state = {}
    for prefix, m in (("_fn.Fm.", Fm), ("_fn.Gm.", Gm)):
        for k, v in m.state_dict().items():
            state[prefix + f_prefix + k] = v.clone() + 1  # + 1 keeps int buffers int
    return state


@pytest.mark.parametrize(
    "make, f_prefix",
    [
        (lambda F, G: AdditiveCoupling(F, G), ""),
        (lambda F, G: AffineCoupling(F, G, adapter=AffineAdapterNaive), "f."),
    ],
    ids=["additive", "affine-adapter"],
)
def test_state_dict_keys_are_memcnns_and_memcnn_checkpoints_load(make, f_prefix: str) -> None:
    F = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2))
    G = copy.deepcopy(F)
    wrapper = InvertibleModuleWrapper(make(F, G))
    memcnn_state = _memcnn_state_dict(F, G, f_prefix)
    assert set(wrapper.state_dict()) == set(memcnn_state)
    assert "_fn.Fm." + f_prefix + "0.weight" in memcnn_state
    wrapper.load_state_dict(memcnn_state)  # strict: every key matched
    for k, v in wrapper.state_dict().items():
        torch.testing.assert_close(v, memcnn_state[k])


# -- gradients equal plain autograd ---------------------------------------------


def _coupling(kind: str, width: int, dtype: torch.dtype) -> nn.Module:
    def mlp(out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, out))

    if kind == "additive":
        block = AdditiveCoupling(mlp(width))
    elif kind == "affine-naive":
        block = AffineCoupling(mlp(width), adapter=AffineAdapterNaive)
    elif kind == "affine-sigmoid":
        block = AffineCoupling(mlp(2 * width), adapter=AffineAdapterSigmoid)
    else:  # affine without adapter: the sub-module returns (scale, shift) itself
        block = AffineCoupling(ScaleShiftNet(width))
    for p in block.parameters():  # small weights keep exp() scales tame in deep chains
        p.data.mul_(0.5)
    return block.to(dtype)


KINDS = ["additive", "affine-naive", "affine-sigmoid", "affine-pair"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("depth", [1, 10])
def test_coupling_gradients_equal_plain_autograd(kind: str, depth: int, dtype) -> None:
    torch.manual_seed(depth)
    blocks = [_coupling(kind, 3, dtype) for _ in range(depth)]
    wrapped = nn.Sequential(*[InvertibleModuleWrapper(b) for b in blocks])
    plain = nn.Sequential(
        *[InvertibleModuleWrapper(copy.deepcopy(b), disable=True) for b in blocks]
    )
    x = torch.randn(5, 6, dtype=dtype, requires_grad=True)
    got, want = run_and_grads(wrapped, [x]), run_and_grads(plain, [x])
    rtol, atol = tolerances(dtype)
    for g, w in zip(got, want):
        assert_all_close(g, w, rtol, atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("keep_input", [False, True])
def test_generic_module_with_several_inputs_and_outputs(dtype, keep_input: bool) -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(TwoWay().to(dtype), keep_input=keep_input)
    xs = [torch.randn(3, 4, dtype=dtype, requires_grad=True) for _ in range(2)]
    rtol, atol = tolerances(dtype)
    for g, w in zip(run_and_grads(wrapped, xs), run_and_grads(plain, xs)):
        assert_all_close(g, w, rtol, atol)


def test_generic_chain_of_ten_with_three_to_one_head() -> None:
    torch.manual_seed(0)
    modules = [TwoWay() for _ in range(10)]
    wrapped = [InvertibleModuleWrapper(m) for m in modules]
    plain = [InvertibleModuleWrapper(copy.deepcopy(m), disable=True) for m in modules]

    def chain(blocks):
        def run(a, b):
            for blk in blocks:
                a, b = blk(a, b)
            return a, b

        return run

    xs = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    got = run_and_grads(nn.ModuleList(wrapped), xs, chain(wrapped))
    want = run_and_grads(nn.ModuleList(plain), xs, chain(plain))
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-5, 1e-5)


@pytest.mark.parametrize(
    "module", [TwoWay(), AdditiveCoupling(nn.Linear(2, 2))], ids=lambda m: type(m).__name__
)
def test_inverse_direction_frees_and_gives_correct_gradients(module: nn.Module) -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(module)
    n_in = 2 if isinstance(module, TwoWay) else 1
    ys = [torch.randn(3, 4, requires_grad=True) for _ in range(n_in)]

    def inv(w):
        return lambda *t: w.inverse(*t)

    leaves = [y.detach().clone().requires_grad_() for y in ys]
    out = wrapped.inverse(*leaves)
    assert all(t.untyped_storage().nbytes() == 0 for t in leaves)  # freed
    (sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()).backward()
    assert all(t.shape == (3, 4) for t in leaves)

    wrapped.zero_grad(set_to_none=True)
    got = run_and_grads(wrapped, ys, inv(wrapped))
    want = run_and_grads(plain, ys, inv(plain))
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-5, 1e-5)


@pytest.mark.parametrize(
    "module", [AdditiveCoupling(nn.Linear(2, 2)), Unary(4)], ids=lambda m: type(m).__name__
)
def test_two_backward_passes_with_num_bwd_passes_2(module: nn.Module) -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(module, num_bwd_passes=2)
    x = torch.randn(3, 4, requires_grad=True)
    xw, xp = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    lw, lp = (wrapped(xw) ** 2).sum(), (plain(xp) ** 2).sum()
    for _ in range(2):
        lw.backward(retain_graph=True)
        lp.backward(retain_graph=True)
        torch.testing.assert_close(xw.grad, xp.grad, rtol=1e-5, atol=1e-6)
        for pw, pp in zip(wrapped.parameters(), plain.parameters()):
            torch.testing.assert_close(pw.grad, pp.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xw, x)  # restored after both passes
    with pytest.raises(RuntimeError, match="num_bwd_passes=2.*raise num_bwd_passes"):
        lw.backward()


def test_default_single_pass_then_second_raises() -> None:
    w = InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(2, 2)))
    loss = w(torch.randn(3, 4, requires_grad=True)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="num_bwd_passes=1"):
        loss.backward()


# -- autograd.grad, backward(inputs=...), frozen and unused parameters ------------


@pytest.mark.parametrize(
    "module", [AdditiveCoupling(nn.Linear(2, 2)), TwoWay(2)], ids=lambda m: type(m).__name__
)
def test_autograd_grad_and_backward_inputs(module: nn.Module) -> None:
    torch.manual_seed(0)
    n = 2 if isinstance(module, TwoWay) else 1
    width = 2 if n == 2 else 4
    xs = [torch.randn(3, width, requires_grad=True) for _ in range(n)]

    def loss_of(w, leaves):
        out = w(*leaves)
        return sum((o**2).sum() for o in (out if isinstance(out, tuple) else (out,)))

    wrapped, plain = wrapped_pair(module)
    params_w, params_p = list(wrapped.parameters()), list(plain.parameters())
    lw = [x.detach().clone().requires_grad_() for x in xs]
    lp = [x.detach().clone().requires_grad_() for x in xs]
    got = torch.autograd.grad(loss_of(wrapped, lw), [*lw, params_w[0]])
    want = torch.autograd.grad(loss_of(plain, lp), [*lp, params_p[0]])
    assert_all_close(list(got), list(want), 1e-5, 1e-6)
    assert all(p.grad is None for p in params_w)  # autograd.grad accumulates nothing

    lw = [x.detach().clone().requires_grad_() for x in xs]
    lp = [x.detach().clone().requires_grad_() for x in xs]
    loss_of(wrapped, lw).backward(inputs=[lw[0], params_w[-1]])
    loss_of(plain, lp).backward(inputs=[lp[0], params_p[-1]])
    torch.testing.assert_close(lw[0].grad, lp[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params_w[-1].grad, params_p[-1].grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in params_w[:-1])
    assert all(x.grad is None for x in lw[1:])


@pytest.mark.parametrize(
    "module", [AdditiveCoupling(nn.Linear(2, 2)), TwoWay(2)], ids=lambda m: type(m).__name__
)
def test_frozen_parameters_get_no_grad(module: nn.Module) -> None:
    module = copy.deepcopy(module)  # the parametrized instance is shared
    frozen = next(iter(module.parameters()))
    frozen.requires_grad_(False)
    n = 2 if isinstance(module, TwoWay) else 1
    width = 2 if n == 2 else 4
    xs = [torch.randn(3, width, requires_grad=True) for _ in range(n)]
    wrapped, plain = wrapped_pair(module)
    got, want = run_and_grads(wrapped, xs), run_and_grads(plain, xs)
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-5, 1e-6)
    frozen_copy = next(iter(wrapped.parameters()))
    assert not frozen_copy.requires_grad and frozen_copy.grad is None
    assert all(p.grad is not None for p in list(wrapped.parameters())[1:])


class _WithUnused(AdditiveCoupling):
    """A coupling with a parameter its forward never touches."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(2, 2))
        self.unused = nn.Parameter(torch.ones(3))


class _UnaryWithUnused(Unary):
    def __init__(self) -> None:
        super().__init__(4)
        self.unused = nn.Parameter(torch.ones(3))


@pytest.mark.parametrize(
    "module", [_WithUnused(), _UnaryWithUnused()], ids=lambda m: type(m).__name__
)
def test_unused_parameters_get_grad_none(module: nn.Module) -> None:
    wrapped, plain = wrapped_pair(module)
    x = [torch.randn(3, 4, requires_grad=True)]
    got, want = run_and_grads(wrapped, x), run_and_grads(plain, x)
    for g, w in zip(got, want):
        assert_all_close(g, w, 1e-5, 1e-6)
    assert wrapped.module.unused.grad is None


def test_only_parameters_require_grad() -> None:
    """A data input that does not require grad is still freed and restored."""
    wrapped, plain = wrapped_pair(AdditiveCoupling(nn.Linear(2, 2)))
    x = torch.randn(3, 4)
    xw = x.clone()
    y = wrapped(xw)
    assert xw.untyped_storage().nbytes() == 0
    y.sum().backward()
    torch.testing.assert_close(xw, x)
    plain(x).sum().backward()
    for pw, pp in zip(wrapped.parameters(), plain.parameters()):
        torch.testing.assert_close(pw.grad, pp.grad)


# -- RNG, BatchNorm, autocast -------------------------------------------------------


def _dropout_net(p: float = 0.5) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), nn.Dropout(p))


@pytest.mark.parametrize(
    "module, n_in",
    [
        (AdditiveCoupling(_dropout_net()), 1),
        (AffineCoupling(_dropout_net(), adapter=AffineAdapterNaive), 1),
        (DropoutTwoWay(3), 2),
    ],
    ids=["additive", "affine", "generic"],
)
@pytest.mark.parametrize("keep_input", [False, True])
def test_preserve_rng_state_reproduces_dropout(module: nn.Module, n_in: int, keep_input) -> None:
    # float64, so that the comparison isolates the dropout masks from rounding.
    torch.manual_seed(0)
    module = copy.deepcopy(module).double()
    wrapped, plain = wrapped_pair(module, preserve_rng_state=True, keep_input=keep_input)
    width = 6 if n_in == 1 else 3
    xs = [torch.randn(8, width, dtype=torch.float64, requires_grad=True) for _ in range(n_in)]
    got = run_and_grads(wrapped, xs, seed=7)
    want = run_and_grads(plain, xs, seed=7)
    for g, w in zip(got, want):
        assert_all_close(g, w, *tolerances(torch.float64))
    # The replay in backward leaves the caller's RNG stream where the forward left it.
    outs = wrapped(*[x.detach().clone().requires_grad_() for x in xs])
    after_forward = torch.get_rng_state()
    sum(o.sum() for o in (outs if isinstance(outs, tuple) else (outs,))).backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_dropout_is_replayed_by_default() -> None:
    """Dropout with the wrapper's default arguments: the masks are replayed."""
    torch.manual_seed(0)
    module = AdditiveCoupling(_dropout_net()).double()
    wrapped, plain = InvertibleModuleWrapper(copy.deepcopy(module)), wrapped_pair(module)[1]
    x = [torch.randn(8, 6, dtype=torch.float64, requires_grad=True)]
    for g, w in zip(run_and_grads(wrapped, x, seed=7), run_and_grads(plain, x, seed=7)):
        assert_all_close(g, w, *tolerances(torch.float64))


@pytest.mark.parametrize("keep_input", [False, True])
def test_dropout_without_preserve_rng_state_is_refused_before_freeing(keep_input) -> None:
    """preserve_rng_state=False with a module that draws: the recomputation would draw
    other masks (gradients 110% to 245% off), so the forward pass refuses, and the
    input is still intact. This also shows the tests above are not vacuous."""
    torch.manual_seed(0)
    wrapped = InvertibleModuleWrapper(
        AdditiveCoupling(_dropout_net()), preserve_rng_state=False, keep_input=keep_input
    )
    x = torch.randn(8, 6, requires_grad=True).clone()
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="drew random numbers.*preserve_rng_state=True"):
        wrapped(x)
    assert torch.equal(x, before)


def test_preserve_rng_state_false_runs_a_module_that_draws_nothing() -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(AdditiveCoupling(nn.Linear(3, 3)), preserve_rng_state=False)
    x = [torch.randn(8, 6, requires_grad=True)]
    for g, w in zip(run_and_grads(wrapped, x), run_and_grads(plain, x)):
        assert_all_close(g, w, *tolerances(torch.float32))


class _ConvOfTheUsers(nn.Module):
    """A module of a class invertnet does not know: it draws nothing, but could."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).tanh()


def _count_recorded_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Patch the tape so that every sub-module call it records is counted."""
    from invertnet._runtime import rng

    seen: list[object] = []
    record = rng.RNGTape._call

    def counting(self, key, fn, args):  # type: ignore[no-untyped-def]
        if not self._replaying:
            seen.append(key)
        return record(self, key, fn, args)

    monkeypatch.setattr(rng.RNGTape, "_call", counting)
    return seen


@pytest.mark.parametrize(
    "F, records",
    [
        (lambda: nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()), 0),
        (lambda: nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Dropout(0.3)), 2),
        (lambda: _ConvOfTheUsers(2), 2),  # a class of the user's: it may draw
    ],
    ids=["conv-bn-relu", "dropout", "user-class"],
)
def test_random_state_is_recorded_per_call_only_where_a_module_may_draw(
    monkeypatch: pytest.MonkeyPatch, F, records: int
) -> None:
    """Modules of kinds that draw no random numbers are run without a record of the
    random state before each call (a copy and a comparison of 5 KiB per call), and
    still give plain autograd's gradients; any other module is recorded call by call."""
    seen = _count_recorded_calls(monkeypatch)
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(AdditiveCoupling(F()).double())
    x = [torch.randn(4, 4, 5, 5, dtype=torch.float64, requires_grad=True)]
    got = run_and_grads(wrapped, x, seed=3)
    assert len(seen) == records
    for g, w in zip(got, run_and_grads(plain, x, seed=3)):
        assert_all_close(g, w, *tolerances(torch.float64))


def test_a_forward_hook_that_draws_is_recorded_and_replayed(monkeypatch) -> None:
    """A hook may draw random numbers, so a module with one is recorded call by call
    even where its class draws none: the noise the hook adds is replayed."""
    seen = _count_recorded_calls(monkeypatch)
    torch.manual_seed(0)
    module = AdditiveCoupling(nn.Sequential(nn.Linear(3, 3), nn.ReLU())).double()
    wrapped, plain = wrapped_pair(module)
    for m in (wrapped, plain):
        linear = next(x for x in m.modules() if isinstance(x, nn.Linear))
        linear.register_forward_hook(lambda mod, args, out: out + torch.randn_like(out))
    x = [torch.randn(8, 6, dtype=torch.float64, requires_grad=True)]
    got = run_and_grads(wrapped, x, seed=5)
    assert seen
    for g, w in zip(got, run_and_grads(plain, x, seed=5)):
        assert_all_close(g, w, *tolerances(torch.float64))


def test_a_replaced_function_that_draws_under_unrecorded_modules_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Modules of kinds that draw nothing are not recorded call by call; if they draw
    all the same (torch.nn.functional.relu replaced by a noisy one), the generators
    have moved when the forward pass ends, and the wrapper refuses before freeing its
    input, where a silent run would give gradients with other noise."""
    wrapped = InvertibleModuleWrapper(AdditiveCoupling(nn.Sequential(nn.Linear(3, 3), nn.ReLU())))
    relu = torch.nn.functional.relu
    monkeypatch.setattr(
        torch.nn.functional, "relu", lambda t, inplace=False: relu(t) + torch.rand_like(t)
    )
    x = torch.randn(8, 6, requires_grad=True).clone()
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="generators moved during the forward pass"):
        wrapped(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(
    "make",
    [AdditiveCoupling, lambda F: AffineCoupling(F, adapter=AffineAdapterNaive)],
    ids=["additive", "affine"],
)
def test_batchnorm_statistics_equal_plain_after_a_step(make, momentum) -> None:
    torch.manual_seed(0)
    F = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2, momentum=momentum)
    )
    wrapped, plain = wrapped_pair(make(F))
    x = [torch.randn(4, 4, 5, 5, requires_grad=True)]
    for _ in range(2):
        got, want = run_and_grads(wrapped, x), run_and_grads(plain, x)
        for g, w in zip(got, want):
            assert_all_close(g, w, 1e-5, 1e-5)
    for (name, bw), (_, bp) in zip(wrapped.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(bw, bp, msg=name)
    counts = [int(b) for n, b in wrapped.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts == [2, 2]  # Fm's and Gm's BatchNorm: one update per training step


# The inner wrappers get halves of the outer input (views), which they keep.
@pytest.mark.filterwarnings("ignore::invertnet.InputKeptWarning")
def test_batchnorm_statistics_of_nested_wrappers_are_updated_once_per_step() -> None:
    # The inner wrappers' backward runs inside the outer one's recomputation, so
    # their buffer snapshots are taken while the outer one's is held.
    torch.manual_seed(0)

    def inner() -> nn.Module:
        net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        return InvertibleModuleWrapper(AdditiveCoupling(net))

    wrapped, plain = wrapped_pair(AdditiveCoupling(inner(), inner()))
    for w in plain.modules():
        if isinstance(w, InvertibleModuleWrapper):
            w.disable = True
    x = [torch.randn(6, 8, requires_grad=True)]
    for _ in range(3):
        got, want = run_and_grads(wrapped, x), run_and_grads(plain, x)
        for g, w in zip(got, want):
            assert_all_close(g, w, 1e-5, 1e-5)
    for (name, bw), (_, bp) in zip(wrapped.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(bw, bp, msg=name, rtol=0, atol=0)
    counts = [int(b) for n, b in wrapped.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts == [3] * 4


def test_buffer_snapshots_nest_and_restore_objects_and_bits() -> None:
    def module() -> nn.Module:
        m = nn.BatchNorm1d(3)
        m.running_mean.copy_(torch.tensor([-0.0, float("nan"), float("inf")]))
        return m

    first, second = module(), module()
    before = [b.clone() for b in first.buffers()]
    outer = BufferSnapshot(submodules(first))
    first.running_mean.fill_(1.0)
    first.num_batches_tracked += 5
    inner = BufferSnapshot(submodules(second))  # the same shapes: a scratch set of its own
    second.running_mean.fill_(2.0)
    original_var = first.running_var
    first.running_var = torch.zeros(3)  # a module may replace a buffer object
    inner.restore()
    outer.restore()
    outer.restore()  # a second restore does nothing
    assert first.running_var is original_var

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    for b, expected in zip(first.buffers(), before):  # -0.0 and NaN too, bit for bit
        assert b.dtype == expected.dtype and torch.equal(bits(b), bits(expected))
    assert torch.equal(bits(second.running_mean), bits(before[0]))


@pytest.mark.parametrize(
    "module, n_in",
    [
        (AdditiveCoupling(nn.Linear(4, 4)), 1),
        (AffineCoupling(nn.Linear(4, 4), adapter=AffineAdapterNaive), 1),
        (TwoWay(8), 2),
    ],
    ids=["additive", "affine", "generic"],
)
def test_autocast_bfloat16_matches_plain(module: nn.Module, n_in: int) -> None:
    torch.manual_seed(0)
    wrapped, plain = wrapped_pair(module)
    xs = [torch.randn(6, 8, requires_grad=True) for _ in range(n_in)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_and_grads(wrapped, xs)
        want = run_and_grads(plain, xs)
    for g, w in zip(got, want):
        assert_all_close(g, w, 2e-2, 2e-2)
    assert all(x.dtype == torch.float32 for x in got[1])


def test_autocast_is_reentered_for_the_recomputation_in_backward() -> None:
    """The backward pass runs outside the user's autocast block; the wrapper restores it."""
    block = AdditiveCoupling(nn.Linear(4, 4))
    dtypes: list[torch.dtype] = []
    for sub in (block.Fm, block.Gm):
        sub.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    wrapper = InvertibleModuleWrapper(block)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = wrapper(x)
    y.float().sum().backward()  # outside autocast, as a training loop usually does
    assert dtypes == [torch.bfloat16] * 4  # forward F, G; fused recompute G, F
    assert x.grad is not None and x.grad.dtype == torch.float32


class _CountingCoupling:
    """Builds a coupling whose Fm and Gm count their calls."""

    def __init__(self, kind: str) -> None:
        if kind == "additive":
            self.block = AdditiveCoupling(Counting(nn.Linear(2, 2)), Counting(nn.Linear(2, 2)))
            self.F, self.G = self.block.Fm, self.block.Gm
        else:
            F, G = Counting(nn.Linear(2, 2)), Counting(nn.Linear(2, 2))
            self.block = AffineCoupling(F, G, adapter=AffineAdapterNaive)
            self.F, self.G = F, G


@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_fused_backward_evaluates_Fm_and_Gm_once_each(kind: str) -> None:
    c = _CountingCoupling(kind)
    wrapper = InvertibleModuleWrapper(c.block)
    backward_calls = {"F": 0, "G": 0}
    c.F.inner.register_full_backward_hook(
        lambda *a: backward_calls.__setitem__("F", backward_calls["F"] + 1)
    )
    c.G.inner.register_full_backward_hook(
        lambda *a: backward_calls.__setitem__("G", backward_calls["G"] + 1)
    )
    x = torch.randn(3, 4, requires_grad=True)
    y = wrapper(x)
    assert (c.F.calls, c.G.calls) == (1, 1)
    y.sum().backward()
    assert (c.F.calls, c.G.calls) == (2, 2)  # one recomputation each, not memcnn's two
    assert backward_calls == {"F": 1, "G": 1}


def test_generic_module_falls_back_to_inverse_plus_reforward() -> None:
    module = TwoWay()
    wrapper = InvertibleModuleWrapper(module)
    # Activations (with a grad_fn) are freed and rebuilt by the inverse.
    a, b = (torch.randn(3, 4, requires_grad=True).clone() for _ in range(2))
    y1, y2 = wrapper(a, b)
    assert (module.forward_calls, module.inverse_calls) == (1, 0)
    (y1.sum() + y2.sum()).backward()
    assert (module.forward_calls, module.inverse_calls) == (2, 1)


def test_the_callers_own_tensors_are_hidden_and_handed_back_bit_for_bit() -> None:
    """Leaves (the batch) look freed until backward, then are the very bits passed:
    no inverse is run for them, so a batch reused every step never drifts."""
    module = TwoWay()
    wrapper = InvertibleModuleWrapper(module)
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)
    before = [a.detach().clone(), b.clone()]
    y1, y2 = wrapper(a, b)
    assert a.shape == b.shape == (0,)  # looks freed: using it raises
    assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes() == 0
    (y1.sum() + y2.sum()).backward()
    assert module.inverse_calls == 0
    assert torch.equal(a.detach(), before[0]) and torch.equal(b, before[1])
    assert a._version == b._version == 0


# -- keep_inputs_every, allow_free ---------------------------------------------


def _deep_affine_stack(depth: int) -> nn.Sequential:
    torch.manual_seed(0)

    def net() -> nn.Module:  # scale and shift for a half of 4
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))

    return nn.Sequential(
        *[
            InvertibleModuleWrapper(AffineCoupling(net(), net(), adapter=AffineAdapterSigmoid))
            for _ in range(depth)
        ]
    )


def test_keep_inputs_every_keeps_every_nth_input_and_bounds_the_drift() -> None:
    from invertnet import keep_inputs_every

    x = torch.randn(64, 8)

    def input_grad(stack: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        h = x.detach().to(dtype).clone().requires_grad_()
        stack(h * 1).square().sum().backward()
        return h.grad

    # At depth 48 the rebuilt inputs drift by 1e-5 of the gradient's scale (float32),
    # 7e-7 with every 4th input kept.
    stack = _deep_affine_stack(48)
    reference = copy.deepcopy(stack)
    for w in reference.modules():
        if isinstance(w, InvertibleModuleWrapper):
            w.disable = True
    exact = input_grad(copy.deepcopy(reference).double(), torch.float64).float()
    drift_all_freed = (input_grad(stack) - exact).abs().max()
    kept = keep_inputs_every(stack, 4)
    assert kept == [str(i) for i in range(0, 48, 4)]
    assert [w.keep_input for w in stack] == [i % 4 == 0 for i in range(48)]
    drift_every_4 = (input_grad(stack) - exact).abs().max()
    assert 4 * drift_every_4 < drift_all_freed
    # Every wrapper kept: no rebuilt input, the float32 autograd result.
    keep_inputs_every(stack, 1)
    plain = copy.deepcopy(reference).float()
    torch.testing.assert_close(input_grad(stack), input_grad(plain), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_keep_inputs_every_refuses_what_is_not_a_positive_int(every) -> None:
    from invertnet import keep_inputs_every

    stack = _deep_affine_stack(2)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        keep_inputs_every(stack, every)
    assert [w.keep_input for w in stack] == [False, False]


def test_allow_free_frees_a_leaf_that_would_be_hidden() -> None:
    from invertnet import allow_free

    block = InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(2, 2)))
    hidden, freed = torch.randn(3, 4), allow_free(torch.randn(3, 4))
    before = freed.clone()
    for x in (hidden, freed):
        y = block(x)
        assert x.untyped_storage().nbytes() == 0
        y.sum().backward()
        assert x.shape == (3, 4)
    torch.testing.assert_close(freed, before)  # rebuilt, to rounding
    with pytest.raises(TypeError, match="allow_free expects a tensor"):
        allow_free([1.0])  # type: ignore[arg-type]
