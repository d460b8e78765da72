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


# -- arguments that change: replayed as seen, or refused ---------------------------------

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from invertnet import MomentumNet  # noqa: E402
from invertnet.momentum.arguments import ArgumentRecord  # noqa: E402
from invertnet.momentum.caches import is_kv_cache, without_kv_caches  # noqa: E402


class _Appending(nn.Module):
    """Scales its input by how many entries the list argument holds, then appends one."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, seen: list[torch.Tensor]) -> torch.Tensor:
        y = torch.tanh(self.linear(x)) * (1 + len(seen))
        seen.append(y)
        return y


class _Reading(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x) + bias)


def test_a_function_that_appends_to_a_list_argument_raises_naming_it() -> None:
    torch.manual_seed(0)
    net = MomentumNet([_Appending() for _ in range(3)], gamma=0.9, use_backprop=False)
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"argument args\[0\] changed while the functions ran"):
        net(x, [])
    # The plain mode runs such functions as written (nothing is replayed).
    plain = MomentumNet(list(net.functions), gamma=0.9, use_backprop=True)
    seen: list[torch.Tensor] = []
    plain(x, seen).sum().backward()
    assert len(seen) == 3 and x.grad is not None


def test_an_argument_written_in_place_by_a_function_raises() -> None:
    class Writing(_Reading):
        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            bias.add_(1.0)
            return super().forward(x, bias)

    net = MomentumNet([Writing()], gamma=0.9, use_backprop=False)
    with pytest.raises(RuntimeError, match=r"argument kwargs\['bias'\] changed while"):
        net(torch.randn(2, 3, requires_grad=True), bias=torch.zeros(3))


def test_an_argument_changed_before_backward_raises() -> None:
    torch.manual_seed(0)
    net = MomentumNet([_Reading() for _ in range(2)], gamma=0.9, use_backprop=False)
    bias = torch.zeros(3)
    y = net(torch.randn(2, 3, requires_grad=True), bias)
    bias.fill_(5.0)
    with pytest.raises(RuntimeError, match=r"args\[0\] changed between the forward pass and"):
        y.sum().backward()


def test_an_attribute_changed_on_an_argument_object_is_named() -> None:
    class Options:
        def __init__(self) -> None:
            self.scale = 1.0

    options, steps = Options(), [1, 2]
    kwargs = {"options": options, "steps": steps}
    record = ArgumentRecord((), kwargs)
    assert record.changed((), kwargs) is None
    options.scale = 2.0
    with pytest.raises(RuntimeError, match=r"argument kwargs\['options'\]\.scale changed now"):
        record.check((), kwargs, "now")
    options.scale = 1.0
    steps[1] = 3
    assert record.changed((), kwargs) == ("kwargs", "steps", 1)
    steps[1] = 2
    assert record.changed((), {**kwargs, "steps": [1, 2]}) == ("kwargs", "steps")  # another list
    assert record.changed((), {**kwargs, "n": 0}) == ("kwargs",)


def test_nan_and_unchanged_arguments_pass() -> None:
    args = (float("nan"), None, "mask", torch.zeros(2), (1, 2.5))
    record = ArgumentRecord(args, {})
    assert record.changed(args, {}) is None


class _Cache:
    """A key/value cache as Hugging Face layers use one: update appends, returns all."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor | None] = []

    def get_seq_length(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[0])

    def update(self, key: torch.Tensor, index: int) -> torch.Tensor:
        while len(self.keys) <= index:
            self.keys.append(None)
        old = self.keys[index]
        self.keys[index] = key if old is None else torch.cat([old, key])
        return self.keys[index]


class _Attending(nn.Module):
    """Attends over the keys of the cache (its own, when a cache is given)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.key = nn.Linear(3, 3)

    def forward(
        self, x: torch.Tensor, cache: _Cache | None = None, use_cache: bool = False
    ) -> torch.Tensor:
        keys = self.key(x)
        if cache is not None:
            keys = cache.update(keys, self.index)
        weights = torch.softmax(x @ keys.T, dim=-1)
        return weights @ keys


def test_an_empty_kv_cache_is_dropped_for_training_with_exact_gradients() -> None:
    torch.manual_seed(0)
    layers = [_Attending(i) for i in range(3)]
    plain = MomentumNet(layers, gamma=0.9, use_backprop=True)
    light = MomentumNet(layers, gamma=0.9, use_backprop=False)
    x = torch.randn(4, 3)
    expected = torch.autograd.grad(plain(x, _Cache()).square().sum(), list(plain.parameters()))
    cache = _Cache()
    with pytest.warns(UserWarning, match=r"cache in args\[0\] is not filled in training"):
        y = light(x, cache, use_cache=True)
    found = torch.autograd.grad(y.square().sum(), list(light.parameters()))
    for a, b in zip(found, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert cache.keys == []  # left as it was given
    # Without grad the layers run once, cache included (as in generation).
    with torch.no_grad():
        light(x, cache)
    assert len(cache.keys) == 3


def test_a_filled_kv_cache_is_refused_in_training() -> None:
    cache = _Cache()
    cache.update(torch.zeros(2, 3), 0)
    net = MomentumNet([_Attending(0)], gamma=0.9, use_backprop=False)
    with pytest.raises(ValueError, match=r"kwargs\['cache'\] is a key/value cache \(_Cache\) "):
        net(torch.randn(4, 3), cache=cache)


def test_caches_are_found_in_containers_and_use_cache_turned_off() -> None:
    cache = _Cache()
    assert is_kv_cache(cache) and not is_kv_cache([]) and not is_kv_cache(torch.zeros(1))
    args, kwargs = (1, [cache]), {"use_cache": True, "past": {"kv": cache}}
    with pytest.warns(UserWarning, match=r"args\[1\]\[0\], kwargs\['past'\]\['kv'\]"):
        new_args, new_kwargs = without_kv_caches(args, kwargs)
    assert new_args == (1, [None])
    assert new_kwargs == {"use_cache": False, "past": {"kv": None}}
    assert args[1][0] is cache and kwargs["use_cache"] is True  # originals untouched
    plain = ((1,), {"mask": None})
    assert without_kv_caches(*plain)[0] is plain[0]
