"""Turn the residual stages of an existing model into Momentum ResNet stages."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from invertnet.momentum.net import MomentumNet

__all__ = ["MomentumLayers", "transform_to_momentumnet"]


class MomentumLayers(nn.Module):
    """A momentum stage standing in for an ``nn.ModuleList`` of layers.

    Models such as :class:`torch.nn.TransformerEncoder` run their layers with
    ``for layer in self.layers: x = layer(x, **masks)`` and inspect
    ``self.layers[0]`` (its attention module, its training flag). This container
    keeps both working: iterating it yields one callable, the whole stage, so the
    loop runs the momentum network once with all the masks; indexing it returns
    the original layers.

    Parameters
    ----------
    first : torch.nn.Module or None
        A layer run as is before the momentum network (``keep_first_layer``).
    momentum : MomentumNet
        The momentum network made of the other layers.
    """

    def __init__(self, first: nn.Module | None, momentum: MomentumNet) -> None:
        super().__init__()
        self.first = first
        self.momentum = momentum

    def _layers(self) -> list[nn.Module]:
        head = [] if self.first is None else [self.first]
        return head + list(self.momentum.functions)

    def __getitem__(self, index: int | slice) -> Any:
        """The original layer at ``index`` (the first layer kept, then the functions).

        A slice that covers every layer (``layers[:n]``, as Hugging Face decoders
        write their loop) returns the stage itself, so that the loop over it runs
        the whole stage; a slice that covers only some raises, since part of a
        momentum stage cannot run on its own.
        """
        layers = self._layers()
        if not isinstance(index, slice):
            return layers[index]
        if range(*index.indices(len(layers))) == range(len(layers)):
            return self
        raise ValueError(
            f"MomentumLayers: the slice [{index.start}:{index.stop}:{index.step}] takes "
            f"part of a momentum stage of {len(layers)} layers. The converted layers run as "
            "one Momentum ResNet, so a loop over some of them would run the original layers "
            "instead; index single layers to inspect them (layers[0]), or convert a model "
            "that runs all of its layers"
        )

    def __len__(self) -> int:
        """The number of original layers."""
        return len(self._layers())

    def __iter__(self) -> Iterator[nn.Module]:
        """Yield the stage itself once: a loop over the layers runs the whole stage."""
        return iter([self])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the first layer (if kept), then the momentum network, with the same arguments."""
        if self.first is not None:
            x = self.first(x, *args, **kwargs)
        return self.momentum(x, *args, **kwargs)


def _resolve(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"transform_to_momentumnet: sub_layers entries must be paths, got {path!r}"
        )
    parent_path, _, name = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        parent = None
    layers = parent._modules.get(name) if parent is not None else None
    if layers is None:
        raise ValueError(
            f"transform_to_momentumnet: sub_layers path {path!r} does not name a sub-module of "
            f"{type(model).__name__}; top-level children are: "
            f"{', '.join(n for n, _ in model.named_children()) or '(none)'}"
        )
    return parent, name, layers


def _convert(
    path: str, layers: nn.Module, keep_first_layer: bool, momentum_args: dict[str, Any]
) -> nn.Module:
    if not isinstance(layers, (nn.Sequential, nn.ModuleList)):
        raise TypeError(
            f"transform_to_momentumnet: {path!r} is a {type(layers).__name__}; only an "
            "nn.Sequential or nn.ModuleList of residual layers can be converted"
        )
    blocks = list(layers)
    first, rest = (blocks[0], blocks[1:]) if keep_first_layer else (None, blocks)
    if not rest:
        raise ValueError(
            f"transform_to_momentumnet: {path!r} has {len(blocks)} layer(s), leaving none to "
            "convert" + (" after the first (keep_first_layer=True)" if keep_first_layer else "")
        )
    momentum = MomentumNet(rest, **momentum_args)
    if isinstance(layers, nn.ModuleList):
        return MomentumLayers(first, momentum)
    return nn.Sequential(first, momentum) if first is not None else momentum


def _check_layer_types(model: nn.Module, path: str, layers: nn.Module) -> None:
    """Refuse a stage whose layers a Hugging Face model gives different masks."""
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != len(layers):
        return
    if len(set(layer_types)) > 1:
        raise ValueError(
            f"transform_to_momentumnet: the layers of {path!r} are of different types "
            f"(config.layer_types: {sorted(set(layer_types))}), and the model gives each "
            "type its own attention mask, picked by the layer's index in its loop. A "
            "momentum stage runs all of its layers with one set of arguments, so some "
            "layers would attend with another type's mask; convert a model whose layers "
            "share one type (for example without sliding-window layers)"
        )


def transform_to_momentumnet(
    model: nn.Module,
    sub_layers: Sequence[str] | str = ("layer1", "layer2", "layer3", "layer4"),
    keep_first_layer: bool = True,
    gamma: float = 0.9,
    use_backprop: bool = False,
    is_residual: bool = False,
) -> nn.Module:
    """Convert the residual stages of a model into Momentum ResNet stages.

    The model is deep-copied (the result shares no parameter or buffer with it),
    and each stage named in ``sub_layers`` is replaced by a :class:`MomentumNet`
    made of the stage's layers, with the same weights.

    Parameters
    ----------
    model : torch.nn.Module
        For example a torchvision ResNet or a :class:`torch.nn.Transformer`.
    sub_layers : sequence of str
        Dotted paths of the stages (an ``nn.Sequential`` or ``nn.ModuleList`` of
        layers that keep the shape of their input), for example ``"layer1"`` or
        ``"encoder.layers"``.
    keep_first_layer : bool
        Keep each stage's first layer as it is (in ResNets it changes the shape)
        and convert only the others.
    gamma : float
        The momentum term, in ``[0, 1]``; 0 reproduces the original model when
        ``is_residual`` is False.
    use_backprop : bool
        See :class:`MomentumNet`; False saves activation memory.
    is_residual : bool
        See :class:`MomentumNet`. The layers of ResNets and Transformers compute
        ``x + branch(x)`` themselves, hence False by default.

    Returns
    -------
    torch.nn.Module
        The converted copy. A converted ``nn.Sequential`` becomes
        ``nn.Sequential(first_layer, MomentumNet)`` (or a bare :class:`MomentumNet`),
        a converted ``nn.ModuleList`` a :class:`MomentumLayers`.

    Raises
    ------
    ValueError
        If a path in ``sub_layers`` does not exist, or a stage has no layer to convert.
    TypeError
        If a path names something other than an ``nn.Sequential`` or ``nn.ModuleList``.

    Notes
    -----
    A converted :class:`torch.nn.TransformerEncoder` has its nested-tensor fast path
    turned off (``use_nested_tensor = False``): it would hand the layers a nested
    tensor, while the momentum update works on the padded one.

    Examples
    --------
    >>> import torch
    >>> from torchvision.models import resnet18
    >>> from invertnet import transform_to_momentumnet
    >>> mresnet = transform_to_momentumnet(resnet18(weights=None), gamma=0.9)
    >>> mresnet(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 1000])
    >>> transformer = torch.nn.Transformer(
    ...     d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    >>> mtransformer = transform_to_momentumnet(
    ...     transformer, sub_layers=["encoder.layers", "decoder.layers"],
    ...     keep_first_layer=False, gamma=0.9)
    >>> src, tgt = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    >>> mtransformer(src, tgt).shape
    torch.Size([2, 4, 16])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"transform_to_momentumnet expects an nn.Module, got {type(model).__name__}"
        )
    paths = [sub_layers] if isinstance(sub_layers, str) else list(sub_layers)
    momentum_args = {"gamma": gamma, "use_backprop": use_backprop, "is_residual": is_residual}
    converted = copy.deepcopy(model)
    # Resolve every path before changing anything, so a bad path leaves no half-done copy.
    targets = [(path, *_resolve(converted, path)) for path in paths]
    for path, _, _, layers in targets:
        _check_layer_types(converted, path, layers)
    replacements = [
        (parent, name, _convert(path, layers, keep_first_layer, momentum_args))
        for path, parent, name, layers in targets
    ]
    for parent, name, replacement in replacements:
        setattr(parent, name, replacement)
        if isinstance(parent, nn.TransformerEncoder):
            parent.use_nested_tensor = False
    return converted
