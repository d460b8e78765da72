"""Log-determinants of couplings.

A coupling step ``a' = combine.apply(a, m)`` with ``m = module(source)`` has a
triangular Jacobian (the source is unchanged), so its log-determinant is that of
``da'/da`` alone, which the :class:`~invertnet.couplings.Combine` gives through an
optional ``log_det(a, m)`` method; the sub-module never contributes. A combine
whose log-determinant depends on ``m`` also defines ``log_det_vjp(m, grad_log_det)``,
the gradient of ``sum(grad_log_det * log_det)`` with respect to ``m``.

The fused backward that carries the log-determinant's gradient is the engine's
own (:meth:`~invertnet.CouplingBase.inverse_and_vjp` with ``grad_log_det``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from invertnet.couplings.base import ModuleOutput

if TYPE_CHECKING:
    from invertnet.couplings.base import CouplingBase

__all__ = ["forward_and_log_det"]

Tensors = tuple[torch.Tensor, ...]


def _check_batch(coupling: CouplingBase, parts: list[torch.Tensor]) -> None:
    name = type(coupling).__name__
    if parts[0].dim() < 1:
        raise ValueError(f"{name}.forward_and_log_det needs a batch dimension (dimension 0)")
    if coupling.split_dim % parts[0].dim() == 0:
        raise ValueError(
            f"{name}.forward_and_log_det: split_dim={coupling.split_dim} halves the batch "
            "dimension (0), so there is no log-determinant per sample; split another dimension"
        )


def _step_log_det(coupling: CouplingBase, combine: object, a: torch.Tensor, m: ModuleOutput):
    log_det = getattr(combine, "log_det", None)
    if log_det is None:
        raise TypeError(
            f"{type(coupling).__name__}: its combine rule {type(combine).__name__} defines no "
            "log_det(a, m), so the coupling's log-determinant is unknown; add one returning "
            "the per-sample log|det da'/da| of shape (batch,)"
        )
    return log_det(a, m)


def forward_and_log_det(
    coupling: CouplingBase, xs: tuple[torch.Tensor, ...]
) -> tuple[ModuleOutput, torch.Tensor]:
    """Run ``coupling.forward(*xs)`` and return its output and log-determinant.

    Returns
    -------
    y, log_det
        The coupling's output (one tensor or a tuple, as ``forward`` returns it) and
        ``log|det dy/dx|`` per sample, of shape ``(batch,)``.
    """
    parts = coupling._split(xs)
    _check_batch(coupling, parts)
    log_det = parts[0].new_zeros(parts[0].shape[0])
    for step in coupling.steps():
        a = parts[step.target]
        m = coupling._evaluate(step, parts[step.source], a)
        term = _step_log_det(coupling, step.combine, a, m)
        if term is not None:
            log_det = log_det + term
        parts[step.target] = step.combine.apply(a, m)
    return coupling._merge(parts, len(xs)), log_det
