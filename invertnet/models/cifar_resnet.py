"""ResNet-18/34/101/152 for 32x32 images and their Momentum ResNet counterparts.

The ResNets are torchvision's, with the CIFAR stem used by the Momentum ResNets
paper (Sander et al., 2021): a 3x3 stride-1 convolution to 64 channels and no max
pool, so the four stages run at 32, 16, 8 and 4 pixels.

A Momentum ResNet keeps the first block of each stage (it changes the width or the
resolution) and replaces the remaining blocks by one :class:`~invertnet.MomentumNet`
over their residual branches (the block without its skip connection and final
ReLU), as in the paper's CIFAR models:

.. math::

    v_{t+1} = \\gamma v_t + (1 - \\gamma) f_t(x_t), \\qquad x_{t+1} = x_t + v_{t+1}.

Both families have the same parameters. Counts for ``num_classes=10``:

=========  ===================  ===========
model      blocks per stage     parameters
=========  ===================  ===========
resnet18   2, 2, 2, 2 basic     11,173,962
resnet34   3, 4, 6, 3 basic     21,282,122
resnet101  3, 4, 23, 3 bottl.   42,512,970
resnet152  3, 8, 36, 3 bottl.   58,156,618
=========  ===================  ===========
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from torch import nn

from invertnet._optional import require

__all__ = ["RESNET_LAYOUTS", "cifar_resnet", "momentum_resnet", "STAGES"]

#: Block type (torchvision's ``BasicBlock`` or ``Bottleneck``, by name: torchvision
#: is imported only when a ResNet is built) and blocks per stage of each depth
#: (He et al., 2016).
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("BasicBlock", (2, 2, 2, 2)),
    34: ("BasicBlock", (3, 4, 6, 3)),
    101: ("Bottleneck", (3, 4, 23, 3)),
    152: ("Bottleneck", (3, 8, 36, 3)),
}


def _resnet_module() -> ModuleType:
    """torchvision's ResNet module, or an ImportError naming the ``models`` extra."""
    return require("torchvision.models.resnet", "models", "the torchvision ResNets")


#: Names of the stages of a torchvision ResNet.
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _check_depth(depth: int) -> tuple[str, tuple[int, int, int, int]]:
    try:
        return RESNET_LAYOUTS[depth]
    except KeyError:
        raise ValueError(
            f"no ResNet of depth {depth!r}; known depths: {', '.join(map(str, RESNET_LAYOUTS))}"
        ) from None


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> Any:
    """Build a torchvision ResNet with a 3x3, stride-1 stem and no max pool.

    Parameters
    ----------
    depth : int
        18, 34, 101 or 152.
    num_classes : int
        Output classes.
    in_channels : int
        Input image channels.

    Returns
    -------
    torchvision.models.ResNet
        The network.

    Examples
    --------
    >>> import torch
    >>> net = cifar_resnet(18, num_classes=10)
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    block, layout = _check_depth(depth)
    resnet = _resnet_module()
    net = resnet.ResNet(getattr(resnet, block), list(layout), num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


def _residual_branch(block: nn.Module) -> nn.Sequential:
    """The residual branch of a torchvision block, sharing its modules."""
    if block.downsample is not None:
        raise ValueError("a block with a projection shortcut has no plain residual branch")
    resnet = _resnet_module()
    if isinstance(block, resnet.Bottleneck):
        return nn.Sequential(
            block.conv1,
            block.bn1,
            nn.ReLU(inplace=True),
            block.conv2,
            block.bn2,
            nn.ReLU(inplace=True),
            block.conv3,
            block.bn3,
        )
    if isinstance(block, resnet.BasicBlock):
        return nn.Sequential(block.conv1, block.bn1, nn.ReLU(inplace=True), block.conv2, block.bn2)
    raise TypeError(f"expected a torchvision BasicBlock or Bottleneck, got {type(block).__name__}")


def momentum_resnet(
    depth: int,
    num_classes: int = 10,
    gamma: float = 0.9,
    use_backprop: bool = False,
    in_channels: int = 3,
) -> Any:
    """Build the Momentum ResNet counterpart of :func:`cifar_resnet`.

    Parameters
    ----------
    depth : int
        18, 34, 101 or 152.
    num_classes : int
        Output classes.
    gamma : float
        Momentum term, in ``[0, 1)``; the paper's CIFAR-10 default is 0.9.
    use_backprop : bool
        ``False`` (default) recomputes activations in backward from the exact
        inverse of the momentum update instead of storing them, which is the memory
        saving Momentum ResNets exist for; ``True`` stores them as usual. Both compute
        the same function.
    in_channels : int
        Input image channels.

    Returns
    -------
    torchvision.models.ResNet
        The network; ``layerK[0]`` is the stage's first block, ``layerK[1]`` the
        :class:`~invertnet.MomentumNet` over the others.

    Examples
    --------
    >>> import torch
    >>> net = momentum_resnet(18, num_classes=10, gamma=0.9)
    >>> type(net.layer1[1]).__name__
    'MomentumNet'
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """
    from invertnet import MomentumNet  # the models sit on top of the core

    if not 0.0 <= float(gamma) < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
    net = cifar_resnet(depth, num_classes=num_classes, in_channels=in_channels)
    for stage_name in STAGES:
        stage = getattr(net, stage_name)
        branches = [_residual_branch(block) for block in list(stage)[1:]]
        momentum = MomentumNet(branches, gamma=gamma, use_backprop=use_backprop, is_residual=True)
        setattr(net, stage_name, nn.Sequential(stage[0], momentum))
    return net
