"""Issue 23's patterns on a memory-saving normalizing flow (``Flow(keep_input=False)``).

A flow is a chain of wrapped blocks: each pattern must give what the same flow with
``keep_input=True`` (plain autograd) gives, or raise an error naming the layer,
and the caller's batch must come back bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from invertnet import AffineAdapterNaive, AffineCoupling, Flow
from invertnet.flows import ActNorm, Permutation

RTOL, ATOL = 1e-10, 1e-12


def _flows(dropout: float = 0.0, depth: int = 4) -> tuple[Flow, Flow]:
    """(memory-saving flow, the same flow under plain autograd), float64."""
    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 16), nn.Dropout(dropout), nn.Tanh(), nn.Linear(16, 2))

    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks += [
            ActNorm(4),
            AffineCoupling(net(), adapter=AffineAdapterNaive),
            Permutation.reversed(4),
        ]
    saving = Flow(blocks, event_shape=(4,)).double()
    with torch.no_grad():  # ActNorm initialises on its first batch
        saving.log_prob(torch.randn(16, 4, dtype=torch.float64))
    blocks_copy = list(copy.deepcopy(saving).blocks)
    return saving, Flow(blocks_copy, event_shape=(4,), keep_input=True).double()


def _batch() -> torch.Tensor:
    return torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _grads(flow: Flow) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in flow.parameters()]


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


def test_dropout_with_default_arguments_and_the_batch_bit_identical() -> None:
    saving, plain = _flows(dropout=0.3)
    x = _batch()
    before = x.clone()
    results = []
    for flow in (saving, plain):
        torch.manual_seed(7)
        loss = -flow.log_prob(x).mean()
        loss.backward()
        results.append([loss.detach(), *_grads(flow)])
    _assert_same(*results)
    assert torch.equal(x, before) and x._version == 0


def test_eval_left_on_before_backward_matches_plain() -> None:
    saving, plain = _flows(dropout=0.3)
    x = _batch()
    results = []
    for flow in (saving, plain):
        torch.manual_seed(7)
        loss = -flow.log_prob(x).mean()
        flow.eval()  # a validation helper that forgets train()
        loss.backward()
        flow.train()
        results.append(_grads(flow))
    _assert_same(*results)


def test_optimizer_step_before_backward_is_refused() -> None:
    saving, _ = _flows()
    opt = torch.optim.SGD(saving.parameters(), lr=0.1)
    (-saving.log_prob(_batch()).mean()).backward()  # gradients for the step below
    loss = -saving.log_prob(_batch()).mean()
    opt.step()
    with pytest.raises(RuntimeError, match=r"InvertibleModuleWrapper\(.*parameter .* modified"):
        loss.backward()


def test_functional_call_routes_gradients_to_the_tensors_passed() -> None:
    saving, plain = _flows()
    x = _batch()
    results = []
    for flow in (saving, plain):
        params = {n: (p.detach() * 1.01).requires_grad_() for n, p in flow.named_parameters()}
        z, log_det = functional_call(flow, params, (x,))
        loss = z.square().sum() - log_det.sum()
        flow.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for p in flow.parameters())
        results.append([params[n].grad for n in sorted(params)])
    _assert_same(*results)
