"""Misuse of the wrapper fails with an error that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invertnet import (
    AdditiveCoupling,
    InvertibleModuleWrapper,
    ReconstructionError,
    debug_reconstruction,
    is_invertible_module,
)


def _owned_input(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf and a non-leaf computed from it that owns its storage (so it is freed)."""
    leaf = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    return leaf, leaf * 1.0


def _block(**kwargs: object) -> InvertibleModuleWrapper:
    torch.manual_seed(0)
    return InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(2, 2).double()), **kwargs)


class OffByOne(nn.Module):
    """A module whose ``inverse`` is not its inverse."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(3.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.w + 1.0


def test_second_backward_says_to_raise_num_bwd_passes() -> None:
    block = _block()
    _, x = _owned_input(3, 4)
    loss = block(x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"num_bwd_passes=1; raise num_bwd_passes"):
        loss.backward()


def test_num_bwd_passes_allows_that_many_backward_passes_with_equal_gradients() -> None:
    block = _block(num_bwd_passes=2)
    leaf, x = _owned_input(3, 4)
    loss = block(x).sum()
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * first)
    with pytest.raises(RuntimeError, match="num_bwd_passes=2"):
        loss.backward()


def test_modifying_a_freed_input_says_to_keep_the_input() -> None:
    block = _block()
    _, x = _owned_input(3, 4)
    y = block(x)
    assert x.shape == (0,)
    # In place on the freed input: its values could not come back.
    with pytest.raises(RuntimeError, match=r"mul_: .* pass keep_input=True to that wrapper"):
        x.mul_(2)
    y.sum().backward()  # refused before any harm: backward still restores x
    assert x.shape == (3, 4)


def test_modifying_a_freed_input_of_inverse_names_keep_input_inverse() -> None:
    block = _block()
    _, y = _owned_input(3, 4)
    x = block.inverse(y)
    with pytest.raises(RuntimeError, match=r"pass keep_input_inverse=True to that wrapper"):
        y.add_(1)
    with torch._C.DisableTorchFunctionSubclass():  # past the guard: caught in backward
        y.add_(1)
    with pytest.raises(RuntimeError, match=r"modified in place .* pass keep_input_inverse=True"):
        x.sum().backward()


def test_a_kept_input_modified_before_backward_is_refused_as_autograd_does() -> None:
    # The recomputation would run on the modified values: wrong gradients. Plain
    # autograd refuses a write to an input it saved; so does the wrapper.
    block = _block(keep_input=True)
    leaf, x = _owned_input(3, 4)
    y = block(x)
    with torch.no_grad():
        x.mul_(2)
    with pytest.raises(RuntimeError, match=r"input 0 was modified in place .* clone"):
        y.sum().backward()
    assert leaf.grad is None


def test_a_wrong_inverse_is_caught_by_debug_mode_and_by_the_checker() -> None:
    module = OffByOne()
    assert not is_invertible_module(module, (3, 4), test_input_dtype=torch.float64)
    block = InvertibleModuleWrapper(module)
    _, x = _owned_input(3, 4)
    with debug_reconstruction():
        y = block(x)
    with pytest.raises(ReconstructionError) as info:
        y.sum().backward()
    message = str(info.value)
    assert "OffByOne" in message
    assert "largest error is 1 " in message
    assert "inverse really inverts its forward" in message
    assert "invertnet.is_invertible_module" in message
