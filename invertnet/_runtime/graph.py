"""What a recomputed graph reaches besides the tensors a layer knows of."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["unowned_leaves"]

# The type of the node that accumulates a leaf's gradient.
_ACCUMULATE_GRAD = type(torch.zeros(1, requires_grad=True).view(1).grad_fn.next_functions[0][0])


def unowned_leaves(
    outputs: Sequence[torch.Tensor], known: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """The leaves that ``outputs`` reach besides ``known`` and that require grad.

    Such tensors are used by a module without being its parameters or call
    arguments: a parameter of another module, captured in a closure, for example.
    A memory-saving layer cannot list them among its inputs (it cannot know them
    in forward).

    The graph is walked afresh at every call: which tensors it reaches, and which
    of them require grad, may change between calls (a module frozen, then
    unfrozen; a closure over a tensor computed without grad, then with it), so a
    remembered answer could withhold a gradient. The walk is a pass over the
    graph's nodes in Python, about a microsecond per node, with no look at a
    tensor's values.
    """
    ids = {id(t) for t in known}
    roots = [o.grad_fn for o in outputs if o.grad_fn is not None]
    stack, seen, leaves = list(roots), set(roots), {}
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node) is _ACCUMULATE_GRAD:
                variable = node.variable
                if id(variable) not in ids:
                    leaves[id(variable)] = variable
            else:
                stack.append(node)
    return list(leaves.values())
