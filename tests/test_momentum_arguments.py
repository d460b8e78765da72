"""Finding and replacing the tensors that require grad in a call's extra arguments."""

from __future__ import annotations

import collections

import torch

from invertnet.momentum.arguments import grad_slots, slot_tensors, with_tensors


def test_slots_reach_into_nested_containers_in_order() -> None:
    w, a, b = (torch.ones(1, requires_grad=True) for _ in range(3))
    plain = torch.ones(1)
    args = (w, [plain, (a, None)], "mask")
    kwargs = {"memory": {"k": b, "n": 3}, "flag": True}
    slots = grad_slots(args, kwargs)
    assert slots == [("args", 0), ("args", 1, 1, 0), ("kwargs", "memory", "k")]
    found = slot_tensors(args, kwargs, slots)
    assert [t is u for t, u in zip(found, (w, a, b))] == [True, True, True]


def test_with_tensors_copies_the_path_and_keeps_container_types() -> None:
    Pair = collections.namedtuple("Pair", ["left", "right"])
    w, a = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    shared = [1, 2]
    table = collections.defaultdict(list, {"a": a})
    args = (Pair(w, shared),)
    kwargs = {"table": table, "other": shared}
    slots = grad_slots(args, kwargs)
    new_w, new_a = torch.zeros(1), torch.zeros(1)
    new_args, new_kwargs = with_tensors(args, kwargs, slots, (new_w, new_a))
    assert isinstance(new_args[0], Pair) and new_args[0].left is new_w
    assert new_args[0].right is shared  # off the path: shared, not copied
    assert isinstance(new_kwargs["table"], collections.defaultdict)
    assert new_kwargs["table"]["a"] is new_a and new_kwargs["other"] is shared
    # The originals are untouched.
    assert args[0].left is w and table["a"] is a and kwargs["table"] is table
