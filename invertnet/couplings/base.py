"""The coupling engine: one description of a coupling gives its forward, its
inverse and a fused inverse-plus-backward pass.

A coupling splits its input into two parts and applies a short list of
:class:`Step` objects. Each step updates one part (the *target*) with the output
``m`` of a sub-module evaluated on the other part (the *source*), through an
invertible :class:`Combine` rule such as ``a + m`` or ``a * s + t``. Because the
source of every step is unchanged by that step, the step can be undone from its
output, and the same evaluation of the sub-module that undoes it also serves to
back-propagate through it. That is what makes backward cost one extra forward
(the floor of exact recomputation) instead of memcnn's two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from invertnet._rng import call_recorded

__all__ = ["Combine", "Step", "CouplingBase"]

ModuleOutput = torch.Tensor | tuple[torch.Tensor, ...]


class Combine:
    """An invertible rule ``a' = apply(a, m)`` used by a coupling step.

    Subclasses define the rule, its inverse in ``a`` and its vector-Jacobian
    product with respect to ``a`` and ``m``.
    """

    def apply(self, a: torch.Tensor, m: ModuleOutput) -> torch.Tensor:
        raise NotImplementedError

    def invert(self, a_new: torch.Tensor, m: ModuleOutput) -> torch.Tensor:
        raise NotImplementedError

    def vjp(
        self, a: torch.Tensor, m: ModuleOutput, grad: torch.Tensor
    ) -> tuple[torch.Tensor, ModuleOutput]:
        """Return ``(dL/da, dL/dm)`` given ``dL/da'``."""
        raise NotImplementedError

    def output_shapes(self, m: ModuleOutput) -> list[torch.Size]:
        """Shapes of the tensors in ``m``, each of which must equal the target's."""
        return [m.shape] if isinstance(m, torch.Tensor) else [t.shape for t in m]


@dataclass(frozen=True)
class Step:
    """``parts[target] = combine.apply(parts[target], module(parts[source]))``.

    ``module`` names a sub-module attribute of the coupling, or is ``None`` for the
    identity (the source itself is combined into the target).
    """

    target: int
    source: int
    module: str | None
    combine: Combine


def _detach(m: ModuleOutput) -> ModuleOutput:
    if isinstance(m, torch.Tensor):
        return m.detach()
    return tuple(t.detach() for t in m)


def _as_tuple(m: ModuleOutput) -> tuple[torch.Tensor, ...]:
    return (m,) if isinstance(m, torch.Tensor) else tuple(m)


class CouplingBase(nn.Module):
    """Base class of two-part couplings built from :class:`Step` lists.

    A coupling takes either one tensor, split into two equal halves along
    ``split_dim``, and returns one tensor; or two tensors ``(x1, x2)`` and returns
    two. Subclasses implement :meth:`steps`.

    Parameters
    ----------
    split_dim : int
        Dimension along which a single input tensor is halved.
    """

    def __init__(self, split_dim: int = 1) -> None:
        super().__init__()
        if not isinstance(split_dim, int):
            raise TypeError(
                f"{type(self).__name__}: split_dim must be an int, got {type(split_dim).__name__}"
            )
        self.split_dim = split_dim

    def steps(self) -> Sequence[Step]:
        """The steps of the forward pass, in order."""
        raise NotImplementedError

    # -- splitting -----------------------------------------------------------
    def _split(self, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        name = type(self).__name__
        if len(xs) == 2:
            return list(xs)
        if len(xs) != 1:
            raise ValueError(
                f"{name} takes one tensor (split along split_dim={self.split_dim}) "
                f"or two tensors (x1, x2); got {len(xs)} inputs"
            )
        (x,) = xs
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} expects a tensor input, got {type(x).__name__}")
        if not -x.dim() <= self.split_dim < x.dim():
            raise ValueError(
                f"{name}: split_dim={self.split_dim} is out of range for an input of "
                f"shape {tuple(x.shape)}"
            )
        size = x.shape[self.split_dim]
        if size % 2 != 0:
            raise ValueError(
                f"{name}: the input must have an even size along split_dim={self.split_dim} "
                f"to be halved, got shape {tuple(x.shape)} (size {size})"
            )
        return list(torch.chunk(x, 2, dim=self.split_dim))

    def _merge(self, parts: list[torch.Tensor], n_inputs: int) -> ModuleOutput:
        if n_inputs == 2:
            return tuple(parts)
        return torch.cat(parts, dim=self.split_dim)

    # -- evaluation ----------------------------------------------------------
    def _evaluate(self, step: Step, source: torch.Tensor, target: torch.Tensor) -> ModuleOutput:
        if step.module is None:
            return source
        module = getattr(self, step.module)
        # The key holds the coupling itself rather than id(self): under torch.compile
        # an id() makes Dynamo specialise on (and recompile for) every instance.
        m = call_recorded((self, step.module), module, source)
        shapes = step.combine.output_shapes(m)
        if any(s != target.shape for s in shapes):
            # Plain tuples, as the half's shape is written, not torch.Size([...]).
            got = tuple(shapes[0]) if len(shapes) == 1 else [tuple(s) for s in shapes]
            raise ValueError(
                f"{type(self).__name__}: {step.module} maps a half of shape "
                f"{tuple(source.shape)} to {got}, but its output is combined with a half "
                f"of shape {tuple(target.shape)} (split_dim={self.split_dim}); "
                f"{step.module} must preserve the shape of its input half"
            )
        return m

    def forward(self, *xs: torch.Tensor) -> ModuleOutput:
        parts = self._split(xs)
        for step in self.steps():
            m = self._evaluate(step, parts[step.source], parts[step.target])
            parts[step.target] = step.combine.apply(parts[step.target], m)
        return self._merge(parts, len(xs))

    def inverse(self, *ys: torch.Tensor) -> ModuleOutput:
        parts = self._split(ys)
        for step in reversed(self.steps()):
            m = self._evaluate(step, parts[step.source], parts[step.target])
            parts[step.target] = step.combine.invert(parts[step.target], m)
        return self._merge(parts, len(ys))

    def inverse_and_vjp(
        self,
        outputs: tuple[torch.Tensor, ...],
        grad_outputs: tuple[torch.Tensor, ...],
        params: tuple[torch.Tensor, ...],
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], list[torch.Tensor | None]]:
        """Reconstruct the inputs and back-propagate through the forward in one pass.

        Each sub-module is evaluated once, with grad, on the very values the forward
        pass gave it; its output both undoes the step and carries the gradient.

        Parameters
        ----------
        outputs : tuple of torch.Tensor
            The forward pass's outputs (detached).
        grad_outputs : tuple of torch.Tensor
            Gradients of the loss with respect to ``outputs``.
        params : tuple of torch.Tensor
            Parameters whose gradients are wanted.

        Returns
        -------
        inputs, grad_inputs, grad_params
            The reconstructed inputs, the gradients with respect to them, and one
            gradient (or ``None`` where unused) per entry of ``params``.
        """
        parts = [p.detach() for p in self._split(outputs)]
        grads = list(self._split(grad_outputs))
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        for step in reversed(self.steps()):
            t, s = step.target, step.source
            if step.module is None:
                m: ModuleOutput = parts[s]
                a = step.combine.invert(parts[t], m)
                d_a, d_m = step.combine.vjp(a, m, grads[t])
                grads[s] = grads[s] + d_m
            else:
                with torch.enable_grad():
                    source = parts[s].detach().requires_grad_(True)
                    m_graph = self._evaluate(step, source, parts[t])
                m = _detach(m_graph)
                a = step.combine.invert(parts[t], m)
                d_a, d_m = step.combine.vjp(a, m, grads[t])
                outs, d_outs = _as_tuple(m_graph), _as_tuple(d_m)
                needed = [(o, g) for o, g in zip(outs, d_outs) if o.requires_grad]
                if needed:
                    found = torch.autograd.grad(
                        [o for o, _ in needed],
                        (source, *params),
                        [g for _, g in needed],
                        allow_unused=True,
                    )
                    if found[0] is not None:
                        grads[s] = grads[s] + found[0]
                    for i, g in enumerate(found[1:]):
                        if g is not None:
                            grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
            parts[t] = a
            grads[t] = d_a
        n = len(outputs)
        inputs = _as_tuple(self._merge(parts, n))
        grad_inputs = _as_tuple(self._merge(grads, n))
        return inputs, grad_inputs, grad_params
