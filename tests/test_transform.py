"""transform_to_momentumnet on torchvision ResNets and torch.nn.Transformer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from invertnet import MomentumNet, transform_to_momentumnet
from invertnet.momentum import MomentumLayers
from tests._core_helpers import assert_grads_close

# nn.Transformer(batch_first=False) warns about its own nested-tensor setting.
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
TRANSFORMER_LAYERS = ["encoder.layers", "decoder.layers"]


def _resnet(name: str) -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None)


def _grads(model: nn.Module, inputs: list[torch.Tensor], out: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = (out * out.detach().cos()).sum()
    return list(torch.autograd.grad(loss, inputs + params, allow_unused=True))


# -- ResNets ------------------------------------------------------------------------


@pytest.mark.parametrize("name", RESNETS)
def test_resnets_convert_and_reproduce_with_gamma_zero(name: str) -> None:
    model = _resnet(name).eval()
    converted = transform_to_momentumnet(model, gamma=0.0).eval()
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        original, new = getattr(model, stage), getattr(converted, stage)
        assert isinstance(new, nn.Sequential) and isinstance(new[1], MomentumNet)
        assert len(new[1].functions) == len(original) - 1
        assert type(new[0]) is type(original[0])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-5


def test_converted_copy_shares_nothing_with_the_original() -> None:
    model = _resnet("resnet18")
    converted = transform_to_momentumnet(model)
    originals = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not originals & {t.data_ptr() for t in [*converted.parameters(), *converted.buffers()]}
    # Same weights, same names of parameters in the kept first blocks.
    torch.testing.assert_close(converted.layer1[0].conv1.weight, model.layer1[0].conv1.weight)
    torch.testing.assert_close(
        converted.layer1[1].functions[0].conv1.weight, model.layer1[1].conv1.weight
    )
    assert isinstance(model.layer1, nn.Sequential) and len(model.layer1) == 2  # untouched


def test_resnet18_gamma_zero_reproduces_training_gradients() -> None:
    model = _resnet("resnet18").train()
    converted = transform_to_momentumnet(model, gamma=0.0, use_backprop=False).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y_model, y_conv = model(x), converted(x)
    assert (y_model - y_conv).abs().max() <= 1e-5
    assert_grads_close(
        _grads(model, [x], y_model), _grads(converted, [x], y_conv), rtol=1e-4, atol=1e-7
    )
    # BatchNorm statistics were updated once, as in the original.
    for (name, a), b in zip(model.named_buffers(), converted.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def _batchnorm_eval(model: nn.Module) -> nn.Module:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_modes_agree_at_gamma_09(name: str) -> None:
    # BatchNorm in eval: with batch 2 at 32x32, training-mode BatchNorm in layer4
    # normalises two values per channel, which turns rounding differences into sign
    # flips. The networks themselves train (in eval mode both modes run plainly).
    model = _resnet(name)
    light = _batchnorm_eval(transform_to_momentumnet(model, gamma=0.9, use_backprop=False))
    plain = _batchnorm_eval(transform_to_momentumnet(model, gamma=0.9, use_backprop=True))
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y_plain, y_light = plain(x), light(x)
    assert (y_plain - y_light).norm() <= 1e-5 * y_plain.norm()
    assert_grads_close(
        _grads(plain, [x], y_plain), _grads(light, [x], y_light), rtol=1e-4, atol=1e-7
    )


# -- Transformers ---------------------------------------------------------------------


def _transformer(batch_first: bool, dropout: float = 0.0, layers: int = 3) -> nn.Transformer:
    torch.manual_seed(0)
    return nn.Transformer(
        d_model=16,
        nhead=2,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
        dim_feedforward=32,
        dropout=dropout,
        batch_first=batch_first,
    )


def _inputs(batch_first: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    S, T, B = 6, 5, 3
    shape = (lambda n: (B, n, 16)) if batch_first else (lambda n: (n, B, 16))
    src = torch.randn(shape(S), requires_grad=True)
    tgt = torch.randn(shape(T), requires_grad=True)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[0, -2:] = True
    padding[2, -1] = True
    tgt_padding = torch.zeros(B, T, dtype=torch.bool)
    tgt_padding[1, -1] = True
    src_mask = torch.zeros(S, S, dtype=torch.bool)
    src_mask[0, 3] = True  # True: may not attend
    masks = {
        "src_mask": src_mask,
        "tgt_mask": torch.ones(T, T, dtype=torch.bool).triu(1),
        "src_key_padding_mask": padding,
        "tgt_key_padding_mask": tgt_padding,
        "memory_key_padding_mask": padding,
        "tgt_is_causal": True,
    }
    return src, tgt, masks


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_gamma_zero_reproduces_outputs_and_gradients(batch_first: bool) -> None:
    model = _transformer(batch_first, dropout=0.1)
    converted = transform_to_momentumnet(
        model, sub_layers=TRANSFORMER_LAYERS, keep_first_layer=False, gamma=0.0
    )
    assert isinstance(converted.encoder.layers, MomentumLayers)
    src, tgt, masks = _inputs(batch_first)

    model.eval(), converted.eval()
    assert (converted(src, tgt, **masks) - model(src, tgt, **masks)).abs().max() <= 1e-5
    with torch.no_grad():  # the fast paths of the original layers
        assert (converted(src, tgt, **masks) - model(src, tgt, **masks)).abs().max() <= 1e-5

    # Training, with dropout: the masks are replayed in backward.
    model.train(), converted.train()
    torch.manual_seed(1)
    y_model = model(src, tgt, **masks)
    torch.manual_seed(1)
    y_conv = converted(src, tgt, **masks)
    assert (y_model - y_conv).abs().max() <= 1e-5
    assert_grads_close(
        _grads(model, [src, tgt], y_model),
        _grads(converted, [src, tgt], y_conv),
        rtol=1e-4,
        atol=1e-7,
    )


def test_transformer_masks_are_used() -> None:
    converted = transform_to_momentumnet(
        _transformer(batch_first=True), sub_layers=TRANSFORMER_LAYERS, keep_first_layer=False
    ).eval()
    src, tgt, masks = _inputs(batch_first=True)
    with_masks = converted(src, tgt, **masks)
    without = converted(src, tgt)
    assert (with_masks - without).abs().max() > 1e-3
    # Causality: the first target position does not see the later ones.
    tgt_changed = tgt.detach().clone()
    tgt_changed[:, -1] += 1.0
    changed = converted(src, tgt_changed, **masks)
    torch.testing.assert_close(changed[:, 0], with_masks[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_modes_agree_at_gamma_09(batch_first: bool) -> None:
    model = _transformer(batch_first)
    kwargs = {"sub_layers": TRANSFORMER_LAYERS, "keep_first_layer": False, "gamma": 0.9}
    plain = transform_to_momentumnet(model, use_backprop=True, **kwargs)
    light = transform_to_momentumnet(model, use_backprop=False, **kwargs)
    src, tgt, masks = _inputs(batch_first)
    y_plain, y_light = plain(src, tgt, **masks), light(src, tgt, **masks)
    assert (y_plain - y_light).norm() <= 1e-5 * y_plain.norm()
    assert_grads_close(
        _grads(plain, [src, tgt], y_plain), _grads(light, [src, tgt], y_light), rtol=1e-4, atol=1e-7
    )


def test_transformer_layers_stay_indexable() -> None:
    model = _transformer(batch_first=True, layers=4)
    converted = transform_to_momentumnet(
        model, sub_layers=TRANSFORMER_LAYERS, keep_first_layer=True
    )
    layers = converted.encoder.layers
    assert isinstance(layers, MomentumLayers) and len(layers) == 4
    assert isinstance(layers[0], nn.TransformerEncoderLayer) and layers[0].self_attn.batch_first
    assert isinstance(converted.decoder.layers[3], nn.TransformerDecoderLayer)
    assert list(layers) == [layers]  # a loop over the layers runs the stage once
    src, tgt, masks = _inputs(batch_first=True)
    assert converted(src, tgt, **masks).shape == tgt.shape


class _SlicingStack(nn.Module):
    """Runs its layers as Hugging Face decoders do: ``for layer in self.layers[:n]``."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[: self.depth]:
            x = layer(x)
        return x


def test_a_slice_over_every_layer_runs_the_momentum_stage() -> None:
    torch.manual_seed(0)
    model = _SlicingStack(3)
    converted = transform_to_momentumnet(
        model, sub_layers="layers", keep_first_layer=False, gamma=0.9, is_residual=True
    )
    layers = converted.layers
    assert layers[:3] is layers and layers[0:3:1] is layers and layers[:10] is layers
    x = torch.randn(2, 4)
    stage = MomentumNet(list(model.layers), gamma=0.9, is_residual=True)
    torch.testing.assert_close(converted(x), stage(x))
    # Not the original layers run one after the other.
    assert (converted(x) - model(x)).abs().max() > 1e-3


def test_a_slice_over_some_layers_is_refused() -> None:
    converted = transform_to_momentumnet(_SlicingStack(3), sub_layers="layers")
    with pytest.raises(ValueError, match=r"slice \[None:2:None\] takes part of a momentum stage"):
        converted.layers[:2]


def test_layers_of_different_types_are_refused() -> None:
    model = _SlicingStack(3)
    model.config = type("Config", (), {"layer_types": ["sliding", "full", "full"]})()
    with pytest.raises(ValueError, match=r"layers of 'layers' are of different types"):
        transform_to_momentumnet(model, sub_layers="layers")
    model.config.layer_types = ["full"] * 3
    transform_to_momentumnet(model, sub_layers="layers")


# -- bad input ------------------------------------------------------------------------


def test_missing_path_is_named() -> None:
    model = _resnet("resnet18")
    with pytest.raises(ValueError, match="'layer9' does not name a sub-module of ResNet"):
        transform_to_momentumnet(model, sub_layers=["layer1", "layer9"])
    with pytest.raises(ValueError, match="'encoder.blocks' does not name"):
        transform_to_momentumnet(_transformer(False), sub_layers=["encoder.blocks"])


def test_path_that_is_not_a_stage() -> None:
    with pytest.raises(TypeError, match="'fc' is a Linear; only an nn.Sequential or nn.ModuleList"):
        transform_to_momentumnet(_resnet("resnet18"), sub_layers=["fc"])


def test_stage_with_nothing_left_to_convert() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="'0' has 1 layer"):
        transform_to_momentumnet(model, sub_layers=["0"], keep_first_layer=True)


def test_bad_gamma_is_rejected() -> None:
    with pytest.raises(ValueError, match="gamma must be in"):
        transform_to_momentumnet(_resnet("resnet18"), gamma=1.5)
