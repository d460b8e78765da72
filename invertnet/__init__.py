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
from invertnet.flows import ActNorm, Flow, InvertibleConv1x1, Permutation, Squeeze
from invertnet.momentum import MomentumNet, transform_to_momentumnet
from invertnet.reversible_sequential import ReversibleSequential
from invertnet.wrappers import (
    InputKeptWarning,
    InvertibleModuleWrapper,
    ReconstructionError,
    allow_free,
    debug_reconstruction,
    keep_inputs_every,
    set_debug_reconstruction,
    set_finite_check,
)

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineAdapterNaive",
    "AffineAdapterSigmoid",
    "AffineCoupling",
    "CouplingBase",
    "Flow",
    "InputKeptWarning",
    "InvertibleConv1x1",
    "InvertibleModuleWrapper",
    "MomentumCoupling",
    "MomentumNet",
    "Permutation",
    "ReconstructionError",
    "ReversibleSequential",
    "allow_free",
    "available_couplings",
    "create_coupling",
    "debug_reconstruction",
    "is_invertible_module",
    "keep_inputs_every",
    "register_coupling",
    "set_debug_reconstruction",
    "Squeeze",
    "set_finite_check",
    "transform_to_momentumnet",
]
