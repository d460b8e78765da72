"""Backward of MomentumNet(use_backprop=False): tensors used without being owned, misuse errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from invertnet import MomentumNet
from tests._core_helpers import UsesShared


def test_a_shared_module_unfrozen_after_the_first_backward_gets_its_gradient(
    exact_path: str,
) -> None:
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    functions = [UsesShared(shared) for _ in range(4)]
    light = MomentumNet(functions, gamma=0.9, use_backprop=False)
    plain = MomentumNet(functions, gamma=0.9)
    x = torch.randn(3, 6, requires_grad=True)
    shared.requires_grad_(False)  # frozen at the first backward: nothing to find
    light(x).square().sum().backward()
    assert all(p.grad is None for p in shared.parameters())
    shared.requires_grad_(True)  # unfrozen: the next backward must find it
    light(x).square().sum().backward()
    expected = torch.autograd.grad(plain(x).square().sum(), list(shared.parameters()))
    for got, want in zip((p.grad for p in shared.parameters()), expected):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # And frozen again: it gets nothing more.
    shared.requires_grad_(False)
    before = [p.grad.clone() for p in shared.parameters()]
    light(x).square().sum().backward()
    for p, grad in zip(shared.parameters(), before):
        assert torch.equal(p.grad, grad)


def _start_node(out: torch.Tensor) -> Any:
    """The autograd node that converted the input (found from the output's node)."""
    node = out.grad_fn
    while type(node).__name__ != "_StartBackward":
        node = next(
            n for n, _ in node.next_functions if n is not None and "Backward" in type(n).__name__
        )
    return node


def test_backward_past_the_input_names_the_input_node_not_layer_minus_1() -> None:
    torch.manual_seed(0)
    net = MomentumNet([nn.Linear(4, 4) for _ in range(3)], gamma=0.9, use_backprop=False)
    x = torch.randn(2, 4, requires_grad=True)
    out = net(x)
    out.sum().backward(retain_graph=True)
    # The backward has ended and released the state; reaching the input's node
    # again on its own is the misuse the error describes.
    start = _start_node(out)
    with pytest.raises(RuntimeError) as caught:
        start.apply(torch.empty(0))
    message = str(caught.value)
    assert "layer -1" not in message
    assert "backward reached the network's input (the node before functions[0])" in message
    assert "holds no reconstructed state" in message
    assert "from the output to the input" in message
