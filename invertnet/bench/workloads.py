"""The networks the benchmark trains, each buildable under every method it names.

A workload builds one network of a given depth and size several ways, with the
same weights (same seed). The core methods, on every workload:

``plain``
    Ordinary autograd: every block's activations are kept for backward
    (``InvertibleModuleWrapper(..., disable=True)``, ``MomentumNet(...,
    use_backprop=True)``, or the unconverted model for ``llama``).
``checkpoint``
    :func:`torch.utils.checkpoint.checkpoint` around every block
    (``use_reentrant=False``): only block inputs are kept, each block is run again
    in backward (``gradient_checkpointing_enable`` for ``llama``).
``invertnet``
    The memory-saving path: ``InvertibleModuleWrapper(..., keep_input=False)``, or
    ``MomentumNet(..., use_backprop=False)``; block inputs are rebuilt from outputs.

Reference rows where a model was converted (``transformer``):

``original``
    The model before :func:`invertnet.transform_to_momentumnet`, plain autograd.
``original-checkpoint``
    The same under checkpoint per layer: what a user who converts compares against.

Peers, optional, measured when their package is installed (:data:`METHOD_INFO`):
``revlib`` (``revlib.ReversibleSequential(f1, g1, f2, g2, ...)``, additive
couplings), ``memcnn`` (memcnn 1.5's ``InvertibleModuleWrapper`` and couplings) and
``momentumnet`` (momentumnet 0.10's ``MomentumNet(use_backprop=False)``).

Sizes (:data:`SIZES`): ``cpu``, today's small networks, the default on CPU;
``cpu-large``, the coupling stacks at 64 channels, 32x32, batch 16 (the size where
a CPU run separates the reversible methods; the other workloads as ``cpu``);
``gpu``, networks at the scale of training on a GPU, the default on CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import invertnet

__all__ = [
    "CORE_METHODS",
    "METHODS",
    "METHOD_INFO",
    "SIZES",
    "Batch",
    "CheckpointBlock",
    "Method",
    "Workload",
    "WORKLOADS",
    "build",
    "method_available",
]


@dataclass(frozen=True)
class Method:
    """One way of training a workload's network.

    Parameters
    ----------
    name : str
        The name on the command line and in reports.
    description : str
        One line saying what it runs.
    saves_memory : bool
        Whether its activation memory should stay flat in depth; the benchmark
        flags it when it grows (see :mod:`invertnet.bench.report`).
    package : str, optional
        The module a peer method imports; ``None`` for invertnet's own.
    install : str
        How to install ``package``.
    """

    name: str
    description: str
    saves_memory: bool
    package: str | None = None
    install: str = ""


#: Every method, in the order they are reported.
METHOD_INFO: dict[str, Method] = {
    m.name: m
    for m in (
        Method("original", "the model before conversion, plain autograd", False),
        Method("original-checkpoint", "the model before conversion, checkpoint per layer", False),
        Method("plain", "plain autograd: every activation kept for backward", False),
        Method("checkpoint", "torch.utils.checkpoint around every block", False),
        Method("invertnet", "invertnet: inputs freed and rebuilt in backward", True),
        Method(
            "revlib",
            "RevLib ReversibleSequential(f1, g1, ...)",
            True,
            package="revlib",
            install="pip install revlib",
        ),
        Method(
            "memcnn",
            "memcnn 1.5 InvertibleModuleWrapper(keep_input=False)",
            True,
            package="memcnn",
            install="pip install --no-deps memcnn",
        ),
        Method(
            "momentumnet",
            "momentumnet 0.10 MomentumNet(use_backprop=False)",
            True,
            package="momentumnet",
            install="pip install momentumnet",
        ),
    )
}

#: All method names, in report order.
METHODS = tuple(METHOD_INFO)

#: The methods every workload has.
CORE_METHODS = ("plain", "checkpoint", "invertnet")

#: The sizes, smallest first.
SIZES = ("cpu", "cpu-large", "gpu")


def method_available(method: str) -> str | None:
    """Why ``method`` cannot run here (its package is not installed), or ``None``."""
    info = METHOD_INFO[method]
    if info.package is None or importlib.util.find_spec(info.package) is not None:
        return None
    return f"{info.package} is not installed ({info.install})"


def _peer(method: str) -> Any:
    """Import the package of a peer method, with a clear error when it is missing."""
    info = METHOD_INFO[method]
    assert info.package is not None
    try:
        return importlib.import_module(info.package)
    except ImportError as exc:
        raise ImportError(
            f"method {method!r} needs {info.package}, which cannot be imported ({exc}); "
            f"install it with: {info.install}"
        ) from exc


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


class CheckpointCoupling(CheckpointBlock):
    """A coupling whose forward pass runs under :class:`CheckpointBlock`.

    Its ``inverse`` is the coupling's, so that a
    :class:`~invertnet.ReversibleSequential` takes it as a two-stream block; with
    ``disable=True`` the stack calls its forward, checkpointed, directly.
    """

    def inverse(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.inverse(*args, **kwargs)


#: ``builder(depth, method, batch_size, dtype, device, sizes) -> (model, batch)``;
#: ``sizes`` are the workload's parameters at the chosen size.
Builder = Callable[
    [int, str, int, torch.dtype, torch.device, Mapping[str, Any]], tuple[nn.Module, Batch]
]


@dataclass(frozen=True)
class Workload:
    """A benchmark network.

    Parameters
    ----------
    name : str
        The name used on the command line and in reports.
    description : str
        What is built; ``{name}`` fields are filled from the size's parameters.
    builder : callable
        See :data:`Builder`.
    sizes : mapping
        Per size (a key of :data:`SIZES`), the parameters: ``batch_size``,
        ``depths`` (the default depths) and what the builder reads.
    methods : tuple of str
        The methods this workload can be trained with, in report order.
    same_function : mapping
        For a method, the method whose function it computes with the same weights
        (``checkpoint`` computes ``plain``'s); methods absent compute their own.
    requires : tuple of str
        Names the workload needs from the ``invertnet`` package.
    packages : tuple of str
        Other packages it needs (optional workloads).
    install : str
        How to install ``packages``.
    """

    name: str
    description: str
    builder: Builder
    sizes: Mapping[str, Mapping[str, Any]]
    methods: tuple[str, ...] = CORE_METHODS
    same_function: Mapping[str, str] = field(
        default_factory=lambda: {"checkpoint": "plain", "invertnet": "plain"}
    )
    requires: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    install: str = ""

    def missing(self) -> list[str]:
        """The required ``invertnet`` names and packages this installation lacks."""
        names = [f"invertnet.{n}" for n in self.requires if not hasattr(invertnet, n)]
        return names + [p for p in self.packages if importlib.util.find_spec(p) is None]

    def describe(self, size: str = "cpu") -> str:
        """The description at ``size``."""
        return self.description.format(**self.sizes[size])

    def default_batch_size(self, size: str = "cpu") -> int:
        """The batch size at ``size``."""
        return int(self.sizes[size]["batch_size"])

    def default_depths(self, size: str = "cpu") -> tuple[int, ...]:
        """The depths measured at ``size`` when none are given."""
        return tuple(self.sizes[size]["depths"])


# -- coupling stacks ---------------------------------------------------------
_CONV_SIZES = {
    "cpu": {"channels": 32, "spatial": 16, "batch_size": 8, "depths": (8, 32, 128)},
    "cpu-large": {"channels": 64, "spatial": 32, "batch_size": 16, "depths": (8, 32, 128)},
    "gpu": {"channels": 128, "spatial": 32, "batch_size": 128, "depths": (8, 32, 128)},
}


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
    # Every method runs the very couplings as one invertnet.ReversibleSequential:
    # two streams, split once and merged once.
    if method == "plain":
        return invertnet.ReversibleSequential(*couplings, disable=True)
    if method == "checkpoint":
        return invertnet.ReversibleSequential(
            *(CheckpointCoupling(c) for c in couplings), disable=True
        )
    return invertnet.ReversibleSequential(*couplings, keep_input=False)


def _memcnn_stack(couplings: list[nn.Module]) -> nn.Module:
    """The same couplings' functions (their very modules) under memcnn 1.5."""
    memcnn = _peer("memcnn")
    blocks = []
    for c in couplings:
        if isinstance(c, invertnet.AffineCoupling):
            # c.Fm and c.Gm are already adapted to (scale, shift) pairs, which memcnn's
            # coupling takes as they are (no adapter): y = x * s + t in both.
            peer = memcnn.AffineCoupling(c.Fm, c.Gm)
        else:
            peer = memcnn.AdditiveCoupling(c.Fm, c.Gm)
        blocks.append(memcnn.InvertibleModuleWrapper(peer, keep_input=False))
    return nn.Sequential(*blocks)


def _revlib_stack(couplings: list[nn.Module]) -> nn.Module:
    """The same additive couplings as one ``revlib.ReversibleSequential``.

    RevLib's modules alternate: ``(x0, x1) -> (x1, x0 + f(x1))``, so the pair
    ``(F, G)`` maps ``(x1, x2)`` to ``(y1, x2 + G(y1))`` with ``y1 = x1 + F(x2)``:
    the additive coupling, and the halves come out in the coupling's order.
    """
    revlib = _peer("revlib")
    stack = revlib.ReversibleSequential(*(m for c in couplings for m in (c.Fm, c.Gm)))
    return nn.Sequential(_RequiresGrad(), stack)


class _RequiresGrad(nn.Module):
    """Make the input a leaf that requires grad, as RevLib needs.

    RevLib's autograd function takes the parameters as closure, not as inputs: with
    an input that does not require grad (the benchmark's batch), its output would
    not require grad and nothing would be trained. In a real network the stack's
    input comes out of a stem layer and requires grad anyway.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad or not torch.is_grad_enabled():
            return x
        return x.detach().requires_grad_()


def _image_batch(
    batch_size: int, dtype: torch.dtype, device: torch.device, sizes: Mapping[str, Any]
) -> Batch:
    shape = (batch_size, sizes["channels"], sizes["spatial"], sizes["spatial"])
    return Batch((torch.randn(*shape, dtype=dtype, device=device),))


def _coupling_stack(couplings: list[nn.Module], method: str) -> nn.Module:
    if method == "revlib":
        return _revlib_stack(couplings)
    if method == "memcnn":
        return _memcnn_stack(couplings)
    return _wrap_couplings(couplings, method)


def _additive_conv(
    depth: int,
    method: str,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sizes: Mapping[str, Any],
) -> tuple[nn.Module, Batch]:
    half = sizes["channels"] // 2
    couplings = [
        invertnet.AdditiveCoupling(_conv_bn_relu(half), _conv_bn_relu(half)) for _ in range(depth)
    ]
    model = _coupling_stack(couplings, method)
    return model.to(device=device, dtype=dtype), _image_batch(batch_size, dtype, device, sizes)


def _affine_conv(
    depth: int,
    method: str,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sizes: Mapping[str, Any],
) -> tuple[nn.Module, Batch]:
    half = sizes["channels"] // 2
    couplings = [
        invertnet.AffineCoupling(
            _affine_net(half), _affine_net(half), adapter=invertnet.AffineAdapterNaive
        )
        for _ in range(depth)
    ]
    model = _coupling_stack(couplings, method)
    return model.to(device=device, dtype=dtype), _image_batch(batch_size, dtype, device, sizes)


# -- momentum networks -------------------------------------------------------
GAMMA = 0.9

_MLP_SIZES = {
    "cpu": {"width": 256, "batch_size": 128, "depths": (8, 32, 128)},
    "cpu-large": {"width": 256, "batch_size": 128, "depths": (8, 32, 128)},
    "gpu": {"width": 1024, "batch_size": 4096, "depths": (16, 64)},
}
_TRANSFORMER_CPU = dict(d_model=64, heads=4, ff=128, seq=32, batch_size=8, depths=(8, 32, 128))
_TRANSFORMER_SIZES = {
    "cpu": _TRANSFORMER_CPU,
    "cpu-large": _TRANSFORMER_CPU,
    "gpu": dict(d_model=512, heads=8, ff=2048, seq=512, batch_size=32, depths=(12, 48)),
}


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
    depth: int,
    method: str,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sizes: Mapping[str, Any],
) -> tuple[nn.Module, Batch]:
    width = sizes["width"]
    functions = [
        nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        for _ in range(depth)
    ]
    if method == "momentumnet":
        model = _peer("momentumnet").MomentumNet(functions, gamma=GAMMA, use_backprop=False)
    else:
        if method == "checkpoint":
            functions = [CheckpointBlock(f) for f in functions]
        model = invertnet.MomentumNet(functions, gamma=GAMMA, use_backprop=method != "invertnet")
    x = torch.randn(batch_size, width, dtype=dtype, device=device)
    return model.to(device=device, dtype=dtype), Batch((x,))


def _transformer_encoder(
    depth: int,
    method: str,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sizes: Mapping[str, Any],
) -> tuple[nn.Module, Batch]:
    layer = nn.TransformerEncoderLayer(
        sizes["d_model"], sizes["heads"], dim_feedforward=sizes["ff"], dropout=0.0, batch_first=True
    )
    model = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
    if method == "original-checkpoint":
        for block in model.layers:
            _checkpoint_forward(block)
    elif method != "original":
        model = invertnet.transform_to_momentumnet(
            model,
            sub_layers=["layers"],
            keep_first_layer=False,
            gamma=GAMMA,
            use_backprop=method != "invertnet",
        )
        if method == "checkpoint":
            model = _checkpoint_functions(model)
    seq, d_model = sizes["seq"], sizes["d_model"]
    x = torch.randn(batch_size, seq, d_model, dtype=dtype, device=device)
    mask = nn.Transformer.generate_square_subsequent_mask(seq, device=device, dtype=dtype)
    return model.to(device=device, dtype=dtype), Batch((x,), {"mask": mask, "is_causal": True})


# -- Vision Transformers -------------------------------------------------------
_VIT_SIZES = {
    "cpu": dict(dim=96, heads=3, image=32, patch=4, batch_size=8, depths=(4, 12, 24)),
    "cpu-large": dict(dim=192, heads=3, image=32, patch=4, batch_size=16, depths=(6, 12, 24)),
    "gpu": dict(dim=384, heads=6, image=224, patch=16, batch_size=64, depths=(12, 24, 48)),
}


def _revvit(
    depth: int,
    method: str,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sizes: Mapping[str, Any],
) -> tuple[nn.Module, Batch]:
    # Imported here: invertnet.models pulls in torchvision's ResNets.
    from invertnet.models.vit import RevViT, ViT

    shape = dict(
        image_size=sizes["image"],
        patch_size=sizes["patch"],
        dim=sizes["dim"],
        depth=depth,
        heads=sizes["heads"],
    )
    if method == "invertnet":
        model: nn.Module = RevViT(**shape)
    else:
        model = ViT(**shape, checkpoint_blocks=method == "checkpoint")
    images = torch.randn(batch_size, 3, sizes["image"], sizes["image"], dtype=dtype, device=device)
    return model.to(device=device, dtype=dtype), Batch((images,))


# -- a Hugging Face decoder (optional: needs transformers) ---------------------
_LLAMA_SIZES = {
    "cpu": dict(hidden=64, heads=4, seq=64, vocab=256, batch_size=4, depths=(2, 8)),
    "cpu-large": dict(hidden=128, heads=4, seq=128, vocab=512, batch_size=4, depths=(4, 16)),
    "gpu": dict(hidden=256, heads=4, seq=256, vocab=1024, batch_size=16, depths=(4, 16)),
}


class _Logits(nn.Module):
    """A causal language model as ``input_ids -> logits`` (no cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _enable_hf_checkpointing(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed the method; the old name warns there.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _llama(
    depth: int,
    method: str,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    sizes: Mapping[str, Any],
) -> tuple[nn.Module, Batch]:
    transformers = importlib.import_module("transformers")
    hidden, seq, vocab = sizes["hidden"], sizes["seq"], sizes["vocab"]
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=depth,
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["heads"],
        max_position_embeddings=seq,
        use_cache=False,
        attention_dropout=0.0,
    )
    model = transformers.LlamaForCausalLM(config)
    if method == "checkpoint":
        _enable_hf_checkpointing(model)
    elif method == "invertnet":
        model = invertnet.transform_to_momentumnet(
            model,
            sub_layers=["model.layers"],
            keep_first_layer=False,
            gamma=GAMMA,
            use_backprop=False,
        )
    ids = torch.randint(0, vocab, (batch_size, seq), device=device)
    return _Logits(model).to(device=device, dtype=dtype), Batch((ids,))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "additive-conv",
            "RevNet-style stack of AdditiveCoupling(conv-bn-relu, conv-bn-relu), "
            "{channels} channels, {spatial}x{spatial}, batch {batch_size}",
            _additive_conv,
            _CONV_SIZES,
            methods=(*CORE_METHODS, "revlib", "memcnn"),
            same_function={
                "checkpoint": "plain",
                "invertnet": "plain",
                "revlib": "plain",
                "memcnn": "plain",
            },
        ),
        Workload(
            "affine-conv",
            "stack of AffineCoupling(conv-bn-relu-conv1x1 near identity, AffineAdapterNaive), "
            "{channels} channels, {spatial}x{spatial}, batch {batch_size}",
            _affine_conv,
            _CONV_SIZES,
            methods=(*CORE_METHODS, "memcnn"),
            same_function={"checkpoint": "plain", "invertnet": "plain", "memcnn": "plain"},
        ),
        Workload(
            "momentum-mlp",
            "MomentumNet of MLP blocks (linear-tanh-linear, width {width}), gamma "
            f"{GAMMA}, batch {{batch_size}}",
            _momentum_mlp,
            _MLP_SIZES,
            methods=(*CORE_METHODS, "momentumnet"),
            # momentumnet 0.10 computes in float32 whatever the dtype: the same
            # function up to float32 rounding.
            same_function={"checkpoint": "plain", "invertnet": "plain", "momentumnet": "plain"},
            requires=("MomentumNet",),
        ),
        Workload(
            "transformer",
            "nn.TransformerEncoder (causal mask) converted with transform_to_momentumnet, "
            "d_model {d_model}, {heads} heads, ff {ff}, sequence {seq}, batch {batch_size}; "
            "original: before conversion",
            _transformer_encoder,
            _TRANSFORMER_SIZES,
            methods=("original", "original-checkpoint", *CORE_METHODS),
            same_function={
                "checkpoint": "plain",
                "invertnet": "plain",
                "original-checkpoint": "original",
            },
            requires=("MomentumNet", "transform_to_momentumnet"),
        ),
        Workload(
            "revvit",
            "RevViT (invertnet: reversible blocks in a ReversibleSequential) against the ViT "
            "with the same blocks (plain, checkpoint per block), width {dim}, {heads} heads, "
            "{image}x{image} images in {patch}x{patch} patches, batch {batch_size}",
            _revvit,
            _VIT_SIZES,
            # RevViT is another function than the ViT with the same weights.
            same_function={"checkpoint": "plain"},
            requires=("ReversibleSequential",),
        ),
        Workload(
            "llama",
            "LlamaForCausalLM from a random config, hidden {hidden}, {heads} heads, sequence "
            "{seq}, batch {batch_size}; plain: the original, checkpoint: "
            "gradient_checkpointing_enable, invertnet: every layer converted (model.layers, "
            f"gamma {GAMMA}, use_backprop=False)",
            _llama,
            _LLAMA_SIZES,
            # The converted model is a Momentum ResNet: another function than the original's.
            same_function={"checkpoint": "plain"},
            requires=("MomentumNet", "transform_to_momentumnet"),
            packages=("transformers",),
            install="pip install transformers",
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
    size: str = "cpu",
) -> tuple[nn.Module, Batch]:
    """Build ``workload`` at ``depth`` for ``method``, in training mode.

    Parameters
    ----------
    workload : str
        A key of :data:`WORKLOADS`.
    depth : int
        Number of blocks (at least 1).
    method : str
        One of the workload's :attr:`Workload.methods`.
    batch_size : int, optional
        Defaults to the workload's own at ``size``.
    dtype : torch.dtype
        Parameter and input dtype.
    device : torch.device or str
        Where the model and batch live.
    seed : int
        Seed for weights and inputs, so that every method gets the same ones.
    size : str
        One of :data:`SIZES`: the network's width and the default batch size.

    Returns
    -------
    model, batch
        The network and one batch to train it on.

    Raises
    ------
    ValueError
        For an unknown workload, size or method, a method the workload does not
        have, or a depth below 1.
    RuntimeError
        If the workload needs something this installation lacks.
    ImportError
        If a peer method's package cannot be imported.

    Examples
    --------
    >>> model, batch = build("additive-conv", depth=2, method="invertnet", batch_size=2)
    >>> model(*batch.args).shape
    torch.Size([2, 32, 16, 16])
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    spec = WORKLOADS[workload]
    if method not in spec.methods:
        raise ValueError(
            f"unknown method {method!r} for workload {workload!r}; "
            f"its methods: {', '.join(spec.methods)}"
        )
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    missing = spec.missing()
    if missing:
        raise RuntimeError(
            f"workload {workload!r} needs {', '.join(missing)}, which this installation "
            f"does not provide{f' ({spec.install})' if spec.install else ''}"
        )
    torch.manual_seed(seed)
    model, batch = spec.builder(
        depth,
        method,
        spec.default_batch_size(size) if batch_size is None else batch_size,
        dtype,
        torch.device(device),
        spec.sizes[size],
    )
    return model.train(), batch
