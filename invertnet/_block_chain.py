"""Consecutive reversible blocks run as one invertible block, under one wrapper call.

A :class:`~invertnet.ReversibleSequential` of ``n`` blocks, each under its own
:class:`~invertnet.InvertibleModuleWrapper`, pays the wrapper's bookkeeping ``n``
times a step: an autograd node, a record of the random state, flags, parameters
and buffers, freeing an input and restoring it. Inside a stack, the activations
between two blocks belong to the stack alone: nobody else can hold them, write
them or hand them to another layer. So where nothing needs a check per block
(the stack decides that: :func:`chainable`), the stack runs consecutive blocks as
one :class:`ReversibleSequentialChain` under one wrapper call, which frees the
chain's input once and keeps its output; the activations in between are never
kept, as in RevLib. Everything the wrapper guards (random state of every
sub-module call, autocast, flags, parameters and buffers with their versions,
inputs written in place, outputs written before backward) is still guarded, by
the one record the wrapper keeps for the chain."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from invertnet._runtime.contract import Buffer, FusedResult, Tensors, as_tuple, block_traits
from invertnet._runtime.forward_state import submodules_and_trainable_parameters
from invertnet._runtime.rng import never_draws
from invertnet.wrappers.invertible import refuse_written_inputs

__all__ = ["ReversibleSequentialChain", "chainable"]


def chainable(block: nn.Module) -> bool:
    """Whether ``block`` (a wrapped module) may run in a :class:`ReversibleSequentialChain`:
    it has the block contract's fused backward, and its reconstructions of finite
    outputs are finite by construction, so the wrapper's finite check has nothing
    to look at between two blocks."""
    traits = block_traits(type(block))
    return traits.fused and traits.says_if_finite and block.reconstruction_keeps_finite() is True


@never_draws
class ReversibleSequentialChain(nn.Module):
    """Blocks of a reversible stack, in order, as one invertible block.

    ``forward`` runs them in turn, ``inverse`` undoes them in reverse, and
    ``inverse_and_vjp`` (the block contract's fused backward) runs each block's own
    fused backward from the last to the first, handing on the reconstructed inputs
    and their gradients, so that one block's worth of activations exists at a time.

    The stack makes one per run of blocks and keeps it out of its own modules (the
    blocks are registered under the stack already; the chain only refers to them,
    under their positions in the stack, which name them in errors).

    Parameters
    ----------
    blocks : dict of str to torch.nn.Module
        The blocks by their position in the stack, in order; each one
        :func:`chainable`, none sharing a module with another.
    """

    #: ``out`` entries may be callables: they are handed to the first block, or
    #: called before it where that block takes tensors only.
    deferred_out: ClassVar[bool] = True
    #: Kept inputs too: recomputing the chain from them would record a graph over
    #: every block, where the fused backward holds one block's activations at a time.
    fuses_kept_inputs: ClassVar[bool] = True
    #: ``outputs`` may come in a list of their own, emptied once the last block has
    #: run its backward: the chain's output is then not held through every other
    #: block's backward (two streams' worth of memory more than separate blocks hold).
    takes_outputs: ClassVar[bool] = True
    #: ``modules_and_trainable_parameters()`` gives the walk of the blocks that the
    #: stack made for this call (:meth:`hand_walk`), so the wrapper walks none.
    lists_own_modules: ClassVar[bool] = True

    def __init__(self, blocks: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, block in blocks.items():
            self.add_module(name, block)
        self._blocks = tuple(blocks.values())
        self._names = tuple(blocks)

    @property
    def blocks(self) -> tuple[nn.Module, ...]:
        """The blocks, in order."""
        return self._blocks

    def hand_walk(self, walks: list[tuple[list[nn.Module], tuple[nn.Parameter, ...]]]) -> None:
        """Take the stack's walk of each block (its modules and trainable parameters,
        made as the stack cut this call's chains, which share no module), for the
        next :meth:`modules_and_trainable_parameters`."""
        self.__dict__["_handed_walk"] = walks

    def modules_and_trainable_parameters(
        self,
    ) -> tuple[list[nn.Module], tuple[nn.Parameter, ...]]:
        """The chain and every module under it (the chain first), and their
        parameters that require grad, each once: from the walk handed to it by
        :meth:`hand_walk` (once), or walked now."""
        walks = self.__dict__.pop("_handed_walk", None)
        if walks is None or len(walks) != len(self._blocks):
            return submodules_and_trainable_parameters(self)
        modules: list[nn.Module] = [self]
        found: dict[int, nn.Parameter] = {}
        for block_modules, params in walks:
            modules.extend(block_modules)
            for p in params:  # two blocks may hold one parameter (tied weights)
                found.setdefault(id(p), p)
        return modules, tuple(found.values())

    def reconstruction_keeps_finite(self) -> bool:
        """Whether every block's reconstructions of finite outputs are finite."""
        return all(chainable(block) for block in self._blocks)

    def forward(self, *xs: torch.Tensor, **kwargs: Any) -> Tensors:
        for name, block in zip(self._names, self._blocks):
            before = [x._version for x in xs]
            ys = as_tuple(block.forward(*xs, **kwargs))
            # As the wrapper checks each block it runs: the blocks' recomputation in
            # backward needs each input as it was passed.
            if [x._version for x in xs] != before:
                refuse_written_inputs(_name(name, block), "forward", xs, tuple(before))
            xs = ys
        return xs

    def inverse(self, *ys: torch.Tensor, **kwargs: Any) -> Tensors:
        for block in reversed(self._blocks):
            ys = as_tuple(block.inverse(*ys, **kwargs))
        return ys

    def inverse_and_vjp(
        self,
        outputs: Sequence[torch.Tensor],
        grad_outputs: Tensors,
        params: Tensors,
        out: Sequence[Buffer] | None = None,
        grad_log_det: torch.Tensor | None = None,
        inputs_need_grad: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> FusedResult:
        """Reconstruct the chain's inputs and back-propagate, block by block.

        The block contract's fused backward (see
        :class:`~invertnet._runtime.contract.FusedInverse`): each block gets the
        parameters among ``params`` that it holds, ``out`` and ``inputs_need_grad``
        reach the first block only (the inputs in between are the chain's own and
        always need their gradients), and the context keywords reach every block.
        """
        if grad_log_det is not None:
            raise TypeError("ReversibleSequentialChain has no log-determinant to back-propagate")
        position = {id(p): k for k, p in enumerate(params)}
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        # A list of the chain's own (takes_outputs): emptied once the last block has read it.
        handed = outputs if isinstance(outputs, list) else None
        for index in range(len(self._blocks) - 1, -1, -1):
            block = self._blocks[index]
            _, held = submodules_and_trainable_parameters(block)
            own = tuple(p for p in held if id(p) in position)
            options = kwargs
            if index == 0 and (out is not None or inputs_need_grad is not None):
                options = dict(kwargs)
                if out is not None:
                    options["out"] = (
                        out
                        if block_traits(type(block)).deferred_out
                        else tuple(o() if callable(o) else o for o in out)
                    )
                if inputs_need_grad is not None:
                    options["inputs_need_grad"] = inputs_need_grad
            outputs, grads, block_grads = block.inverse_and_vjp(
                outputs, grad_outputs, own, **options
            )
            if handed is not None:
                handed.clear()
                handed = None
            for p, g in zip(own, block_grads):
                if g is not None:
                    k = position[id(p)]
                    total = grad_params[k]
                    # A parameter held by two blocks gets both contributions.
                    grad_params[k] = g if total is None else total + g
            if index:
                if any(g is None for g in grads):
                    raise RuntimeError(
                        f"{_name(self._names[index], block)}.inverse_and_vjp gave no "
                        "gradient for one of its inputs although every one was asked "
                        "for; an invertible block's output depends on all its inputs"
                    )
                # In the dtype of the inputs they belong to, as the wrapper hands a
                # block's gradients on (autocast may compute them wider).
                grad_outputs = tuple(
                    g if g.dtype == x.dtype else g.to(x.dtype) for g, x in zip(grads, outputs)
                )
            else:
                grad_outputs = grads
        return outputs, grad_outputs, grad_params


def _name(position: str, block: nn.Module) -> str:
    return f"ReversibleSequential block {position} ({type(block).__name__})"
