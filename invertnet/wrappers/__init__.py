"""Wrappers that save memory by recomputing inputs in backward."""

from invertnet.wrappers._storage import InputKeptWarning
from invertnet.wrappers.debug import (
    ReconstructionError,
    debug_reconstruction,
    set_debug_reconstruction,
    set_finite_check,
)
from invertnet.wrappers.invertible import InvertibleModuleWrapper

__all__ = [
    "InputKeptWarning",
    "InvertibleModuleWrapper",
    "ReconstructionError",
    "debug_reconstruction",
    "set_debug_reconstruction",
    "set_finite_check",
]
