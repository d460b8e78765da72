"""Build the bundled models by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from invertnet.models.cifar_resnet import RESNET_LAYOUTS, cifar_resnet, momentum_resnet
from invertnet.models.cifar_revnet import MEMCNN_SPECS, memcnn_model
from invertnet.models.rings import RingsMomentumNet
from invertnet.models.vit import RevViT, ViT

__all__ = ["ModelEntry", "available_models", "get_model", "model_entry"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model.

    Attributes
    ----------
    name : str
        Registry name.
    build : callable
        ``build(num_classes=..., **kwargs)`` returns the module.
    family : str
        ``'memcnn'`` (memcnn's CIFAR experiments), ``'momentumnet'`` (the Momentum
        ResNets paper's CIFAR experiments), ``'vit'`` (the Vision Transformers) or
        ``'rings'`` (the 2-D toy problem); the training command picks its default
        recipe by family.
    momentum : bool
        Whether the model takes ``gamma``.
    parameters : int
        Parameter count for ``reference_classes`` outputs (the documented figure,
        checked by the tests).
    reference_classes : int
        Classes of the dataset the model was made for (10, or 2 for the rings).
    input_kind : str
        ``'image'`` (``(N, 3, 32, 32)`` batches) or ``'points'`` (``(N, 2)``).
    description : str
        One line for listings.
    """

    name: str
    build: Callable[..., nn.Module]
    family: str
    momentum: bool
    parameters: int
    description: str
    reference_classes: int = 10
    input_kind: str = "image"


_MEMCNN_PARAMS = {
    "resnet32": 466_906,
    "resnet110": 1_730_714,
    "resnet164": 1_704_154,
    "revnet38": 573_994,
    "revnet110": 1_854_890,
    "revnet164": 1_983_786,
}
# RevViT and ViT at their defaults (width 192, depth 12): the same weights per block.
_VIT_PARAMS = 5_362_378
_RESNET_PARAMS = {18: 11_173_962, 34: 21_282_122, 101: 42_512_970, 152: 58_156_618}


def _entries() -> dict[str, ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for name, spec in MEMCNN_SPECS.items():
        kind = "RevNet" if spec.reversible else "ResNet"
        entries[name] = ModelEntry(
            name,
            partial(memcnn_model, name),
            "memcnn",
            False,
            _MEMCNN_PARAMS[name],
            f"memcnn's CIFAR {kind}-{name.removeprefix('resnet').removeprefix('revnet')}"
            f" ({spec.kind} units {'/'.join(map(str, spec.units))})",
        )
    for depth in RESNET_LAYOUTS:
        entries[f"resnet{depth}"] = ModelEntry(
            f"resnet{depth}",
            partial(cifar_resnet, depth),
            "momentumnet",
            False,
            _RESNET_PARAMS[depth],
            f"ResNet-{depth} with a CIFAR stem (torchvision blocks)",
        )
    for depth in RESNET_LAYOUTS:
        entries[f"mresnet{depth}"] = ModelEntry(
            f"mresnet{depth}",
            partial(momentum_resnet, depth),
            "momentumnet",
            True,
            _RESNET_PARAMS[depth],
            f"Momentum ResNet-{depth} (MomentumNet over each stage's blocks after the first)",
        )
    for name, build, kind in (("revvit", RevViT, "reversible"), ("vit", ViT, "plain")):
        entries[name] = ModelEntry(
            name,
            build,
            "vit",
            False,
            _VIT_PARAMS,
            f"{'RevViT' if name == 'revvit' else 'ViT'} for 32x32 images, {kind} blocks "
            "(width 192, depth 12, 3 heads, patches 4x4)",
        )
    entries["mresnet_rings"] = ModelEntry(
        "mresnet_rings",
        RingsMomentumNet,
        "rings",
        True,
        RingsMomentumNet.PARAMETERS_2_CLASSES,
        "small MLP Momentum ResNet for the 2-D nested-rings problem",
        reference_classes=2,
        input_kind="points",
    )
    return entries


_REGISTRY = _entries()


def available_models() -> list[str]:
    """Names accepted by :func:`get_model`: memcnn's, then momentumnet's, then the rings model.

    Examples
    --------
    >>> "revnet38" in available_models() and "mresnet18" in available_models()
    True
    """
    return list(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the known names.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(available_models())}"
        ) from None


def get_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name : str
        One of :func:`available_models`.
    num_classes : int
        Output classes.
    **kwargs
        Further arguments of the model's builder: ``gamma`` and ``use_backprop`` for
        the Momentum ResNets, ``in_channels`` for the image models.

    Returns
    -------
    torch.nn.Module
        A freshly initialised model.

    Raises
    ------
    ValueError
        If ``name`` is unknown or ``num_classes`` is not a positive integer.
    TypeError
        If the builder does not take one of ``kwargs``.

    Examples
    --------
    >>> net = get_model("mresnet18", num_classes=100, gamma=0.9)
    >>> net.fc.out_features
    100
    """
    entry = model_entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    accepted = set(inspect.signature(entry.build).parameters) - {"num_classes"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"model {name!r} takes no argument(s) {', '.join(unknown)}; it accepts: "
            f"num_classes, {', '.join(sorted(accepted)) or '(nothing else)'}"
        )
    return entry.build(num_classes=num_classes, **kwargs)
