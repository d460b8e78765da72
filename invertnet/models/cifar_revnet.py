"""The CIFAR ResNets and RevNets of memcnn's experiments.

Pre-activation residual networks in the layout of He et al. (2016) for 32x32
inputs: a 3x3 stem, three stages at strides 1, 2 and 2, then batch norm and ReLU
before the global average pool and the classifier. A ResNet unit adds a residual
branch to its input. A RevNet unit (Gomez et al., 2017) splits the channels in two
and applies an :class:`~invertnet.AdditiveCoupling` of two half-width branches; each
stage's units run in an :class:`~invertnet.ReversibleSequential`, which carries the
two halves from unit to unit and runs every coupling under an
:class:`~invertnet.InvertibleModuleWrapper`, so that its input need not be kept for
backward. A unit that changes the resolution or the width is an ordinary
residual unit with a 1x1 projection shortcut in both families, because a coupling
cannot change the shape of its input.

Parameter counts for ``num_classes=10``; they equal those of memcnn's memory table:

=========  =====  ============================  ==========
model      depth  units per stage, widths       parameters
=========  =====  ============================  ==========
resnet32   32     5 basic, 16/32/64             466,906
resnet110  110    18 basic, 16/32/64            1,730,714
resnet164  164    18 bottleneck, 16/32/64 (x4)  1,704,154
revnet38   38     3 basic, 32/64/112            573,994
revnet110  110    9 basic, 32/64/128            1,854,890
revnet164  164    9 bottleneck, 32/64/128 (x4)  1,983,786
=========  =====  ============================  ==========

Batch norm uses TensorFlow's epsilon of 1e-3 as memcnn did, with PyTorch's default
momentum: memcnn passed TensorFlow's decay of 0.99 as PyTorch's momentum, which keeps
almost nothing of the running averages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from invertnet.couplings import AdditiveCoupling
from invertnet.reversible_sequential import ReversibleSequential
from invertnet.wrappers import InvertibleModuleWrapper

__all__ = [
    "CifarResNet",
    "CifarResNetSpec",
    "MEMCNN_SPECS",
    "memcnn_model",
]


def _bn(channels: int) -> nn.BatchNorm2d:
    # TensorFlow's epsilon as in memcnn; PyTorch's default momentum (see the module notes).
    return nn.BatchNorm2d(channels, eps=1e-3)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


def _branch(kind: str, c_in: int, width: int, stride: int, preactivate: bool) -> nn.Sequential:
    """Residual branch: ``[BN, ReLU,] conv, BN, ReLU, conv[, BN, ReLU, conv]``.

    ``basic`` has two 3x3 convolutions to ``width`` channels; ``bottleneck`` has
    1x1, 3x3, 1x1 convolutions and ends at ``4 * width`` channels. The stride sits
    on the 3x3 convolution.
    """
    layers: list[nn.Module] = []
    if preactivate:
        layers += [_bn(c_in), nn.ReLU(inplace=True)]
    if kind == "basic":
        layers += [
            _conv(c_in, width, 3, stride),
            _bn(width),
            nn.ReLU(inplace=True),
            _conv(width, width, 3),
        ]
    elif kind == "bottleneck":
        layers += [
            _conv(c_in, width, 1),
            _bn(width),
            nn.ReLU(inplace=True),
            _conv(width, width, 3, stride),
            _bn(width),
            nn.ReLU(inplace=True),
            _conv(width, 4 * width, 1),
        ]
    else:
        raise ValueError(f"unknown block kind {kind!r}; expected 'basic' or 'bottleneck'")
    return nn.Sequential(*layers)


class ResidualUnit(nn.Module):
    """``branch(x) + shortcut(x)``, the shortcut a 1x1 projection when shapes change."""

    def __init__(self, kind: str, c_in: int, width: int, stride: int, preactivate: bool) -> None:
        super().__init__()
        c_out = width * (4 if kind == "bottleneck" else 1)
        self.branch = _branch(kind, c_in, width, stride, preactivate)
        self.shortcut: nn.Module = (
            nn.Sequential(_conv(c_in, c_out, 1, stride), _bn(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


def _coupling(kind: str, channels: int, preactivate: bool) -> AdditiveCoupling:
    """A RevNet unit: an additive coupling of two half-width branches."""
    half = channels // 2
    width = half // 4 if kind == "bottleneck" else half
    return AdditiveCoupling(
        Fm=_branch(kind, half, width, 1, preactivate),
        Gm=_branch(kind, half, width, 1, preactivate),
    )


@dataclass(frozen=True)
class CifarResNetSpec:
    """The shape of one network of the family.

    Attributes
    ----------
    kind : str
        ``'basic'`` or ``'bottleneck'`` units.
    units : tuple of int
        Units per stage.
    widths : tuple of int
        Branch width per stage (a bottleneck stage outputs four times as many channels).
    stem : int
        Channels out of the 3x3 stem.
    reversible : bool
        RevNet (reversible units where the shape allows) or ResNet.
    """

    kind: str
    units: tuple[int, ...]
    widths: tuple[int, ...]
    stem: int
    reversible: bool


class CifarResNet(nn.Module):
    """A pre-activation ResNet or RevNet for 32x32 images.

    Parameters
    ----------
    spec : CifarResNetSpec
        Depth, widths and unit type.
    num_classes : int
        Output classes.
    in_channels : int
        Input image channels.

    Examples
    --------
    >>> import torch
    >>> from invertnet.models import get_model
    >>> net = get_model("revnet38", num_classes=10)
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, spec: CifarResNetSpec, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if len(spec.units) != len(spec.widths):
            raise ValueError(
                f"spec has {len(spec.units)} stage unit counts but {len(spec.widths)} widths"
            )
        self.spec = spec
        expansion = 4 if spec.kind == "bottleneck" else 1
        self.stem = nn.Sequential(_conv(in_channels, spec.stem, 3), _bn(spec.stem), nn.ReLU())
        channels = spec.stem
        stages: list[nn.Module] = []
        for index, (units, width) in enumerate(zip(spec.units, spec.widths)):
            stride = 1 if index == 0 else 2
            stage: list[nn.Module] = []
            for u in range(units):
                # The stem ends in BN and ReLU, so the very first unit needs no pre-activation.
                preactivate = not (index == 0 and u == 0)
                shape_kept = stride == 1 and channels == width * expansion
                if spec.reversible and shape_kept:
                    coupling = _coupling(spec.kind, channels, preactivate)
                    if index == 0 and u == 0:
                        # The stem's ReLU keeps its output for its own backward anyway,
                        # so freeing the first unit's input would save nothing.
                        stage.append(InvertibleModuleWrapper(coupling, keep_input=True))
                    else:
                        stage.append(coupling)
                else:
                    stage.append(ResidualUnit(spec.kind, channels, width, stride, preactivate))
                channels = width * expansion
                stride = 1
            # A RevNet stage carries two streams through its couplings (split once,
            # merged once); its first, shape-changing unit runs as a non-invertible
            # layer, which keeps its input for backward.
            stages.append(
                ReversibleSequential(*stage) if spec.reversible else nn.Sequential(*stage)
            )
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            _bn(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of images ``(N, C, H, W)``."""
        return self.fc(self.head(self.stages(self.stem(x))))


#: memcnn's six experiment networks (its experiments configuration file).
MEMCNN_SPECS: dict[str, CifarResNetSpec] = {
    "resnet32": CifarResNetSpec("basic", (5, 5, 5), (16, 32, 64), 16, False),
    "resnet110": CifarResNetSpec("basic", (18, 18, 18), (16, 32, 64), 16, False),
    "resnet164": CifarResNetSpec("bottleneck", (18, 18, 18), (16, 32, 64), 16, False),
    "revnet38": CifarResNetSpec("basic", (3, 3, 3), (32, 64, 112), 32, True),
    "revnet110": CifarResNetSpec("basic", (9, 9, 9), (32, 64, 128), 32, True),
    "revnet164": CifarResNetSpec("bottleneck", (9, 9, 9), (32, 64, 128), 32, True),
}


def memcnn_model(name: str, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """Build one of :data:`MEMCNN_SPECS` by name."""
    return CifarResNet(MEMCNN_SPECS[name], num_classes=num_classes, in_channels=in_channels)
