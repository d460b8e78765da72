"""Invertible coupling blocks."""

from invertnet.couplings.additive import AdditiveCoupling
from invertnet.couplings.affine import AffineAdapterNaive, AffineAdapterSigmoid, AffineCoupling
from invertnet.couplings.base import Combine, CouplingBase, InPlaceCombine, Step
from invertnet.couplings.factory import available_couplings, create_coupling, register_coupling
from invertnet.couplings.momentum import MomentumCoupling

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "AffineAdapterNaive",
    "AffineAdapterSigmoid",
    "Combine",
    "InPlaceCombine",
    "MomentumCoupling",
    "CouplingBase",
    "Step",
    "available_couplings",
    "create_coupling",
    "register_coupling",
]
