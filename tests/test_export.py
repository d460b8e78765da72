"""Deployment: eval-mode models built from invertnet modules export, and run the same.

In eval mode the memory machinery stays out of the way (the wrapper calls its
module directly, MomentumNet runs the plain iteration), so ``torch.export`` and
``torch.onnx.export(..., dynamo=True)`` trace ordinary tensor code. The exported
programs must give the eager outputs within 1e-5; the ONNX ones are run with
onnxruntime.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    InvertibleModuleWrapper,
    MomentumCoupling,
    MomentumNet,
    transform_to_momentumnet,
)

WIDTH = 8


def _mlp(width: int, out: int | None = None) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, out or width))


def _additive() -> nn.Module:
    half = WIDTH // 2
    return nn.Sequential(
        *(InvertibleModuleWrapper(AdditiveCoupling(_mlp(half), _mlp(half))) for _ in range(2))
    )


def _affine() -> nn.Module:
    half = WIDTH // 2
    return nn.Sequential(
        InvertibleModuleWrapper(AffineCoupling(_mlp(half), adapter=AffineAdapterNaive)),
        InvertibleModuleWrapper(AffineCoupling(_mlp(half, 2 * half), adapter=AffineAdapterSigmoid)),
    )


def _momentum_coupling() -> nn.Module:
    return nn.Sequential(
        *(InvertibleModuleWrapper(MomentumCoupling(_mlp(WIDTH // 2), gamma=0.9)) for _ in range(2))
    )


def _momentum_net(use_backprop: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return MomentumNet(
            [_mlp(WIDTH) for _ in range(3)],
            gamma=0.9,
            init_speed=True,
            init_function=_mlp(WIDTH),
            use_backprop=use_backprop,
        )

    return build


class _Encoder(nn.Module):
    """A converted Transformer encoder, called with a padding mask."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 16, dropout=0.1, batch_first=True)
        encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.encoder = transform_to_momentumnet(
            encoder, sub_layers="layers", keep_first_layer=False, gamma=0.9
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool)
        padding[:, -1] = True
        return self.encoder(x, src_key_padding_mask=padding)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "additive": _additive,
    "affine": _affine,
    "momentum-coupling": _momentum_coupling,
    "momentum-net-backprop": _momentum_net(True),
    "momentum-net-exact": _momentum_net(False),
    "converted-transformer": _Encoder,
}


def _model_and_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    shape = (2, 5, WIDTH) if name == "converted-transformer" else (4, WIDTH)
    return model, torch.randn(shape)


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_gives_the_eager_outputs(name: str) -> None:
    model, x = _model_and_input(name)
    program = torch.export.export(model, (x,))
    expected = model(x)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
    other = torch.randn_like(x)  # not a constant folded in at export
    torch.testing.assert_close(program.module()(other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_runs_in_onnxruntime_with_the_eager_outputs(name: str) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        pytest.skip(
            f"torch.onnx.export has no dynamo=True before PyTorch 2.5 ({torch.__version__})"
        )
    model, x = _model_and_input(name)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feed_name = session.get_inputs()[0].name
    with torch.no_grad():
        for inputs in (x, torch.randn_like(x)):
            (found,) = session.run(None, {feed_name: inputs.numpy()})
            torch.testing.assert_close(torch.from_numpy(found), model(inputs), rtol=1e-5, atol=1e-5)


def test_momentum_net_in_eval_mode_runs_the_plain_iteration() -> None:
    """Eval mode needs no exact reversal: no fixed-point state, the plain float path."""
    model, x = _model_and_input("momentum-net-exact")
    x.requires_grad_(True)
    y = model(x)
    assert "_Layer" not in type(y.grad_fn).__name__  # an ordinary autograd graph
    model.train()
    assert "_Layer" in type(model(x).grad_fn).__name__  # training keeps no activations
