"""Context keyword arguments (an attention mask): passed through the wrapper and the
coupling engine to the sub-modules, and the very same objects to the recomputation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from invertnet import AdditiveCoupling, InvertibleModuleWrapper

WIDTH = 6


class MaskedMix(nn.Module):
    """A half-width sub-module that needs ``attn_mask=`` (and draws dropout): it mixes
    the positions of a sequence ``(batch, seq, WIDTH)`` where the mask allows."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.drop = nn.Dropout(0.3)
        self.masks_seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor) -> torch.Tensor:
        self.masks_seen.append(attn_mask)
        scores = torch.einsum("bsd,btd->bst", x, x).masked_fill(~attn_mask, -1e9)
        return self.drop(torch.tanh(self.proj(torch.softmax(scores, -1) @ x)))


class MaskedInvertible(nn.Module):
    """A generic invertible module (no fused backward) taking ``attn_mask=`` in both
    directions: ``y = x + f(x2)`` on the first half, shift-style."""

    def __init__(self) -> None:
        super().__init__()
        self.f = MaskedMix()

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 + self.f(x2, attn_mask=attn_mask), x2], -1)

    def inverse(self, y: torch.Tensor, *, attn_mask: torch.Tensor) -> torch.Tensor:
        y1, y2 = y.chunk(2, dim=-1)
        return torch.cat([y1 - self.f(y2, attn_mask=attn_mask), y2], -1)


def _mask(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, 5, 5, generator=g) > 0.4
    return mask | torch.eye(5, dtype=torch.bool)  # every row attends somewhere


def _grads(
    module: nn.Module, disable: bool, pair: bool, masks: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Input and parameter gradients of one backward per mask (each call then its
    backward, or all calls first when ``masks`` has several: siamese use)."""
    torch.manual_seed(0)
    net = copy.deepcopy(module).double()
    wrapper = InvertibleModuleWrapper(net, disable=disable)
    x = torch.randn(3, 5, 2 * WIDTH, dtype=torch.float64, requires_grad=True)
    losses = []
    for k, mask in enumerate(masks):
        torch.manual_seed(10 + k)
        # Activations, which the wrapper frees and rebuilds.
        if pair:
            y1, y2 = wrapper(*(t * 1 for t in x.chunk(2, dim=-1)), attn_mask=mask)
            y = torch.cat([y1, y2], -1)
        else:
            y = wrapper(x * 1, attn_mask=mask)
        weights = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(k))
        losses.append((y * weights).sum())
    for loss in losses:
        loss.backward()
    return [x.grad, *(p.grad for p in net.parameters())]


MODULES = {
    "coupling-split": (lambda: AdditiveCoupling(MaskedMix(), split_dim=-1), False),
    "coupling-pair": (lambda: AdditiveCoupling(MaskedMix(), split_dim=-1), True),
    "generic": (MaskedInvertible, False),
}


@pytest.mark.parametrize("case", list(MODULES))
@pytest.mark.parametrize("n_masks", [1, 2])
def test_gradients_with_a_mask_and_dropout_equal_plain_autograd(case: str, n_masks: int) -> None:
    make, pair = MODULES[case]
    module = make()
    masks = [_mask(seed) for seed in range(n_masks)]
    want = _grads(module, disable=True, pair=pair, masks=masks)
    got = _grads(module, disable=False, pair=pair, masks=masks)
    assert len(got) == len(want) > 1
    for g, w in zip(got, want):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_different_masks_give_different_gradients() -> None:
    # Guards the test above: the mask really reaches the sub-modules.
    module = AdditiveCoupling(MaskedMix(), split_dim=-1)
    a = _grads(module, disable=False, pair=False, masks=[_mask(0)])
    b = _grads(module, disable=False, pair=False, masks=[_mask(1)])
    assert not torch.allclose(a[0], b[0])


@pytest.mark.parametrize("case", ["coupling-split", "generic"])
def test_the_recomputation_gets_the_very_same_mask_objects(case: str) -> None:
    make, _ = MODULES[case]
    module = make()
    wrapper = InvertibleModuleWrapper(module)
    x = torch.randn(3, 5, 2 * WIDTH, requires_grad=True)
    masks = [_mask(0), _mask(1)]
    ys = [wrapper(x * 1, attn_mask=mask) for mask in masks]
    subs = [m for m in module.modules() if isinstance(m, MaskedMix)]
    for sub in subs:
        sub.masks_seen.clear()
    ys[1].sum().backward()
    ys[0].sum().backward()
    seen = [t for sub in subs for t in sub.masks_seen]
    # Two backward passes. A coupling's fused backward evaluates each of its two
    # sub-modules once (its inverse then forward would take twice as many); the
    # generic module's one sub-module runs in its inverse, then its forward.
    assert len(seen) == 4
    assert {id(t) for t in seen} == {id(m) for m in masks}
    # The masks are context, never freed or hidden.
    for mask, want in zip(masks, (_mask(0), _mask(1))):
        assert torch.equal(mask, want)


@pytest.mark.parametrize("case", list(MODULES))
def test_a_mask_that_requires_grad_is_refused_before_freeing(case: str) -> None:
    make, pair = MODULES[case]
    wrapper = InvertibleModuleWrapper(make())
    x = torch.randn(3, 5, 2 * WIDTH, requires_grad=True)
    inputs = tuple(t * 1 for t in x.chunk(2, dim=-1)) if pair else (x * 1,)
    before = [t.detach().clone() for t in inputs]
    bias = torch.zeros(5, 5, requires_grad=True)
    with pytest.raises(ValueError, match="'bias'.*positionally.*|'bias'.*no gradient"):
        wrapper(*inputs, attn_mask=_mask(0), bias=bias)
    for t, b in zip(inputs, before):
        assert t.shape == b.shape and torch.equal(t.detach(), b)


def test_a_mask_that_requires_grad_inside_a_list_is_refused() -> None:
    wrapper = InvertibleModuleWrapper(MaskedInvertible())
    x = torch.randn(3, 5, 2 * WIDTH, requires_grad=True)
    with pytest.raises(ValueError, match="'extra'"):
        wrapper(x * 1, attn_mask=_mask(0), extra=[torch.ones(2, requires_grad=True)])


@pytest.mark.parametrize("mode", ["disable", "eval", "no_grad"])
def test_keywords_pass_straight_through_when_nothing_is_recorded(mode: str) -> None:
    module = AdditiveCoupling(MaskedMix(), split_dim=-1).eval()
    wrapper = InvertibleModuleWrapper(module, disable=mode == "disable")
    if mode == "eval":
        wrapper.eval()
    x = torch.randn(3, 5, 2 * WIDTH)
    mask = _mask(0)
    with torch.no_grad() if mode == "no_grad" else torch.enable_grad():
        y = wrapper(x, attn_mask=mask)
        back = wrapper.inverse(y, attn_mask=mask)
    torch.testing.assert_close(y, module(x, attn_mask=mask))
    torch.testing.assert_close(back, x)


def test_inverse_direction_takes_keywords() -> None:
    module = AdditiveCoupling(MaskedMix(), split_dim=-1).eval()
    wrapper = InvertibleModuleWrapper(module)
    y = torch.randn(3, 5, 2 * WIDTH, dtype=torch.float64, requires_grad=True)
    module.double()
    mask = _mask(3)
    x = wrapper.inverse(y * 1, attn_mask=mask)
    x.sum().backward()
    want = torch.autograd.grad(module.inverse(y, attn_mask=mask).sum(), y)[0]
    torch.testing.assert_close(y.grad, want)


def test_a_mask_written_in_place_before_backward_raises() -> None:
    wrapper = InvertibleModuleWrapper(AdditiveCoupling(MaskedMix(), split_dim=-1))
    x = torch.randn(3, 5, 2 * WIDTH, requires_grad=True)
    mask = _mask(0)
    y = wrapper(x * 1, attn_mask=mask)
    mask.logical_not_()
    with pytest.raises(RuntimeError, match="'attn_mask'.*modified in place"):
        y.sum().backward()
