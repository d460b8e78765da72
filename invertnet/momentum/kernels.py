"""The switches of the fused loops of the exact momentum iteration, under their earlier home.

The loops are backends of :mod:`invertnet.momentum.backends` now: ``"native"`` (C,
on the CPU) and ``"triton"`` (Triton, on CUDA), beside the reference, ``"tensor"``.
The names here are those of :mod:`invertnet.momentum.backends`, kept so that code
written for earlier versions runs unchanged: :data:`NATIVE` tells whether the C
extension was built, :func:`native_kernels` and :func:`triton_kernels` enable or
disable one backend in the one switch, :func:`~invertnet.momentum.backends.use_backends`,
and :func:`triton_available` tells whether Triton loads.
"""

from __future__ import annotations

from invertnet.momentum.backends import NATIVE, native_kernels, triton_available, triton_kernels

__all__ = ["NATIVE", "native_kernels", "triton_available", "triton_kernels"]
