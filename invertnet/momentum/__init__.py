"""Momentum ResNets: MomentumNet with exact reversal, and conversion of existing models."""

from invertnet.momentum.net import MomentumNet
from invertnet.momentum.transform import MomentumLayers, transform_to_momentumnet

__all__ = ["MomentumLayers", "MomentumNet", "transform_to_momentumnet"]
