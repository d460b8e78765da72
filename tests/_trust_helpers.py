"""What the trust tests share (``tests/test_trust.py`` on a wrapper,
``tests/test_block_chain.py`` on a stack's chains): the sizes, float64 data made
three ways, a loss whose gradient reaches every output, and comparisons to plain
autograd that also check where gradients are ``None``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

F64 = torch.float64
H = 3  # half the width: a coupling or a stack splits (N, 2H) into two (N, H)
N = 4  # batch size
HOW = ["batch", "leaf", "activation"]
RTOL, ATOL = 1e-10, 1e-12


def net(*middle: nn.Module) -> nn.Sequential:
    """``tanh(Linear(x))`` with optional layers in between (dropout, BatchNorm)."""
    return nn.Sequential(nn.Linear(H, H), *middle, nn.Tanh())


def data(seed: int = 1, requires_grad: bool = True, shape: tuple[int, ...] = (N, 2 * H)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).requires_grad_(requires_grad)


def caller_input(how: str, seed: int = 1, shape: tuple[int, ...] = (N, 2 * H)):
    """(the caller's leaf, what is passed to the layer, a copy of the leaf's values):
    ``"batch"`` a leaf without grad, ``"leaf"`` one with, ``"activation"`` ``leaf * 1``."""
    x = data(seed, requires_grad=how != "batch", shape=shape)
    return x, (x * 1 if how == "activation" else x), x.detach().clone()


def loss_of(y: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A fixed random projection plus a square: gradients depend on every output."""
    ys = y if isinstance(y, tuple) else (y,)
    total = torch.zeros((), dtype=ys[0].dtype)
    for i, o in enumerate(ys):
        g = torch.Generator().manual_seed(100 + i)
        w = torch.randn(o.shape, generator=g, dtype=o.dtype)
        total = total + (o * w).sum() + 0.1 * o.pow(2).sum()
    return total


def detached(y: Any) -> list[torch.Tensor]:
    ys = y if isinstance(y, tuple) else (y,)
    return [o.detach().clone() for o in ys]


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def assert_same(got: list[Any], want: list[Any]) -> None:
    """Equal to rel 1e-10, and ``None`` in the same places."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"entry {i}: {g is None=} but {w is None=}"
        if g is not None:
            torch.testing.assert_close(
                g, w, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"entry {i}: {m}"
            )
