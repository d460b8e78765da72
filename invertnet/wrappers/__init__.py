"""Wrappers that save memory by recomputing inputs in backward."""

from invertnet.wrappers._storage import InputKeptWarning
from invertnet.wrappers.debug import (
    ReconstructionError,
    debug_reconstruction,
    set_debug_reconstruction,
    set_finite_check,
)
from invertnet.wrappers.invertible import InvertibleModuleWrapper
from invertnet.wrappers.policy import allow_free, keep_inputs_every

__all__ = [
    "InputKeptWarning",
    "InvertibleModuleWrapper",
    "ReconstructionError",
    "allow_free",
    "debug_reconstruction",
    "keep_inputs_every",
    "set_debug_reconstruction",
    "set_finite_check",
]
