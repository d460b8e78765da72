"""torch.compile (default backend, CPU): wrapped couplings and a MomentumNet compile and
give eager's outputs and gradients; the graph breaks are the documented ones.

Compiling costs seconds, so one model is compiled once for the whole module.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import invertnet.wrappers.invertible as wrapper_module
from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    InvertibleModuleWrapper,
    MomentumNet,
)

WIDTH = 8


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


class Model(nn.Module):
    """Two RevNet blocks, an affine block, a deep low-gamma MomentumNet, a head.

    ``forward`` calls the blocks one by one rather than looping over an
    ``nn.Sequential``: a graph break inside a loop makes Dynamo run the rest of
    the loop eagerly.
    """

    def __init__(self, momentum_depth: int = 24) -> None:
        super().__init__()
        half = WIDTH // 2
        self.stem = nn.Linear(WIDTH, WIDTH)
        self.rev1 = InvertibleModuleWrapper(AdditiveCoupling(_mlp(half)))
        self.rev2 = InvertibleModuleWrapper(AdditiveCoupling(_mlp(half)))
        self.affine = InvertibleModuleWrapper(
            AffineCoupling(_mlp(half), adapter=AffineAdapterNaive)
        )
        # gamma = 0.5 over 24 layers: any difference between the forward's and the
        # backward's evaluations of a function is amplified up to 2**24 times.
        self.momentum = MomentumNet(
            [_mlp(WIDTH) for _ in range(momentum_depth)], gamma=0.5, use_backprop=False
        )
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.rev1(x)
        x = self.rev2(x)
        x = self.affine(x)
        x = self.momentum(x)
        return self.head(x)


#: Most graph breaks of Model's forward in training: one where each wrapper hands
#: over to its (eager) autograd Function, one where the MomentumNet does.
MAX_BREAKS = 4


def _model(momentum_depth: int = 24) -> Model:
    torch.manual_seed(0)
    return Model(momentum_depth)


def _step(model: nn.Module, run: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    for p in model.parameters():
        p.grad = None
    y = run(x.clone())
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(a: tuple[torch.Tensor, list], b: tuple[torch.Tensor, list]) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def compiled() -> Iterator[tuple[Model, nn.Module, Model]]:
    """(model, its compiled version, an independent eager copy), compiled once."""
    torch._dynamo.reset()
    model = _model()
    eager = copy.deepcopy(model)
    run = torch.compile(model)
    # A limit high enough that Dynamo would compile every layer of the MomentumNet
    # if it traced into it, instead of giving up after 8 and running the rest eagerly.
    # (recompile_limit was cache_size_limit before PyTorch 2.6.)
    limit = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    with torch._dynamo.config.patch(**{limit: 64}):
        _step(model, run, torch.randn(5, WIDTH))  # compile now, outside the timed tests
        yield model, run, eager
    torch._dynamo.reset()


def test_compiled_outputs_and_gradients_match_eager(compiled: tuple) -> None:
    model, run, eager = compiled
    x = torch.randn(5, WIDTH)
    _assert_same(_step(model, run, x), _step(eager, eager, x))


def test_same_shapes_do_not_recompile(compiled: tuple) -> None:
    # (torch.compiler.set_stance("fail_on_recompile") cannot tell: it also fails on
    # the frames torch.compiler.disable(recursive=False) leaves uncompiled.)
    model, run, _ = compiled
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    for _ in range(2):
        _step(model, run, torch.randn(5, WIDTH))
    assert before > 0
    assert stats["unique_graphs"] == before


def test_wrappers_still_free_their_inputs_when_compiled(
    compiled: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, run, _ = compiled
    freed: list[tuple[int, ...]] = []
    real_free = wrapper_module.free

    def spy(x: torch.Tensor, *args: object) -> object:
        freed.append(tuple(x.shape))
        return real_free(x, *args)

    monkeypatch.setattr(wrapper_module, "free", spy)
    _step(model, run, torch.randn(5, WIDTH))
    assert freed == [(5, WIDTH)] * 3


def test_graph_breaks_are_only_at_the_autograd_functions() -> None:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_model())(torch.randn(5, WIDTH))
    torch._dynamo.reset()
    assert 1 <= explanation.graph_break_count <= MAX_BREAKS
    for reason in explanation.break_reasons:
        # (PyTorch 2.4 names it torch._dynamo.disable.)
        assert re.search(r"torch\.(compiler|_dynamo)\.disable", reason.reason), reason.reason


def test_inference_compiles_to_one_graph() -> None:
    # Without grad nothing is freed or recomputed: the whole model is traceable.
    model = _model(momentum_depth=2).eval()
    torch._dynamo.reset()
    run = torch.compile(model, fullgraph=True)
    x = torch.randn(5, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_dropout_with_preserve_rng_state_gives_eager_gradients() -> None:
    # Backward replays the recorded RNG state into an eager recomputation, so the
    # wrapper runs such a module eagerly in forward too (Inductor's dropout draws
    # different masks from the same state).
    def make() -> nn.Module:
        torch.manual_seed(0)
        block = AdditiveCoupling(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Tanh()))
        return nn.Sequential(
            nn.Linear(WIDTH, WIDTH), InvertibleModuleWrapper(block, preserve_rng_state=True)
        )

    model, eager = make(), make()
    x = torch.randn(6, WIDTH)
    torch._dynamo.reset()
    torch.manual_seed(1)
    got = _step(model, torch.compile(model), x)
    torch.manual_seed(1)
    expected = _step(eager, eager, x)
    torch._dynamo.reset()
    _assert_same(got, expected)


def test_compiled_submodules_give_plain_gradients_with_dropout() -> None:
    # The recommended way to compile the recomputation in backward too: compile
    # Fm and Gm. With preserve_rng_state=True the replayed masks must match.
    def make(disable: bool) -> nn.Module:
        torch.manual_seed(0)
        fm = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Tanh()))
        block = AdditiveCoupling(fm, copy.deepcopy(fm))
        return nn.Sequential(
            nn.Linear(WIDTH, WIDTH),
            InvertibleModuleWrapper(block, preserve_rng_state=True, disable=disable),
        )

    torch._dynamo.reset()
    wrapped, plain = make(disable=False), make(disable=True)
    x = torch.randn(6, WIDTH)
    torch.manual_seed(1)
    got = _step(wrapped, wrapped, x)
    torch.manual_seed(1)
    expected = _step(plain, plain, x)
    torch._dynamo.reset()
    _assert_same(got, expected)


def test_a_compiled_training_step_that_calls_backward_matches_eager() -> None:
    # torch.compile of the whole step (forward, loss.backward(), optimizer.step()):
    # backward runs from the compiled frame, and the wrappers' backward must not be
    # traced (it read a freed input's metadata and blamed keep_input).
    def make() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        blocks = [InvertibleModuleWrapper(AdditiveCoupling(_mlp(WIDTH // 2))) for _ in range(2)]
        model = nn.Sequential(nn.Linear(WIDTH, WIDTH), *blocks, nn.Linear(WIDTH, 1))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    torch._dynamo.reset()
    (model, opt), (eager, eager_opt) = make(), make()
    compiled_step = torch.compile(step)
    x = torch.randn(4, WIDTH)
    for _ in range(2):
        torch.testing.assert_close(
            compiled_step(model, opt, x), step(eager, eager_opt, x), rtol=1e-5, atol=1e-6
        )
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
