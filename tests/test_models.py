"""The bundled models: structure, parameter counts, forward and backward."""

from __future__ import annotations

import warnings

import pytest
import torch

from invertnet import AdditiveCoupling, InvertibleModuleWrapper, MomentumNet
from invertnet.models import available_models, get_model, model_entry

#: Parameter counts in memcnn's memory table (seed 004), for 10 classes.
MEMCNN_TABLE = {
    "resnet32": 466_906,
    "resnet110": 1_730_714,
    "resnet164": 1_704_154,
    "revnet38": 573_994,
    "revnet110": 1_854_890,
    "revnet164": 1_983_786,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input(name: str, batch: int = 2) -> torch.Tensor:
    if model_entry(name).input_kind == "points":
        return torch.randn(batch, 2)
    return torch.randn(batch, 3, 32, 32)


def test_registry_holds_both_papers_models():
    names = set(available_models())
    assert set(MEMCNN_TABLE) <= names
    for depth in (18, 34, 101, 152):
        assert {f"resnet{depth}", f"mresnet{depth}"} <= names
    assert "mresnet_rings" in names


@pytest.mark.parametrize("name", sorted(MEMCNN_TABLE))
def test_memcnn_models_match_the_published_parameter_counts(name):
    count = _count(get_model(name, num_classes=10))
    assert abs(count - MEMCNN_TABLE[name]) <= 0.01 * MEMCNN_TABLE[name]
    assert count == model_entry(name).parameters


@pytest.mark.parametrize("name", available_models())
def test_parameter_count_forward_and_backward(name):
    entry = model_entry(name)
    torch.manual_seed(0)
    model = get_model(name, num_classes=entry.reference_classes)
    assert _count(model) == entry.parameters
    out = model(_input(name))
    assert out.shape == (2, entry.reference_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet32", "revnet38", "resnet18", "mresnet18", "mresnet_rings"])
def test_num_classes_sets_the_output_width(name):
    model = get_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(_input(name)).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "reversible", "widths"),
    [
        ("revnet38", 7, (32, 64, 112)),
        ("revnet110", 25, (32, 64, 128)),
        ("revnet164", 24, (128, 256, 512)),
    ],
)
def test_revnets_use_additive_couplings_under_the_wrapper(name, reversible, widths):
    model = get_model(name)
    wrappers = [m for m in model.modules() if isinstance(m, InvertibleModuleWrapper)]
    assert len(wrappers) == reversible
    assert all(isinstance(w.module, AdditiveCoupling) for w in wrappers)
    # Only a unit right after the stem keeps its input (the stem's ReLU holds it anyway);
    # RevNet-164's first unit widens 32 to 128 channels, so it is not reversible.
    assert sum(w.keep_input for w in wrappers) == (0 if name == "revnet164" else 1)
    # Each stage's reversible units couple two halves of the stage's width.
    for stage, width in zip(model.stages, widths):
        halves = {
            next(m for m in unit.module.Fm.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
            for unit in stage
            if isinstance(unit, InvertibleModuleWrapper)
        }
        assert halves == {width // 2}
    assert model.fc.in_features == widths[-1]


def test_resnets_have_no_reversible_units():
    for name in ("resnet32", "resnet110", "resnet164"):
        assert not any(isinstance(m, InvertibleModuleWrapper) for m in get_model(name).modules())


def test_revnet_frees_activations_and_matches_plain_autograd():
    torch.manual_seed(0)
    model = get_model("revnet38", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        # A wrapper warns when it has to keep an input it should free: none may.
        warnings.simplefilter("error")
        model(x).square().sum().backward()
    saving = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for module in model.modules():
        if isinstance(module, InvertibleModuleWrapper):
            module.disable = True
    # Batch-norm running statistics moved once per forward; compare with the same move.
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, saving[n], rtol=1e-4, atol=1e-5, msg=n)


def test_momentum_resnets_replace_all_but_the_first_block_of_each_stage():
    model = get_model("mresnet34", num_classes=10, gamma=0.8)
    for stage, blocks in zip(("layer1", "layer2", "layer3", "layer4"), (3, 4, 6, 3)):
        first, momentum = getattr(model, stage)
        assert isinstance(momentum, MomentumNet)
        assert len(momentum.functions) == blocks - 1
        assert first.__class__.__name__ == "BasicBlock"
    assert not isinstance(model.maxpool, torch.nn.MaxPool2d)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


def test_momentum_resnet_gamma_is_used():
    torch.manual_seed(0)
    a = get_model("mresnet18", num_classes=10, gamma=0.9).eval()
    b = get_model("mresnet18", num_classes=10, gamma=0.5).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_momentum_resnet_memory_saving_mode_computes_the_same_gradients():
    torch.manual_seed(0)
    light = get_model("mresnet18", num_classes=10, use_backprop=False)
    plain = get_model("mresnet18", num_classes=10, use_backprop=True)
    plain.load_state_dict(light.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (light, plain):
        model(x).square().sum().backward()
    for (n, p), q in zip(light.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        get_model("resnet50")
    for name in available_models():
        assert name in str(info.value)


def test_argument_a_model_does_not_take_is_named():
    with pytest.raises(TypeError, match="gamma"):
        get_model("revnet38", gamma=0.9)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_classes_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet32", num_classes=bad)


@pytest.mark.parametrize("name", ["mresnet18", "mresnet_rings"])
def test_gamma_out_of_range_is_rejected(name):
    with pytest.raises(ValueError, match="gamma"):
        get_model(name, gamma=1.0)
