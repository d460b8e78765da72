"""invertnet: memory-saving invertible networks for PyTorch.

The public API is re-exported here; memcnn's and momentumnet's names are kept so
their users can switch by changing an import.
"""

from invertnet.checks import is_invertible_module
from invertnet.couplings import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    CouplingBase,
    MomentumCoupling,
    available_couplings,
    create_coupling,
    register_coupling,
)
from invertnet.momentum import MomentumNet, transform_to_momentumnet
from invertnet.wrappers import InvertibleModuleWrapper

__version__ = "0.1.0"

__all__ = [
    "AdditiveCoupling",
    "AffineAdapterNaive",
    "AffineAdapterSigmoid",
    "AffineCoupling",
    "CouplingBase",
    "InvertibleModuleWrapper",
    "MomentumCoupling",
    "MomentumNet",
    "available_couplings",
    "create_coupling",
    "is_invertible_module",
    "register_coupling",
    "transform_to_momentumnet",
]
