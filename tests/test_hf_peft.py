"""Fine-tuning as people do it: peft LoRA adapters and ``transformers.Trainer``.

A converted model with LoRA adapters on a frozen base is a partially frozen
network whose trainable parameters sit inside the momentum stage, where
``use_backprop=False`` must find their gradients by recomputation. For tiny
random Llama and GPT-2 configurations (no download):

* the adapters' gradients equal those of ``use_backprop=True`` (float64, dropout
  on, a padding mask), whether peft is applied after the conversion (as to a
  converted pretrained checkpoint) or before it;
* the frozen weights get no gradient at all;
* the bytes autograd saves for backward do not grow with depth;
* ``transformers.Trainer`` trains a converted model, in full and with LoRA, and
  the loss falls;
* the default ``keep_first_layer=True`` with the default ``use_cache=True`` fails
  in training with an error that names ``keep_first_layer=False``, and either fix
  it names trains.

The tests skip only when ``transformers`` or ``peft`` is not installed
(``pip install ".[hf]"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from invertnet import MomentumNet, transform_to_momentumnet
from invertnet.bench.memory import SavedBytes

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, SEQ, BATCH = 64, 12, 2
GAMMA = 0.9


def _llama(layers: int, **overrides: Any) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **{"use_cache": False, **overrides},
    )
    return transformers.LlamaForCausalLM(config)


def _gpt2(layers: int, **overrides: Any) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        **{"use_cache": False, **overrides},
    )
    return transformers.GPT2LMHeadModel(config)  # dropout 0.1 by default


@dataclass(frozen=True)
class Family:
    build: Callable[..., nn.Module]
    sub_layers: str
    targets: tuple[str, ...]
    fan_in_fan_out: bool  # GPT-2's c_attn is a transposed Conv1D


FAMILIES = {
    "llama": Family(_llama, "model.layers", ("q_proj", "v_proj"), False),
    "gpt2": Family(_gpt2, "transformer.h", ("c_attn",), True),
}


def _lora(model: nn.Module, family: Family, dropout: float = 0.1) -> nn.Module:
    """``model`` with LoRA adapters on the family's attention projections.

    ``init_lora_weights=False`` starts both adapter matrices random: with peft's
    default (B = 0) the gradient of A would be zero and tell nothing.
    """
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=list(family.targets),
        fan_in_fan_out=family.fan_in_fan_out,
        init_lora_weights=False,
    )
    torch.manual_seed(7)  # the same adapters whatever was drawn before
    return peft.get_peft_model(model, config)


def _convert(
    model: nn.Module, sub_layers: str, use_backprop: bool, keep_first_layer: bool = False
) -> nn.Module:
    return transform_to_momentumnet(
        model,
        sub_layers=sub_layers,
        keep_first_layer=keep_first_layer,
        gamma=GAMMA,
        use_backprop=use_backprop,
    )


def _lora_model(family: Family, order: str, use_backprop: bool, layers: int = 3) -> nn.Module:
    """A converted model with adapters, peft applied after (``"convert-then-lora"``) or
    before (``"lora-then-convert"``) the conversion, in float64."""
    torch.manual_seed(0)
    base = family.build(layers)
    if order == "convert-then-lora":
        model = _lora(_convert(base, family.sub_layers, use_backprop), family)
    else:
        # peft wraps the model: the layers are now under base_model.model.
        model = _convert(_lora(base, family), f"base_model.model.{family.sub_layers}", use_backprop)
    return model.to(torch.float64)


def _stage(model: nn.Module, family: Family) -> MomentumNet:
    """The momentum stage of a converted model, with or without peft around it."""
    for path in (family.sub_layers, f"base_model.model.{family.sub_layers}"):
        try:
            stage = model.get_submodule(path)
        except AttributeError:
            continue
        return stage if isinstance(stage, MomentumNet) else stage.momentum
    raise AssertionError("no momentum stage found")


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Every parameter's gradient after one training loss's backward (same dropout masks)."""
    model.train()
    torch.manual_seed(1)
    model(**_batch()).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _short(name: str) -> str:
    """A parameter's name without peft's prefix: the same across both orders."""
    return name.removeprefix("base_model.model.")


ORDERS = ["convert-then-lora", "lora-then-convert"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_adapter_gradients_equal_those_of_backprop_true(name: str, order: str) -> None:
    family = FAMILIES[name]
    light = _lora_model(family, order, use_backprop=False)
    stage = _stage(light, family)
    assert not stage.use_backprop
    trainable = {n for n, p in light.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Every adapter lives inside the momentum stage: its gradient comes from the replay.
    in_stage = {id(p) for p in stage.parameters()}
    assert all(id(p) in in_stage for p in light.parameters() if p.requires_grad)

    found = _train_grads(light)
    expected = _train_grads(_lora_model(family, order, use_backprop=True))
    assert found.keys() == expected.keys()
    scale = max(expected[n].abs().max().item() for n in trainable)
    assert scale > 0
    for n in trainable:
        assert found[n] is not None and expected[n] is not None, n
        assert found[n].dtype == torch.float64
        assert found[n].abs().max() > 1e-3 * scale, n  # every adapter really gets a gradient
        torch.testing.assert_close(found[n], expected[n], rtol=1e-5, atol=1e-5 * scale, msg=n)
    # The frozen base (embeddings, the layers' own weights, the head) gets nothing.
    frozen = [n for n in found if n not in trainable]
    assert len(frozen) > len(trainable)
    assert all(found[n] is None for n in frozen), [n for n in frozen if found[n] is not None]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_both_orders_of_lora_and_conversion_compute_the_same(name: str) -> None:
    """peft before or after the conversion: the same model, the same adapter gradients."""
    family = FAMILIES[name]
    after = _train_grads(_lora_model(family, "convert-then-lora", use_backprop=False))
    before = _train_grads(_lora_model(family, "lora-then-convert", use_backprop=False))
    after = {_short(n): g for n, g in after.items() if g is not None}
    before = {_short(n): g for n, g in before.items() if g is not None}
    assert after.keys() == before.keys() and after
    for n, grad in after.items():
        torch.testing.assert_close(before[n], grad, rtol=1e-12, atol=1e-12, msg=n)


def test_lora_over_a_converted_model_merges() -> None:
    """``merge_and_unload`` folds the adapters into the weights of the stage's layers."""
    family = FAMILIES["llama"]
    model = _lora_model(family, "convert-then-lora", use_backprop=False).eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        assert isinstance(_stage(merged, family), MomentumNet)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-10, atol=1e-10)


def test_lora_adapters_saved_from_a_converted_model_load_into_a_converted_model(
    tmp_path: Path,
) -> None:
    """``save_pretrained`` keeps the adapters under the converted model's module names."""
    family = FAMILIES["llama"]
    trained = _lora_model(family, "convert-then-lora", use_backprop=False).eval()
    trained.save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    fresh = _convert(family.build(3), family.sub_layers, use_backprop=False).to(torch.float64)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def _saved_bytes(model: nn.Module) -> int:
    """Bytes autograd saves for backward in one training forward (parameters excluded)."""
    counter = SavedBytes(model)
    model.train()
    with counter.counting():
        loss = model(**_batch()).loss
    loss.backward()
    return counter.nbytes


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_activation_memory_is_flat_in_depth(name: str) -> None:
    family = FAMILIES[name]
    hidden_state = BATCH * SEQ * 32 * 4  # bytes of one layer's float32 output
    saved = {}
    for use_backprop in (True, False):
        for layers in (2, 6):
            torch.manual_seed(0)
            model = _lora(_convert(family.build(layers), family.sub_layers, use_backprop), family)
            saved[use_backprop, layers] = _saved_bytes(model)
    # use_backprop=True keeps every layer's activations: several hidden states per layer.
    assert saved[True, 6] - saved[True, 2] >= 4 * 4 * hidden_state, saved
    # use_backprop=False keeps none: four more layers add less than one hidden state.
    assert saved[False, 6] - saved[False, 2] < hidden_state, saved
    assert saved[False, 6] < saved[True, 2], saved


def _progressions(count: int, generator: torch.Generator) -> torch.Tensor:
    """Token sequences ``start, start + step, ...`` modulo the vocabulary: learnable."""
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    step = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + step * torch.arange(16)) % VOCAB


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_trains_a_converted_model(lora: bool, tmp_path: Path) -> None:
    family = FAMILIES["llama"]
    torch.manual_seed(0)
    model = _convert(family.build(3), family.sub_layers, use_backprop=False)
    if lora:  # as users set it up: peft's default initialisation (B = 0), no dropout
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(family.targets))
        model = peft.get_peft_model(model, config)
    stage = _stage(model, family)
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    sequences = _progressions(64, torch.Generator().manual_seed(1))
    dataset = [{"input_ids": s, "labels": s} for s in sequences]
    fixed = _progressions(16, torch.Generator().manual_seed(2))

    def fixed_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(input_ids=fixed, labels=fixed).loss.item()

    start_loss = fixed_loss()
    steps = 30
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        # Adapters on a frozen random model learn slowly: a larger rate.
        learning_rate=1e-1 if lora else 1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    assert fixed_loss() < start_loss - 0.05
    # Trainer trained the converted model itself, through its momentum stage.
    assert trainer.model is model and _stage(model, family) is stage and not stage.use_backprop
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before_params[n])}
    in_stage = {id(p) for p in stage.parameters()}
    stage_names = {n for n, p in model.named_parameters() if id(p) in in_stage}
    assert changed & stage_names  # parameters inside the stage were updated
    if lora:
        assert changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kept_first_layer_with_the_default_cache_names_keep_first_layer_false(name: str) -> None:
    family = FAMILIES[name]
    torch.manual_seed(0)
    base = family.build(3, use_cache=True)  # the models' default
    batch = _batch()
    # transform_to_momentumnet's defaults: keep_first_layer=True, use_backprop=False.
    model = transform_to_momentumnet(base, sub_layers=family.sub_layers, gamma=GAMMA).train()
    with pytest.raises(ValueError, match=r"keep_first_layer=True runs the first layer") as error:
        model(**batch)
    message = str(error.value)
    assert "Convert with keep_first_layer=False" in message
    assert "use_cache=False" in message
    # Either fix the message names trains.
    model(**batch, use_cache=False).loss.backward()
    fixed = _convert(base, family.sub_layers, use_backprop=False).train()
    with pytest.warns(UserWarning, match="the key/value cache in \\w+\\[.+\\] is not filled"):
        fixed(**batch).loss.backward()
