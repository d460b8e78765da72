"""Normalizing flows: log-determinants for invertible blocks, and memory-saving flows.

:class:`Flow` chains blocks that report their log-determinant
(``forward_and_log_det``) into a density with ``log_prob`` and ``sample``; in
training it frees every activation between blocks, as
:class:`~invertnet.InvertibleModuleWrapper` does. Besides the couplings, flows need
the blocks defined here: :class:`ActNorm`, :class:`InvertibleConv1x1`,
:class:`Permutation` and :class:`Squeeze`. See the guide, "Normalizing flows".
"""

from invertnet.flows.blocks import ActNorm, InvertibleConv1x1, Permutation, Squeeze
from invertnet.flows.flow import Flow

__all__ = ["ActNorm", "Flow", "InvertibleConv1x1", "Permutation", "Squeeze"]
