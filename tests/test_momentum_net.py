"""MomentumNet: momentumnet's semantics, both modes, gradients, RNG, BatchNorm, memory."""

from __future__ import annotations

import collections
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from invertnet import MomentumNet


def _mlp(d: int = 8, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))


def _reference(
    functions: list[nn.Module],
    gamma: float,
    x: torch.Tensor,
    init: nn.Module | None = None,
    is_residual: bool = True,
) -> torch.Tensor:
    """The Momentum ResNet iteration written out directly, in float64."""
    dtype = x.dtype
    x = x.double()
    v = init(x.to(dtype)).double() if init is not None else torch.zeros_like(x)
    for f in functions:
        step = f(x.to(dtype)).double()
        step = step if is_residual else step - x
        v = gamma * v + (1 - gamma) * step
        x = x + v
    return x


def _pair(net_args: dict[str, Any], functions: list[nn.Module], init: nn.Module | None = None):
    """The same network in both modes, with separate but equal weights."""
    plain = MomentumNet(functions, use_backprop=True, init_function=init, **net_args)
    light = copy.deepcopy(plain)
    light.use_backprop = False
    return plain, light


def _grads(net: nn.Module, inputs: list[torch.Tensor], out: torch.Tensor) -> list[torch.Tensor]:
    wanted = inputs + [p for p in net.parameters() if p.requires_grad]
    return list(torch.autograd.grad((out * out.detach().cos()).sum(), wanted))


def _assert_close_lists(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float) -> None:
    assert len(a) == len(b)
    for i, (u, w) in enumerate(zip(a, b)):
        scale = u.abs().max().item()
        err = (u - w).abs().max().item()
        assert err <= rtol * scale + 1e-12, f"gradient {i}: {err:.3g} vs scale {scale:.3g}"


# -- the seeds' quickstart -------------------------------------------------------


def test_quickstart_runs_as_written() -> None:
    hidden = 8
    d = 500
    function = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
    mresnet = MomentumNet([function] * 10, gamma=0.9)
    x = torch.randn(10, d)
    assert mresnet(x).shape == (10, d)
    assert len(mresnet.functions) == 10 and all(f is function for f in mresnet.functions)
    expected = _reference([function] * 10, 0.9, x)
    torch.testing.assert_close(mresnet(x).double(), expected, rtol=1e-6, atol=1e-6)


def test_readme_momentum_quickstart_runs_as_written() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.rst").read_text()
    section = readme.split("Momentum ResNets\n================", 1)[1]
    block = re.search(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", section)
    assert block is not None, "README has no Momentum ResNets code block"
    code = "\n".join(line[4:] for line in block.group(1).splitlines())
    assert "MomentumNet([function] * 10, gamma=0.9)" in code
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.rst momentum quickstart", "exec"), namespace)  # noqa: S102
    assert namespace["mresnet"](namespace["x"]).shape == (10, 500)
    src, tgt = torch.randn(2, 5, 32), torch.randn(2, 4, 32, requires_grad=True)
    namespace["mtransformer"](src, tgt).sum().backward()
    assert tgt.grad is not None


# -- semantics ----------------------------------------------------------------


@pytest.mark.parametrize("container", [list, nn.ModuleList, nn.Sequential])
@pytest.mark.parametrize("use_backprop", [True, False])
@pytest.mark.parametrize("is_residual", [True, False])
def test_matches_the_iteration(container: Any, use_backprop: bool, is_residual: bool) -> None:
    torch.manual_seed(0)
    functions = [_mlp() for _ in range(5)]
    init = nn.Linear(8, 8)
    net = MomentumNet(
        container(functions) if container is not nn.Sequential else nn.Sequential(*functions),
        gamma=0.8,
        init_speed=True,
        init_function=init,
        use_backprop=use_backprop,
        is_residual=is_residual,
    ).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    expected = _reference(functions, 0.8, x, init, is_residual)
    torch.testing.assert_close(net(x), expected, rtol=1e-9, atol=1e-9)
    assert list(net.functions) == functions and net.init_function is init


def test_properties_and_repr() -> None:
    f = _mlp()
    net = MomentumNet([f, f], gamma=0.9)
    assert isinstance(net.functions, nn.ModuleList) and net.init_function is None
    assert net.gamma == 0.9
    assert "gamma=9/10" in repr(net)
    # A repeated module shares its weights: parameters are listed once.
    assert len(list(net.parameters())) == len(list(f.parameters()))


@pytest.mark.parametrize("use_backprop", [True, False])
def test_args_and_kwargs_reach_every_function(use_backprop: bool) -> None:
    calls: list[tuple[Any, ...]] = []

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, scale, mask=None, flag=False, note=None):
            calls.append((scale, flag, note, mask is not None))
            out = self.lin(x) * scale
            return out.masked_fill(mask, 0.0) if mask is not None else out

    net = MomentumNet([Masked() for _ in range(3)], gamma=0.5, use_backprop=use_backprop)
    x = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[True, False, False, True]] * 2)
    y = net(x, 2, mask=mask, flag=True, note=None)
    assert calls == [(2, True, None, True)] * 3
    v = 0.5 * torch.zeros(2, 4)
    expected = x.detach().double()
    for f in net.functions:
        v = 0.5 * v + 0.5 * f(expected.float(), 2, mask=mask).detach().double()
        expected = expected + v
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    y.sum().backward()


def test_tensors_inside_containers_get_gradients() -> None:
    Scales = collections.namedtuple("Scales", ["first", "second"])

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, pair, *, extra):
            scales = extra["scales"]
            return self.lin(x) * pair[0] + scales.first * extra["shift"][1] - scales.second

    torch.manual_seed(0)
    plain, light = _pair({"gamma": 0.9}, [Nested() for _ in range(4)])
    w, a, b, s = (torch.randn(3, requires_grad=True) for _ in range(4))
    x = torch.randn(2, 3, requires_grad=True)

    def call(net: MomentumNet) -> torch.Tensor:
        extra = {"scales": Scales(a, b), "shift": [None, s, "text"]}
        return net(x, (w, 1), extra=extra)

    wanted = [x, w, a, b, s]
    g_plain = _grads(plain, wanted, call(plain))
    g_light = _grads(light, wanted, call(light))
    _assert_close_lists(g_plain, g_light, rtol=1e-5)


# -- bad input ----------------------------------------------------------------


@pytest.mark.parametrize("gamma", [-0.01, 1.01, float("nan"), 2])
def test_gamma_outside_unit_interval(gamma: float) -> None:
    with pytest.raises(ValueError, match=r"MomentumNet: gamma must be in \[0, 1\]"):
        MomentumNet([_mlp()], gamma=gamma)


def test_gamma_not_a_number() -> None:
    with pytest.raises(TypeError, match="gamma must be a real number"):
        MomentumNet([_mlp()], gamma="0.9")  # type: ignore[arg-type]


def test_init_speed_without_init_function() -> None:
    with pytest.raises(ValueError, match="init_speed=True needs an init_function"):
        MomentumNet([_mlp()], gamma=0.9, init_speed=True)


def test_init_function_without_init_speed_warns() -> None:
    with pytest.warns(UserWarning, match="init_function is ignored because init_speed=False"):
        net = MomentumNet([_mlp()], gamma=0.9, init_function=nn.Linear(8, 8))
    assert net.init_function is None


@pytest.mark.parametrize(
    "functions, error, match",
    [
        ([], ValueError, "functions is empty"),
        (nn.Linear(2, 2), TypeError, "got a single Linear"),
        ([_mlp(), lambda x: x], TypeError, r"functions\[1\] must be an nn.Module"),
        (3, TypeError, "got int"),
    ],
)
def test_bad_functions(functions: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MomentumNet(functions, gamma=0.9)


@pytest.mark.parametrize("use_backprop", [True, False])
def test_shape_changing_function_names_layer_and_shapes(use_backprop: bool) -> None:
    net = MomentumNet([_mlp(), nn.Linear(8, 5), _mlp()], gamma=0.9, use_backprop=use_backprop)
    x = torch.randn(3, 8, requires_grad=True)
    expected = r"functions\[1\] maps an input of shape \(3, 8\) to an output of shape \(3, 5\)"
    with pytest.raises(ValueError, match=expected):
        net(x)


def test_init_function_changing_shape() -> None:
    net = MomentumNet([_mlp()], gamma=0.9, init_speed=True, init_function=nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"init_function maps an input of shape \(3, 8\)"):
        net(torch.randn(3, 8))


def test_non_float_input() -> None:
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got a torch.int64"):
        MomentumNet([_mlp()], gamma=0.9)(torch.ones(2, 8, dtype=torch.int64))


# -- both modes compute the same function and the same gradients -----------------


@pytest.mark.parametrize("depth, gamma", [(100, 0.9), (30, 0.5)])
def test_gradients_equal_plain_autograd(depth: int, gamma: float, exact_path: str) -> None:
    torch.manual_seed(0)

    class WithArgs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = _mlp()

        def forward(self, x, bias, *, scale):
            return self.mlp(x + bias) * scale

    functions = [WithArgs() for _ in range(depth)]
    init = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    plain, light = _pair({"gamma": gamma, "init_speed": True}, functions, init)
    x = torch.randn(16, 8, requires_grad=True)
    bias = (0.1 * torch.randn(8)).requires_grad_(True)
    scale = torch.rand(16, 8).add(0.5).requires_grad_(True)

    y_plain = plain(x, bias, scale=scale)
    y_light = light(x, bias, scale=scale)
    rel = (y_plain - y_light).norm() / y_plain.norm()
    assert rel < 1e-6
    g_plain = _grads(plain, [x, bias, scale], y_plain)
    g_light = _grads(light, [x, bias, scale], y_light)
    _assert_close_lists(g_plain, g_light, rtol=1e-5)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-7), (torch.bfloat16, 2e-2)])
def test_gradients_in_the_input_dtype_equal_plain_autograd(
    dtype: torch.dtype, rtol: float, exact_path: str
) -> None:
    # The state gradients are carried in the dtype that autograd uses for the plain
    # mode: float32 accumulators would fail the float64 tolerance.
    torch.manual_seed(0)
    functions = [_mlp() for _ in range(30)]
    plain, light = _pair({"gamma": 0.9}, functions)
    plain, light = plain.to(dtype), light.to(dtype)
    x = torch.randn(16, 8, dtype=dtype, requires_grad=True)
    g_plain = _grads(plain, [x], plain(x))
    g_light = _grads(light, [x], light(x))
    assert all(g.dtype == dtype for g in g_light)
    _assert_close_lists(g_plain, g_light, rtol=rtol)


def test_partially_frozen_network_gets_autograd_gradients() -> None:
    torch.manual_seed(0)
    functions = [_mlp() for _ in range(6)]
    init = nn.Linear(8, 8)
    plain, light = _pair({"gamma": 0.9, "init_speed": True}, functions, init)
    for net in (plain, light):
        for i in (1, 4):
            net.functions[i].requires_grad_(False)
        net.functions[2][0].bias.requires_grad_(False)
        net.init_function.weight.requires_grad_(False)
    x = torch.randn(5, 8)  # the input does not require grad either
    for net in (plain, light):
        (net(x) ** 2).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), light.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert p.grad is None and q.grad is None, name
    assert x.grad is None


def test_each_function_runs_once_per_layer_in_backward() -> None:
    counts = [0, 0, 0]

    class Counted(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            counts[self.i] += 1
            return torch.tanh(self.lin(x))

    init_calls = []
    init = nn.Linear(4, 4)
    init.register_forward_hook(lambda *_: init_calls.append(1))
    net = MomentumNet(
        [Counted(i) for i in range(3)],
        gamma=0.9,
        init_speed=True,
        init_function=init,
        use_backprop=False,
    )
    y = net(torch.randn(2, 4, requires_grad=True))
    assert counts == [1, 1, 1] and len(init_calls) == 1
    y.sum().backward()
    assert counts == [2, 2, 2] and len(init_calls) == 2


def test_retain_graph_allows_a_second_backward() -> None:
    torch.manual_seed(0)
    net = MomentumNet([_mlp() for _ in range(4)], gamma=0.5, use_backprop=False)
    x = torch.randn(3, 8, requires_grad=True)
    y = net(x).sum()
    (first,) = torch.autograd.grad(y, x, retain_graph=True)
    (second,) = torch.autograd.grad(y, x)
    assert torch.equal(first, second)


def test_parameter_gradients_are_accumulated_layer_by_layer() -> None:
    # One autograd node per layer: each layer's parameter gradients reach .grad
    # before the layer below is recomputed, as with plain autograd, instead of
    # all at the end (a transient the size of every parameter).
    events: list[str] = []
    functions = [_mlp() for _ in range(4)]
    for t, f in enumerate(functions):
        f.register_forward_hook(lambda *_, t=t: events.append(f"f{t}"))
        f[0].weight.register_post_accumulate_grad_hook(lambda _, t=t: events.append(f"g{t}"))
    net = MomentumNet(functions, gamma=0.9, use_backprop=False)
    y = net(torch.randn(3, 8, requires_grad=True))
    events.clear()
    y.sum().backward()
    assert events == ["f3", "g3", "f2", "g2", "f1", "g1", "f0", "g0"]


def test_partial_backward_then_full_backward_with_retain_graph() -> None:
    torch.manual_seed(0)
    plain, light = _pair({"gamma": 0.5}, [_mlp() for _ in range(6)])
    x = torch.randn(3, 8, requires_grad=True)
    loss_plain, loss_light = plain(x).square().sum(), light(x).square().sum()
    # Only the top layers take part in the first backward; the second starts
    # again from the output.
    top = list(light.functions[4].parameters())
    (partial,) = torch.autograd.grad(loss_light, top[:1], retain_graph=True)
    (expected,) = torch.autograd.grad(loss_plain, list(plain.functions[4].parameters())[:1])
    torch.testing.assert_close(partial, expected, rtol=1e-5, atol=1e-6)
    (grad_x,) = torch.autograd.grad(loss_light, x)
    torch.testing.assert_close(grad_x, torch.autograd.grad(plain(x).square().sum(), x)[0])


def test_rng_state_is_recorded_once_for_calls_that_draw_nothing() -> None:
    from invertnet._runtime.rng import RNGTape, call_recorded

    tape = RNGTape([torch.zeros(1)])
    with tape.recording():
        for t in range(50):
            call_recorded(t, torch.tanh, torch.ones(3))
        call_recorded("draws", torch.randn, 3)
        call_recorded("after", torch.tanh, torch.ones(3))
    states = {id(state) for state in tape._states.values()}
    assert len(tape._states) == 52 and len(states) == 2


def test_function_drawing_under_fork_rng_is_reproduced() -> None:
    # Such a function leaves the generator as it found it, yet its output depends
    # on the state it found: backward must still restore that state.
    class ForkedNoise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.random.fork_rng():
                noise = torch.randn_like(x)
            return torch.tanh(self.lin(x)) * (1 + 0.5 * noise)

    torch.manual_seed(0)
    # Between dropout layers, which move the generator, so that each forked draw
    # sees a different state.
    dropout = [nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3)) for _ in range(3)]
    functions = [dropout[0], ForkedNoise(), dropout[1], ForkedNoise(), dropout[2]]
    plain, light = _pair({"gamma": 0.9}, functions)
    x = torch.randn(4, 8, requires_grad=True)
    torch.manual_seed(1)
    g_plain = _grads(plain, [x], plain(x))
    torch.manual_seed(1)
    y_light = light(x)
    torch.manual_seed(123)  # backward runs with the generator elsewhere
    g_light = _grads(light, [x], y_light)
    _assert_close_lists(g_plain, g_light, rtol=1e-5)


class _UsesShared(nn.Module):
    """A function that also uses a module it does not own (a closure over ``shared``)."""

    def __init__(self, shared: Any) -> None:
        super().__init__()
        self.own = nn.Linear(8, 8)
        self.shared = [shared]  # a list, so that nn.Module does not register it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.own(x) + self.shared[0](x))


def test_tensors_reached_through_a_closure_get_autograd_gradients() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)  # not owned by the functions, not an argument
    functions = [_UsesShared(shared) for _ in range(6)]
    plain = MomentumNet(functions, gamma=0.9, init_speed=True, init_function=_UsesShared(shared))
    light = MomentumNet(
        functions,
        gamma=0.9,
        init_speed=True,
        init_function=plain.init_function,
        use_backprop=False,
    )
    x = torch.randn(4, 8, requires_grad=True)
    wanted = [x, *plain.parameters()]
    expected = torch.autograd.grad(plain(x).square().sum(), wanted)
    expected_shared = torch.autograd.grad(plain(x).square().sum(), list(shared.parameters()))
    for _ in range(2):  # every backward finds the closures
        for p in [x, *plain.parameters(), *shared.parameters()]:
            p.grad = None
        light(x).square().sum().backward()
        got = [p.grad for p in wanted]
        _assert_close_lists(list(expected), got, rtol=1e-5)
        _assert_close_lists(list(expected_shared), [p.grad for p in shared.parameters()], 1e-5)


def test_closure_over_an_activation_reaches_the_enclosing_graph() -> None:
    torch.manual_seed(0)
    encoder = nn.Linear(8, 8)
    context: dict[str, torch.Tensor] = {}

    class UsesContext(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.own = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.own(x) * context["c"])

    functions = [UsesContext() for _ in range(4)]
    plain, light = _pair({"gamma": 0.5}, functions)
    z = torch.randn(3, 8)
    grads = []
    for net in (plain, light):
        encoder.zero_grad()
        context["c"] = torch.sigmoid(encoder(z))  # an activation of the enclosing graph
        # The loss uses it directly too: the backward that runs goes through its
        # graph after the layers have reached it through the closure.
        (net(z).square().sum() + context["c"].sum()).backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    _assert_close_lists(grads[0], grads[1], rtol=1e-5)


def test_no_grad_and_eval_give_the_training_function() -> None:
    torch.manual_seed(0)
    plain, light = _pair({"gamma": 0.9}, [_mlp() for _ in range(10)])
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(light(x), plain(x), rtol=0, atol=0)
    y = light(x.requires_grad_(True))
    torch.testing.assert_close(y.detach(), plain(x).detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_gamma_limits(gamma: float) -> None:
    torch.manual_seed(0)
    plain, light = _pair({"gamma": gamma, "is_residual": False}, [_mlp() for _ in range(5)])
    x = torch.randn(3, 8, requires_grad=True)
    _assert_close_lists(_grads(plain, [x], plain(x)), _grads(light, [x], light(x)), rtol=1e-5)
    if gamma == 0.0:
        # x_{t+1} = f_t(x_t): the composition of the functions.
        expected = x
        for f in plain.functions:
            expected = f(expected)
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-6)


# -- RNG and BatchNorm ----------------------------------------------------------


def test_dropout_is_reproduced_in_backward() -> None:
    torch.manual_seed(0)
    functions = [
        nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 8)) for _ in range(5)
    ]
    plain, light = _pair({"gamma": 0.9}, functions)
    x = torch.randn(4, 8, requires_grad=True)
    torch.manual_seed(1)
    y_plain = plain(x)
    g_plain = _grads(plain, [x], y_plain)
    torch.manual_seed(1)
    y_light = light(x)
    after_forward = torch.get_rng_state()
    g_light = _grads(light, [x], y_light)
    torch.testing.assert_close(y_light, y_plain, rtol=1e-6, atol=1e-6)
    _assert_close_lists(g_plain, g_light, rtol=1e-5)
    # Backward replays the masks without moving the caller's generator.
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_batchnorm_running_stats_updated_once_per_step() -> None:
    torch.manual_seed(0)
    functions = [
        nn.Sequential(nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh()) for _ in range(3)
    ]
    plain, light = _pair({"gamma": 0.9}, functions)
    x = torch.randn(16, 8, requires_grad=True)
    g_plain = _grads(plain, [x], plain(x))
    g_light = _grads(light, [x], light(x))
    _assert_close_lists(g_plain, g_light, rtol=1e-5)
    for a, b in zip(plain.buffers(), light.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    tracked = [b for n, b in light.named_buffers() if n.endswith("num_batches_tracked")]
    assert all(int(b) == 1 for b in tracked)


# -- memory -----------------------------------------------------------------------


def _saved_bytes(net: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = net(x)
    y.sum().backward()
    return total


def test_saved_memory_is_flat_in_depth_without_backprop() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)

    def build(depth: int, use_backprop: bool) -> MomentumNet:
        functions = [nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32))] * depth
        return MomentumNet(functions, gamma=0.9, use_backprop=use_backprop)

    light_8, light_64 = (_saved_bytes(build(d, False), x) for d in (8, 64))
    plain_8, plain_64 = (_saved_bytes(build(d, True), x) for d in (8, 64))
    # Exact mode saves position, velocity and store head (8 bytes each per element)
    # plus at most a few 4-byte chunks, whatever the depth.
    assert light_8 == 3 * 8 * x.numel()
    assert light_64 <= light_8 + 4 * x.numel()
    assert plain_64 > 6 * plain_8
    assert light_64 < plain_8
