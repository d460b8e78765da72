"""Wrappers that save memory by recomputing inputs in backward."""

from invertnet.wrappers.invertible import InvertibleModuleWrapper

__all__ = ["InvertibleModuleWrapper"]
