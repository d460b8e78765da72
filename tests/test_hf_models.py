"""The support matrix: Hugging Face ``transformers`` and ``timm`` models, converted.

Every model is built from a tiny random configuration (no download), keeping its
defaults otherwise (dropout included), and trained in training mode, with and
without a padding mask where it takes one. For each:

* ``use_backprop=False`` gives the gradients of ``use_backprop=True``;
* ``gamma=0`` reproduces the original model's outputs and gradients, while
  ``gamma=0.9`` changes them (the momentum stage runs, not the original layers);
* the converted decoders generate, with the key/value cache giving the tokens of
  generation without it.

The tests skip only when ``transformers`` (or ``timm``) is not installed
(``pip install ".[hf]"``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from invertnet import MomentumNet, transform_to_momentumnet

VOCAB, SEQ, BATCH = 64, 10, 2
SMALL = {"num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64}
DECODER = {**SMALL, "hidden_size": 32, "vocab_size": VOCAB, "max_position_embeddings": 64}
# The cache of GPT-2's default config (use_cache=True) is left out of the training
# pass, with a warning (tested below).
CACHE_WARNING = "ignore:MomentumNet\\(use_backprop=False\\). the key/value cache:UserWarning"


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64
    )
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **DECODER))


def _qwen2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **DECODER))


def _gpt_neox() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**DECODER))


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, vocab_size=VOCAB, max_position_embeddings=64, **SMALL
    )
    return transformers.BertModel(config)


def _vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, image_size=16, patch_size=4, **SMALL)
    return transformers.ViTModel(config)


def _timm_vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=4,
        num_classes=5,
    )


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    sub_layers: str
    kind: str  # "decoder", "encoder" (token ids and a mask) or "image"


FAMILIES = {
    "gpt2": Family(_gpt2, "transformer.h", "decoder"),
    "llama": Family(_llama, "model.layers", "decoder"),
    "qwen2": Family(_qwen2, "model.layers", "decoder"),
    "gpt_neox": Family(_gpt_neox, "gpt_neox.layers", "decoder"),
    "bert": Family(_bert, "encoder.layer", "encoder"),
    "vit": Family(_vit, "layers", "image"),
    "timm_vit": Family(_timm_vit, "blocks", "image"),
}
CASES = [
    pytest.param(name, padded, id=f"{name}-{'padded' if padded else 'plain'}")
    for name, family in FAMILIES.items()
    for padded in ([False, True] if family.kind != "image" else [False])
]
DECODERS = [name for name, family in FAMILIES.items() if family.kind == "decoder"]


def _inputs(family: Family, padded: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if family.kind == "image":
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=generator)}
    inputs = {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)}
    if padded:
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        if family.kind == "decoder":
            mask[1, :3] = 0  # left padding, as for generation
        else:
            mask[1, -3:] = 0
        inputs["attention_mask"] = mask
    return inputs


def _call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if "pixel_values" in inputs and not hasattr(model, "config"):  # timm
        return model(inputs["pixel_values"])
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _outputs_and_grads(
    model: nn.Module, inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The output and the parameters' gradients of a fixed random projection of it."""
    torch.manual_seed(1)  # the same dropout masks for every model
    out = _call(model.train(), inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    return out.detach(), list(grads)


def _gradient_error(found: list[torch.Tensor | None], expected: list[torch.Tensor | None]) -> float:
    """Largest difference of two sets of gradients, relative to the largest gradient."""
    assert [g is None for g in found] == [g is None for g in expected]
    pairs = [(a, b) for a, b in zip(found, expected) if b is not None]
    scale = max(b.abs().max().item() for _, b in pairs)
    return max((a - b).abs().max().item() for a, b in pairs) / scale


def _convert(model: nn.Module, family: Family, gamma: float, use_backprop: bool) -> nn.Module:
    converted = transform_to_momentumnet(
        model,
        sub_layers=family.sub_layers,
        keep_first_layer=False,
        gamma=gamma,
        use_backprop=use_backprop,
    )
    stage = converted.get_submodule(family.sub_layers)
    assert isinstance(stage, MomentumNet) or isinstance(stage.momentum, MomentumNet)
    return converted


@pytest.mark.filterwarnings(CACHE_WARNING)
@pytest.mark.parametrize(("name", "padded"), CASES)
def test_backprop_false_gives_the_gradients_of_backprop_true(name: str, padded: bool) -> None:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build()
    inputs = _inputs(family, padded)
    out_plain, grads_plain = _outputs_and_grads(_convert(model, family, 0.9, True), inputs)
    out_light, grads_light = _outputs_and_grads(_convert(model, family, 0.9, False), inputs)
    torch.testing.assert_close(out_light, out_plain, rtol=1e-5, atol=1e-5)
    assert _gradient_error(grads_light, grads_plain) <= 1e-5


@pytest.mark.filterwarnings(CACHE_WARNING)
@pytest.mark.parametrize(("name", "padded"), CASES)
def test_gamma_zero_reproduces_the_original_model(name: str, padded: bool) -> None:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build()
    inputs = _inputs(family, padded)
    out, grads = _outputs_and_grads(model, inputs)
    out_zero, grads_zero = _outputs_and_grads(_convert(model, family, 0.0, False), inputs)
    torch.testing.assert_close(out_zero, out, rtol=1e-5, atol=1e-5)
    assert _gradient_error(grads_zero, grads) <= 1e-5
    # With momentum the model computes something else: the stage really runs.
    out_momentum, _ = _outputs_and_grads(_convert(model, family, 0.9, False), inputs)
    assert (out_momentum - out).abs().max() > 1e-2


@pytest.mark.parametrize("name", DECODERS)
def test_converted_decoders_generate(name: str) -> None:
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build().eval()
    inputs = _inputs(family, padded=True)
    settings: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    original = model.generate(**inputs, **settings)
    same = _convert(model, family, 0.0, False).generate(**inputs, **settings)
    assert torch.equal(same, original)
    converted = _convert(model, family, 0.9, False)
    cached = converted.generate(**inputs, **settings)
    uncached = converted.generate(**inputs, use_cache=False, **settings)
    assert cached.shape == (BATCH, SEQ + 6)
    assert torch.equal(cached, uncached)  # the key/value cache is right for the stage


def test_gpt2_default_config_trains_with_its_cache_left_out() -> None:
    torch.manual_seed(0)
    family = FAMILIES["gpt2"]
    model = _convert(family.build(), family, 0.9, False).train()
    assert model.config.use_cache
    inputs = _inputs(family, padded=True)
    with pytest.warns(UserWarning, match="the key/value cache in args\\[0\\] is not filled"):
        out = model(**inputs)
    out.logits.square().mean().backward()
    cache = _cache_of(out)
    assert cache is None or cache.get_seq_length() == 0


def _cache_of(out: Any) -> Any:
    """The cache a model returned (``cache`` from transformers 5, ``past_key_values`` before)."""
    return out.get("cache", out.get("past_key_values"))


def test_a_filled_cache_is_refused_in_training() -> None:
    torch.manual_seed(0)
    family = FAMILIES["llama"]
    model = _convert(family.build(), family, 0.9, False).train()
    inputs = _inputs(family, padded=False)
    with torch.no_grad():
        cache = _cache_of(model(**inputs, use_cache=True))
    assert cache.get_seq_length() == SEQ
    # The keyword is "cache" from transformers 5.x, "past_key_values" before.
    keyword = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    with pytest.raises(ValueError, match=r"kwargs\['\w+'\] is a key/value cache"):
        model(input_ids=inputs["input_ids"][:, :1], **{keyword: cache})


def test_collected_layer_outputs_are_warned_about_in_training() -> None:
    torch.manual_seed(0)
    family = FAMILIES["llama"]
    model = _convert(family.build(), family, 0.9, False).train()
    inputs = _inputs(family, padded=False)
    with pytest.warns(UserWarning, match="collects its layers' outputs"):
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    assert not out.hidden_states[1].requires_grad  # what the warning says
    with torch.no_grad():  # nothing to warn about without training
        model(**inputs, output_hidden_states=True)
