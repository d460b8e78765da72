"""Reversible Transformer blocks, RevViT and the reversible decoder LM: gradients equal
to keeping every input, masks and dropout replayed, activation memory flat in depth."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from invertnet import InvertibleModuleWrapper, ReversibleSequential
from invertnet.models import (
    ReversibleDecoderBlock,
    ReversibleDecoderLM,
    ReversibleTransformerBlock,
    RevViT,
    ViT,
)
from invertnet.models.transformer import SelfAttention
from tests._core_helpers import activation_bytes, assert_grads_close

pytestmark = pytest.mark.usefixtures("one_thread")

DROPOUT = {"dropout": 0.1, "attention_dropout": 0.2}


def _revvit(depth: int = 3, **kwargs: object) -> RevViT:
    torch.manual_seed(0)
    return RevViT(image_size=8, patch_size=2, dim=16, depth=depth, heads=2, **kwargs)


def _grads(model: nn.Module, call, seed: int = 3) -> list:
    """Parameter gradients of a fixed random projection of ``call(model)``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks of the forward pass
    out = call(model)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return grads


def _variants(model: nn.Module) -> dict[str, nn.Module]:
    keep, plain = copy.deepcopy(model), copy.deepcopy(model)
    keep.blocks.keep_input = True
    plain.blocks.disable = True
    return {"saving": model, "keep_input": keep, "plain": plain}


def test_revvit_gradients_with_dropout_equal_keep_input_in_float64() -> None:
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    models = _variants(_revvit(**DROPOUT).double())
    grads = {name: _grads(m, lambda m: m(images)) for name, m in models.items()}
    assert_grads_close(grads["keep_input"], grads["saving"], rtol=1e-10, atol=1e-12)
    assert_grads_close(grads["plain"], grads["saving"], rtol=1e-10, atol=1e-12)
    # Guards the comparison: other dropout masks give other gradients.
    other = _grads(models["keep_input"], lambda m: m(images), seed=4)
    assert not torch.allclose(other[0], grads["keep_input"][0])


def test_decoder_lm_with_a_padding_mask_and_dropout_equals_keep_input_in_float64() -> None:
    torch.manual_seed(0)
    lm = ReversibleDecoderLM(vocab_size=30, max_length=12, dim=16, depth=3, heads=2, **DROPOUT)
    models = _variants(lm.double())
    ids = torch.randint(0, 30, (3, 10))
    padding = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    padding[0, ..., 7:] = False  # the first sequence has three padding tokens

    def logits(m: nn.Module) -> torch.Tensor:
        return m(ids, attn_mask=padding)

    grads = {name: _grads(m, logits) for name, m in models.items()}
    assert_grads_close(grads["keep_input"], grads["saving"], rtol=1e-10, atol=1e-12)
    assert_grads_close(grads["plain"], grads["saving"], rtol=1e-10, atol=1e-12)


def test_decoder_blocks_attend_only_to_the_past() -> None:
    torch.manual_seed(0)
    lm = ReversibleDecoderLM(vocab_size=30, max_length=12, dim=16, depth=2, heads=2).eval()
    ids = torch.randint(0, 30, (2, 8))
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 30
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": mask}):
            a, b = lm(ids, **kwargs), lm(changed, **kwargs)
            torch.testing.assert_close(a[:, :5], b[:, :5])
            assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_the_mask_reaches_the_attention_and_its_recomputation() -> None:
    torch.manual_seed(0)
    block = ReversibleTransformerBlock(8, heads=2).double()
    x1, x2 = torch.randn(2, 2, 5, 8, dtype=torch.float64).unbind(0)
    mask = torch.rand(2, 1, 5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    with torch.no_grad():
        masked, unmasked = block(x1, x2, attn_mask=mask), block(x1, x2)
    assert not torch.allclose(masked[0], unmasked[0])
    stack = ReversibleSequential(block, copy.deepcopy(block), split_dim=-1)
    plain = copy.deepcopy(stack)
    plain.disable = True

    def run(m: nn.Module) -> torch.Tensor:
        return torch.cat(m(x1 * 1, x2 * 1, attn_mask=mask), dim=-1)

    assert_grads_close(_grads(plain, run), _grads(stack, run), rtol=1e-10, atol=1e-12)


def test_a_stack_of_blocks_inverts() -> None:
    torch.manual_seed(0)
    stack = ReversibleSequential(
        *(ReversibleTransformerBlock(8, heads=2) for _ in range(3)),
        ReversibleDecoderBlock(8, heads=4),
        split_dim=-1,
    ).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stack.inverse(stack(x)), x)


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("depth", [4, 12])
def test_revvit_activation_memory_is_flat_and_below_checkpointed_vit(depth: int) -> None:
    images = _images()

    def measure(model: nn.Module) -> int:
        return activation_bytes(model, lambda: model(images).sum())

    revvit_small = measure(_revvit(depth=2))
    revvit = measure(_revvit(depth=depth))
    torch.manual_seed(0)
    vit_args = dict(image_size=8, patch_size=2, dim=16, depth=depth, heads=2)
    checkpointed = measure(ViT(**vit_args, checkpoint_blocks=True))
    plain = measure(ViT(**vit_args))
    assert revvit == revvit_small
    assert revvit < checkpointed < plain
    # Every block of the stack runs under a wrapper the stack made.
    model = _revvit(depth=depth)
    assert all(isinstance(w, InvertibleModuleWrapper) for w in model.blocks)


def test_decoder_lm_activation_memory_is_flat_in_depth() -> None:
    ids = torch.randint(0, 30, (2, 10))

    def measure(depth: int, **kwargs: object) -> int:
        torch.manual_seed(0)
        lm = ReversibleDecoderLM(30, 12, dim=16, depth=depth, heads=2, **kwargs)
        return activation_bytes(lm, lambda: lm(ids).sum())

    assert measure(8) == measure(2)
    assert measure(8, keep_input=True) > 2 * measure(2, keep_input=True)


def test_vit_and_revvit_have_the_same_parameters_per_block() -> None:
    count = {cls: sum(p.numel() for p in cls().parameters()) for cls in (RevViT, ViT)}
    assert count[RevViT] == count[ViT]


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: SelfAttention(10, heads=3), r"heads must be a positive int that divides dim=10"),
        (lambda: ReversibleTransformerBlock(0, heads=1), r"dim must be a positive int"),
        (lambda: RevViT(image_size=10, patch_size=4), r"patch_size must divide image_size=10"),
        (lambda: ReversibleTransformerBlock(8, 2, mlp_ratio=0.01), r"mlp_ratio must give"),
    ],
)
def test_bad_shapes_are_refused_when_built(build, match) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs_are_refused_before_the_blocks_run() -> None:
    net = _revvit()
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, channels, 8, 8\)"):
        net(torch.randn(2, 3, 16, 16))
    lm = ReversibleDecoderLM(30, 4, dim=8, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"6 tokens, more than max_length=4"):
        lm(torch.zeros(1, 6, dtype=torch.long))
