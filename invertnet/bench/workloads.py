"""The networks the benchmark trains, each buildable under every method.

A workload builds one network of a given depth three ways that compute the same
function with the same weights (same seed):

``plain``
    Ordinary autograd: every block's activations are kept for backward
    (``InvertibleModuleWrapper(..., disable=True)``, or ``MomentumNet(...,
    use_backprop=True)``).
``checkpoint``
    :func:`torch.utils.checkpoint.checkpoint` around every block
    (``use_reentrant=False``): only block inputs are kept, each block is run again
    in backward.
``invertnet``
    The memory-saving path: ``InvertibleModuleWrapper(..., keep_input=False)``, or
    ``MomentumNet(..., use_backprop=False)``; block inputs are rebuilt from outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import invertnet

__all__ = [
    "METHODS",
    "Batch",
    "CheckpointBlock",
    "Workload",
    "WORKLOADS",
    "build",
]

#: The three ways of training the same network, in the order they are reported.
METHODS = ("plain", "checkpoint", "invertnet")


@dataclass
class Batch:
    """One training batch: positional and keyword arguments of the model's forward."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


class CheckpointBlock(nn.Module):
    """Run ``module`` under :func:`torch.utils.checkpoint.checkpoint` while training.

    Parameters
    ----------
    module : torch.nn.Module
        The block whose activations are recomputed in backward instead of kept.

    Examples
    --------
    >>> import torch
    >>> block = CheckpointBlock(torch.nn.Linear(3, 3))
    >>> block(torch.randn(2, 3, requires_grad=True)).shape
    torch.Size([2, 3])
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.module, *args, use_reentrant=False, **kwargs)
        return self.module(*args, **kwargs)


Builder = Callable[[int, str, int, torch.dtype, torch.device], tuple[nn.Module, Batch]]


@dataclass(frozen=True)
class Workload:
    """A benchmark network.

    Parameters
    ----------
    name : str
        The name used on the command line and in reports.
    description : str
        One line saying what is built, with its default sizes.
    default_batch_size : int
        Batch size used when none is given.
    builder : callable
        ``builder(depth, method, batch_size, dtype, device) -> (model, batch)``.
    requires : tuple of str
        Names the workload needs from the ``invertnet`` package.
    """

    name: str
    description: str
    default_batch_size: int
    builder: Builder
    requires: tuple[str, ...] = ()

    def missing(self) -> list[str]:
        """The required ``invertnet`` names this installation lacks."""
        return [name for name in self.requires if not hasattr(invertnet, name)]


# -- coupling stacks ---------------------------------------------------------
CONV_CHANNELS = 32  # total channels; each half (what Fm and Gm see) has 16
CONV_SIZE = 16  # spatial height and width


def _conv_bn_relu(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
    )


def _affine_net(channels: int) -> nn.Module:
    # AffineAdapterNaive turns the output h into (exp(h), h). The last layer starts
    # small (the usual near-identity initialisation of affine flows): with a scale
    # far from 1 at every block, 128 blocks shrink or grow activations by a factor
    # that the inverse cannot undo in float32.
    head = nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        head.weight.mul_(0.05)
        head.bias.zero_()
    return nn.Sequential(_conv_bn_relu(channels), head)


def _wrap_couplings(couplings: list[nn.Module], method: str) -> nn.Module:
    if method == "plain":
        blocks = [invertnet.InvertibleModuleWrapper(c, disable=True) for c in couplings]
    elif method == "checkpoint":
        blocks = [CheckpointBlock(c) for c in couplings]
    else:
        blocks = [invertnet.InvertibleModuleWrapper(c, keep_input=False) for c in couplings]
    return nn.Sequential(*blocks)


def _image_batch(batch_size: int, dtype: torch.dtype, device: torch.device) -> Batch:
    x = torch.randn(batch_size, CONV_CHANNELS, CONV_SIZE, CONV_SIZE, dtype=dtype, device=device)
    return Batch((x,))


def _additive_conv(
    depth: int, method: str, batch_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, Batch]:
    half = CONV_CHANNELS // 2
    couplings = [
        invertnet.AdditiveCoupling(_conv_bn_relu(half), _conv_bn_relu(half)) for _ in range(depth)
    ]
    model = _wrap_couplings(couplings, method)
    return model.to(device=device, dtype=dtype), _image_batch(batch_size, dtype, device)


def _affine_conv(
    depth: int, method: str, batch_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, Batch]:
    half = CONV_CHANNELS // 2
    couplings = [
        invertnet.AffineCoupling(
            _affine_net(half), _affine_net(half), adapter=invertnet.AffineAdapterNaive
        )
        for _ in range(depth)
    ]
    model = _wrap_couplings(couplings, method)
    return model.to(device=device, dtype=dtype), _image_batch(batch_size, dtype, device)


# -- momentum networks -------------------------------------------------------
MLP_WIDTH = 256
GAMMA = 0.9
TRANSFORMER_DIM = 64
TRANSFORMER_HEADS = 4
TRANSFORMER_SEQ = 32


def _checkpoint_forward(module: nn.Module) -> None:
    """Make ``module`` run its forward under checkpoint while training, in place.

    Used where a wrapper module would not do: a converted Transformer encoder
    reads attributes of its first layer (``layers[0].self_attn``), so the layers
    must keep their own type.
    """
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed


def _checkpoint_functions(model: nn.Module) -> nn.Module:
    """Put every function of every MomentumNet in ``model`` under checkpoint."""
    nets = [m for m in model.modules() if isinstance(m, invertnet.MomentumNet)]
    if not nets:
        raise TypeError("bench: the converted model contains no MomentumNet to checkpoint")
    for net in nets:
        for f in dict.fromkeys(net.functions):  # a module repeated in the list: once
            _checkpoint_forward(f)
    return model


def _momentum_mlp(
    depth: int, method: str, batch_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, Batch]:
    functions = [
        nn.Sequential(nn.Linear(MLP_WIDTH, MLP_WIDTH), nn.Tanh(), nn.Linear(MLP_WIDTH, MLP_WIDTH))
        for _ in range(depth)
    ]
    if method == "checkpoint":
        functions = [CheckpointBlock(f) for f in functions]
    model = invertnet.MomentumNet(functions, gamma=GAMMA, use_backprop=method != "invertnet")
    x = torch.randn(batch_size, MLP_WIDTH, dtype=dtype, device=device)
    return model.to(device=device, dtype=dtype), Batch((x,))


def _transformer_encoder(
    depth: int, method: str, batch_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, Batch]:
    layer = nn.TransformerEncoderLayer(
        TRANSFORMER_DIM,
        TRANSFORMER_HEADS,
        dim_feedforward=2 * TRANSFORMER_DIM,
        dropout=0.0,
        batch_first=True,
    )
    encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
    model = invertnet.transform_to_momentumnet(
        encoder,
        sub_layers=["layers"],
        keep_first_layer=False,
        gamma=GAMMA,
        use_backprop=method != "invertnet",
    )
    if method == "checkpoint":
        model = _checkpoint_functions(model)
    x = torch.randn(batch_size, TRANSFORMER_SEQ, TRANSFORMER_DIM, dtype=dtype, device=device)
    mask = nn.Transformer.generate_square_subsequent_mask(
        TRANSFORMER_SEQ, device=device, dtype=dtype
    )
    return model.to(device=device, dtype=dtype), Batch((x,), {"mask": mask, "is_causal": True})


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "additive-conv",
            "RevNet-style stack of AdditiveCoupling(conv-bn-relu, conv-bn-relu), "
            f"{CONV_CHANNELS} channels, {CONV_SIZE}x{CONV_SIZE}",
            8,
            _additive_conv,
        ),
        Workload(
            "affine-conv",
            "stack of AffineCoupling(conv-bn-relu-conv1x1 near identity, AffineAdapterNaive), "
            f"{CONV_CHANNELS} channels, {CONV_SIZE}x{CONV_SIZE}",
            8,
            _affine_conv,
        ),
        Workload(
            "momentum-mlp",
            f"MomentumNet of MLP blocks (linear-tanh-linear, width {MLP_WIDTH}), gamma {GAMMA}",
            128,
            _momentum_mlp,
            requires=("MomentumNet",),
        ),
        Workload(
            "transformer",
            "nn.TransformerEncoder (causal mask) converted with transform_to_momentumnet, "
            f"d_model {TRANSFORMER_DIM}, {TRANSFORMER_HEADS} heads, sequence {TRANSFORMER_SEQ}",
            8,
            _transformer_encoder,
            requires=("MomentumNet", "transform_to_momentumnet"),
        ),
    )
}


def build(
    workload: str,
    depth: int,
    method: str,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[nn.Module, Batch]:
    """Build ``workload`` at ``depth`` for ``method``, in training mode.

    Parameters
    ----------
    workload : str
        A key of :data:`WORKLOADS`.
    depth : int
        Number of blocks (at least 1).
    method : str
        One of :data:`METHODS`.
    batch_size : int, optional
        Defaults to the workload's own.
    dtype : torch.dtype
        Parameter and input dtype.
    device : torch.device or str
        Where the model and batch live.
    seed : int
        Seed for weights and inputs, so that every method gets the same ones.

    Returns
    -------
    model, batch
        The network and one batch to train it on.

    Examples
    --------
    >>> model, batch = build("additive-conv", depth=2, method="invertnet", batch_size=2)
    >>> model(*batch.args).shape
    torch.Size([2, 32, 16, 16])
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    spec = WORKLOADS[workload]
    missing = spec.missing()
    if missing:
        raise RuntimeError(
            f"workload {workload!r} needs invertnet.{', invertnet.'.join(missing)}, "
            "which this installation does not provide"
        )
    torch.manual_seed(seed)
    model, batch = spec.builder(
        depth,
        method,
        spec.default_batch_size if batch_size is None else batch_size,
        dtype,
        torch.device(device),
    )
    return model.train(), batch
