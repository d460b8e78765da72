"""MomentumNet(use_backprop=False) under the patterns PyTorch users write (issue 23).

Each test runs a pattern on the memory-saving mode and on ``use_backprop=True``
(plain autograd), and asks for the same gradients, or for an error that names
the layer, the cause and the fix before anything is computed or accumulated.

Tolerance: in float64 the two modes differ only by the rounding of each
function's input to the fixed-point grid of the exact mode (units of ``2**-32``,
about ``2e-10``), so gradients agree to about ``1e-9`` relative to their largest
entry; :data:`RTOL` allows ``1e-7``, the bound ``test_momentum_net.py`` uses for
float64. The failures guarded against here are off by ``1e-2`` or more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils import prune

from invertnet import MomentumNet, transform_to_momentumnet
from tests._core_helpers import UsesShared, assert_grads_close

DTYPE = torch.float64
RTOL = 1e-7

# nn.TransformerEncoder warns about its own nested-tensor setting.
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")


def _block(d: int = 6, *, dropout: float = 0.0, batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d, 2 * d)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(2 * d))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(2 * d, d)]
    return nn.Sequential(*layers)


def _pair(functions: list[nn.Module], **kwargs: Any) -> tuple[MomentumNet, MomentumNet]:
    """The same network with ``use_backprop=True`` and ``False``, equal but separate weights."""
    plain = MomentumNet(functions, use_backprop=True, **kwargs).to(DTYPE)
    light = copy.deepcopy(plain)
    light.use_backprop = False
    return plain, light


def _assert_same_grads(want: list[Any], got: list[Any]) -> None:
    """Gradient lists equal to :data:`RTOL` of each tensor's largest entry, ``None`` alike."""
    assert_grads_close(want, got, rtol=RTOL, atol=1e-12)


def _loss(y: torch.Tensor) -> torch.Tensor:
    return (y * y.detach().cos()).sum()


def _calls(module: nn.Module) -> list[int]:
    """A counter of the calls of ``module`` (one entry per call)."""
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


# -- torch.func.functional_call -----------------------------------------------------


@pytest.mark.parametrize("passed", ["leaves", "computed"])
def test_functional_call_gives_the_passed_tensors_their_gradients(passed: str) -> None:
    # "computed": tensors made from the parameters, as first-order MAML's fast
    # weights are; their gradients must reach the parameters through them, once.
    torch.manual_seed(0)
    plain, light = _pair([_block() for _ in range(4)], gamma=0.9)
    grads = []
    for net in (plain, light):
        stem = nn.Linear(6, 6).to(DTYPE)
        torch.manual_seed(1)
        stem.reset_parameters()
        base = {name: p.detach().clone().requires_grad_(True) for name, p in net.named_parameters()}
        if passed == "leaves":
            tensors = base
        else:
            tensors = {name: p - 0.1 * p.detach().sin() for name, p in base.items()}
        # One tensor passed without requiring grad: plain autograd gives it none,
        # and none to the parameter it stands for.
        tensors["_functions.1.0.bias"] = tensors["_functions.1.0.bias"].detach()
        x = torch.randn(5, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
        x.requires_grad_(True)
        y = torch.func.functional_call(net, tensors, (stem(x),))
        _loss(y).backward()
        assert all(p.grad is None for p in net.parameters()), "the module's own parameters"
        grads.append(
            [x.grad, *(p.grad for p in stem.parameters()), *(t.grad for t in base.values())]
        )
    assert grads[1][3 + list(base).index("_functions.1.0.bias")] is None
    _assert_same_grads(*grads)


# -- eval() left on before backward ---------------------------------------------------


def test_eval_before_backward_replays_the_forward_training_flags() -> None:
    # BatchNorm normalises with the batch's statistics and dropout draws its masks
    # in training mode; backward must recompute that, whatever the flags are now.
    torch.manual_seed(0)
    functions = [_block(dropout=0.3, batchnorm=True) for _ in range(4)]
    plain, light = _pair(functions, gamma=0.9)
    grads = []
    for net in (plain, light):
        x = torch.randn(8, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        torch.manual_seed(3)
        y = net(x)
        net.eval()  # a validation helper between the forward pass and backward
        _loss(y).backward()
        assert not any(m.training for m in net.modules()), "the flags of now are kept"
        grads.append([x.grad, *(p.grad for p in net.parameters())])
    _assert_same_grads(*grads)
    # Running statistics updated once, by the forward pass (from the inputs as
    # rounded to the fixed-point grid, hence not bit for bit).
    for a, b in zip(plain.buffers(), light.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-10)


# -- parameters updated between forward and backward ------------------------------------


def test_a_parameter_updated_before_backward_raises_before_any_gradient() -> None:
    torch.manual_seed(0)
    plain, light = _pair([_block() for _ in range(4)], gamma=0.9)
    x = torch.randn(5, 6, dtype=DTYPE, requires_grad=True)
    for net in (plain, light):
        loss = _loss(net(x))
        optimizer = torch.optim.SGD(net.functions[1].parameters(), lr=0.1)
        for p in net.functions[1].parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # before backward: the weights the forward pass used are gone
        for p in net.parameters():
            p.grad = None
        with pytest.raises(RuntimeError) as caught:  # plain autograd raises too
            loss.backward()
    # Plain autograd raises at functions[1], after the layers above it got their
    # gradients; the memory-saving mode checks every layer first.
    assert all(p.grad is None for p in light.parameters())
    message = str(caught.value)
    assert "MomentumNet(use_backprop=False) functions[1]" in message
    assert "parameter '0.weight' was modified in place" in message
    assert "optimizer.step()" in message


# -- hooks ----------------------------------------------------------------------------


def test_a_gradient_hook_on_a_parameter_runs_once() -> None:
    torch.manual_seed(0)
    plain, light = _pair([_block() for _ in range(3)], gamma=0.9)
    grads, counts = [], []
    for net in (plain, light):
        calls: list[int] = []
        weight = net.functions[1][0].weight

        def clip(g: torch.Tensor, calls: list[int] = calls) -> torch.Tensor:
            calls.append(1)
            return 3 * g  # a hook that changes the gradient, applied once

        weight.register_hook(clip)
        x = torch.randn(5, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        _loss(net(x)).backward()
        grads.append([p.grad for p in net.parameters()])
        counts.append(len(calls))
    assert counts == [1, 1]
    _assert_same_grads(*grads)


def test_pre_hooks_that_set_the_weight_run_in_the_recomputation() -> None:
    # Pruning computes weight = weight_orig * weight_mask in a forward pre-hook:
    # run in backward too, with grad, it gives weight_orig its gradient.
    nets = []
    for use_backprop in (True, False):
        torch.manual_seed(0)
        functions = [_block() for _ in range(3)]
        for f in functions:
            prune.l1_unstructured(f[0], "weight", amount=0.4)
        nets.append(MomentumNet(functions, gamma=0.9, use_backprop=use_backprop).to(DTYPE))
    grads = []
    for net in nets:
        x = torch.randn(5, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        _loss(net(x)).backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(g is not None for g in grads[1])
    _assert_same_grads(*grads)


def test_module_backward_hooks_see_plain_autograd_gradients_once() -> None:
    # Hooks on a function run in its recomputation; the one with a closure makes
    # backward reach tensors the layer does not own, which must not run them twice.
    torch.manual_seed(0)
    shared = nn.Linear(6, 6).to(DTYPE)
    functions = [_block(), UsesShared(shared), _block()]
    plain = MomentumNet(functions, gamma=0.9).to(DTYPE)
    light = MomentumNet(functions, gamma=0.9, use_backprop=False)
    seen = []
    for net in (plain, light):
        events: list[Any] = []

        def pre(module: nn.Module, g_out: Any, events: list[Any] = events) -> None:
            events.append(("pre", g_out[0].clone()))

        def post(module: nn.Module, g_in: Any, g_out: Any, events: list[Any] = events) -> None:
            events.append(("post", g_in[0].clone(), g_out[0].clone()))

        handles = [
            net.functions[1].register_full_backward_pre_hook(pre),
            net.functions[1].register_full_backward_hook(post),
        ]
        x = torch.randn(5, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        _loss(net(x)).backward()
        for h in handles:
            h.remove()
        seen.append(events)
        for p in [x, *net.parameters(), *shared.parameters()]:
            p.grad = None
    assert [e[0] for e in seen[0]] == [e[0] for e in seen[1]] == ["pre", "post"]
    _assert_same_grads([t for e in seen[0] for t in e[1:]], [t for e in seen[1] for t in e[1:]])


# -- a function that writes over its input ---------------------------------------------


class _Halves(nn.Module):
    """Writes over its input (``x.mul_``), then computes from it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.mul_(0.5)))


def test_a_function_writing_over_its_input_gets_plain_gradients() -> None:
    torch.manual_seed(0)
    functions = [
        nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 6)),
        _Halves(),
        nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True)),
    ]
    init = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 6))
    plain, light = _pair(functions, gamma=0.9, init_speed=True, init_function=init)
    x = torch.randn(5, 6, dtype=DTYPE, requires_grad=True)
    kept = x.detach().clone()
    results = []
    for net in (plain, light):
        y = net(x)
        results.append(y)
        assert torch.equal(x, kept), "the caller's input is left alone"
        wanted = [x, *net.parameters()]
        results.append(torch.autograd.grad(_loss(y), wanted))
    # The iteration with every function given a copy of the state.
    v = plain.init_function(x.clone())
    position = x
    for f in plain.functions:
        v = 0.9 * v + 0.1 * f(position.clone())
        position = position + v
    torch.testing.assert_close(results[0], position, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[2], position, rtol=1e-8, atol=1e-8)
    _assert_same_grads(list(results[1]), list(results[3]))


# -- higher-order and forward-mode differentiation -------------------------------------


@pytest.mark.parametrize("loss", ["sum", "square"])
def test_double_backward_raises_naming_momentumnet(loss: str) -> None:
    torch.manual_seed(0)
    _, light = _pair([_block() for _ in range(3)], gamma=0.9)
    x = torch.randn(5, 6, dtype=DTYPE, requires_grad=True)
    y = light(x)
    out = y.sum() if loss == "sum" else y.square().sum()
    params = list(light.parameters())
    grads = torch.autograd.grad(out, [x, *params], create_graph=True)  # first order: fine
    again = torch.autograd.grad(out, [x, *params], retain_graph=True)
    _assert_same_grads(list(again), [g.detach() for g in grads])
    with pytest.raises(RuntimeError) as caught:
        grads[0].square().sum().backward()  # a gradient penalty
    message = str(caught.value)
    assert "MomentumNet(use_backprop=False)" in message
    assert "create_graph=True" in message and "use_backprop=True" in message
    assert "once_differentiable" not in message


def _refused(action: Callable[[], object], net: MomentumNet, feature: str) -> None:
    calls = _calls(net.functions[0])
    with pytest.raises(RuntimeError) as caught:
        action()
    message = str(caught.value)
    assert message.startswith("MomentumNet(use_backprop=False)"), message
    assert feature in message and "use_backprop=True" in message
    assert calls == [], "refused before any function ran"


def test_forward_mode_ad_is_refused_before_anything_runs() -> None:
    torch.manual_seed(0)
    plain, light = _pair([_block() for _ in range(3)], gamma=0.9)
    x = torch.randn(5, 6, dtype=DTYPE, requires_grad=True)
    tangent = torch.randn_like(x)

    def jvp(net: MomentumNet) -> torch.Tensor:
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(net(forward_ad.make_dual(x, tangent))).tangent

    assert jvp(plain) is not None  # plain autograd supports it
    _refused(lambda: jvp(light), light, "forward-mode AD")


@pytest.mark.parametrize("transform", ["grad", "vmap", "jvp", "vjp"])
def test_torch_func_transforms_are_refused_before_anything_runs(transform: str) -> None:
    torch.manual_seed(0)
    plain, light = _pair([_block() for _ in range(3)], gamma=0.9)
    x = torch.randn(5, 6, dtype=DTYPE)

    def run(net: MomentumNet) -> object:
        f = lambda x: net(x).square().sum()  # noqa: E731
        if transform == "grad":
            return torch.func.grad(f)(x)
        if transform == "vmap":
            return torch.func.vmap(net)(x.unsqueeze(1))
        if transform == "jvp":
            return torch.func.jvp(f, (x,), (torch.ones_like(x),))
        return torch.func.vjp(f, x)[1](torch.tensor(1.0, dtype=DTYPE))

    run(plain)  # plain autograd supports it
    _refused(lambda: run(light), light, "torch.func")
    # Without grad, or in eval mode, the plain iteration runs, transforms and all.
    light.eval()
    run(light)


# -- a model converted by transform_to_momentumnet -------------------------------------


class _ResidualBlock(nn.Module):
    """``x + branch(x)``, as ResNet blocks are written (whole blocks, not branches)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def _small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(*(_ResidualBlock() for _ in range(4))),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(DTYPE)


def _converted(model: nn.Module, sub_layers: Any, **kwargs: Any) -> list[nn.Module]:
    return [
        transform_to_momentumnet(model, sub_layers, use_backprop=use_backprop, **kwargs)
        for use_backprop in (True, False)
    ]


@pytest.mark.parametrize("pattern", ["eval", "functional_call"])
def test_a_converted_resnet_under_eval_and_functional_call(pattern: str) -> None:
    models = _converted(_small_resnet(), ["1"], keep_first_layer=False, gamma=0.9)
    grads = []
    for model in models:
        x = torch.randn(4, 3, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        torch.manual_seed(5)
        if pattern == "eval":
            y = model(x)
            model.eval()
            wanted = [x, *model.parameters()]
        else:
            tensors = {
                n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()
            }
            tensors.update((n, b.clone()) for n, b in model.named_buffers())
            y = torch.func.functional_call(model, tensors, (x,))
            wanted = [x, *tensors.values()]
        _loss(y).backward()
        grads.append([t.grad for t in wanted])
    _assert_same_grads(*grads)


def test_a_converted_transformer_encoder_under_eval_and_functional_call() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.2)
    encoder = nn.TransformerEncoder(layer, num_layers=3).to(DTYPE)
    models = _converted(encoder, ["layers"], keep_first_layer=False, gamma=0.9)
    grads = []
    for model in models:
        src = torch.randn(5, 2, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        src.requires_grad_(True)
        tensors = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        torch.manual_seed(5)
        y = torch.func.functional_call(model, tensors, (src,))
        model.eval()
        _loss(y).backward()
        assert all(p.grad is None for p in model.parameters())
        grads.append([src.grad, *(t.grad for t in tensors.values())])
    _assert_same_grads(*grads)


# -- what the record must not break ------------------------------------------------------


@pytest.mark.parametrize("second", ["with grad", "without grad"])
def test_a_module_shared_by_layers_and_calls_keeps_its_statistics_per_call(second: str) -> None:
    # One BatchNorm at every layer, and the network called again before the
    # backward of a first call: a siamese pair, or a call under no_grad in
    # training mode (a target, a metric). Each call's layers must find their
    # buffers as their forward pass left them.
    torch.manual_seed(0)
    plain, light = _pair([_block(batchnorm=True)] * 3, gamma=0.9)
    grads = []
    for net in (plain, light):
        a = torch.randn(8, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        b = torch.randn(8, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
        a.requires_grad_(True)
        loss = _loss(net(a))
        with torch.set_grad_enabled(second == "with grad"):
            other = _loss(net(b))
        (loss + other if other.requires_grad else loss).backward()
        grads.append([a.grad, *(p.grad for p in net.parameters())])
    _assert_same_grads(*grads)
    for x, y in zip(plain.buffers(), light.buffers()):
        torch.testing.assert_close(y, x, rtol=1e-7, atol=1e-10)


def test_a_function_that_reads_and_updates_a_buffer_is_replayed_exactly() -> None:
    """Spectral normalisation in training: the recomputation is given the buffer as
    the forward pass found it (it was 26% off with the value the pass left)."""
    torch.manual_seed(0)

    def make(use_backprop: bool) -> MomentumNet:
        torch.manual_seed(0)
        functions = [
            nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 4)), nn.Tanh()) for _ in range(3)
        ]
        return MomentumNet(functions, gamma=0.5, use_backprop=use_backprop).double()

    x = torch.randn(5, 4, dtype=torch.float64)
    got, want = make(False), make(True)
    for net in (got, want):
        h = x.clone().requires_grad_()
        net(h).square().sum().backward()
        net.grad_x = h.grad  # type: ignore[attr-defined]
    torch.testing.assert_close(got.grad_x, want.grad_x, rtol=1e-7, atol=1e-9)
    for p, q in zip(got.parameters(), want.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-9)
    for b, c in zip(got.buffers(), want.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0)
