"""Every private PyTorch API invertnet uses (invertnet/_runtime/torch_private.py) behaves as
relied on. CI runs this file under the oldest and the newest accepted release."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from invertnet._runtime import torch_private as private


class _Record(torch.autograd.Function):
    """Records the holder counts of its inputs, as a wrapper's forward sees them."""

    @staticmethod
    def forward(ctx: Any, found: list, *tensors: torch.Tensor) -> torch.Tensor:
        found.extend(private.holder_counts(t) for t in tensors)
        return tensors[0] * 1.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return (None, grad, None)


def _counts_inside(*tensors: torch.Tensor) -> list[private.HolderCounts]:
    found: list[private.HolderCounts] = []
    _Record.apply(found, *tensors)
    return found


@pytest.mark.parametrize("kind", ["leaf", "non_leaf", "no_grad"])
def test_an_input_nothing_else_holds_has_the_calibrated_counts(kind: str) -> None:
    leaf = torch.randn(3, requires_grad=kind != "no_grad")
    x = leaf * 2 if kind == "non_leaf" else leaf
    assert private.input_kind(x) == kind
    (counts, _) = _counts_inside(x, torch.randn(3))
    assert counts == private.sole_holder_counts("cpu")[kind]


def test_a_view_adds_a_storage_holder_and_a_saved_input_a_tensor_holder() -> None:
    sole = private.sole_holder_counts("cpu")["leaf"]
    x = torch.randn(4, requires_grad=True)
    view = x[:2]  # noqa: F841  (alive while counting)
    (counts, _) = _counts_inside(x, torch.randn(4))
    assert counts.storage == sole.storage + 1  # (the view also holds x as its base)

    y = torch.randn(4, requires_grad=True)
    saved = torch.sin(y)  # noqa: F841  (sin saves its input for backward)
    (counts, _) = _counts_inside(y, torch.randn(4))
    assert counts.tensor == sole.tensor + 1 and counts.storage == sole.storage


def test_sole_counts_are_measured_once_per_device_type() -> None:
    assert private.sole_holder_counts("cpu") is private.sole_holder_counts("cpu")
    assert set(private.sole_holder_counts("cpu")) == {"leaf", "non_leaf", "no_grad"}


def test_storage_key_is_shared_by_aliases_and_survives_a_resize() -> None:
    x = torch.randn(8)
    alias = x.detach()
    key = private.storage_key(x)
    assert private.storage_key(alias) == key
    assert private.storage_key(torch.randn(8)) != key
    x.untyped_storage().resize_(0)
    x.untyped_storage().resize_(32)
    assert private.storage_key(alias) == key


def test_version_counts_in_place_writes() -> None:
    x = torch.zeros(3)
    before = private.version(x)
    x.add_(1)
    assert private.version(x) == before + 1


def test_is_output_of_names_the_function_that_made_a_tensor() -> None:
    x = torch.randn(3, requires_grad=True)
    assert private.is_output_of(_Record.apply([], x, x), _Record)
    assert not private.is_output_of(x * 2, _Record)
    assert not private.is_output_of(x, _Record)


class _QueueInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, events: list, fail: bool) -> torch.Tensor:
        ctx.events, ctx.fail = events, fail
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        def at_end() -> None:
            ctx.events.append("end")
            if ctx.fail:
                raise ValueError("raised at the end of backward")

        ctx.events.append("queued" if private.queue_end_of_backward(at_end) else "refused")
        return grad, None, None


def test_queue_end_of_backward_runs_after_the_pass_and_propagates_errors() -> None:
    events: list[str] = []
    x = torch.randn(3, requires_grad=True)
    y = _QueueInBackward.apply(x, events, False)
    y.register_hook(lambda g: events.append("hook"))
    y.sum().backward()
    assert events == ["hook", "queued", "end"]
    assert x.grad is not None

    with pytest.raises(ValueError, match="at the end of backward"):
        _QueueInBackward.apply(x, [], True).sum().backward()


def test_queue_end_of_backward_refuses_outside_a_backward_pass() -> None:
    assert private.queue_end_of_backward(lambda: None) is False


def test_assert_on_device_raises_on_the_cpu_when_false() -> None:
    private.assert_on_device(torch.tensor(True), "never shown")
    with pytest.raises(RuntimeError):
        private.assert_on_device(torch.tensor(False), "the condition failed")


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_assert_on_device_refuses_a_message_too_long_for_cuda_on_every_device(
    device: str,
) -> None:
    # CUDA refuses messages of 255 bytes or more; the CPU would not, so the limit is
    # checked here, on every device, before anything runs.
    longest = "x" * private.MAX_DEVICE_MESSAGE_BYTES
    private.assert_on_device(torch.tensor(True, device=device), longest)
    with pytest.raises(ValueError, match="255|254"):
        private.assert_on_device(torch.tensor(True, device=device), longest + "x")
    # Bytes, not characters: a non-ASCII character takes several.
    with pytest.raises(ValueError, match="assert_on_device: the message is 255 bytes"):
        private.assert_on_device(torch.tensor(True, device=device), "é" + longest[2:] + "x")


def test_current_backward_pass_is_none_outside_and_new_for_each_pass() -> None:
    seen: list[int | None] = []
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(private.current_backward_pass()))
    y.sum().backward(retain_graph=True)
    y.sum().backward()
    assert private.current_backward_pass() is None
    assert None not in seen and len(set(seen)) == 2


def test_copy_all_copies_every_pair_whatever_their_dtypes_and_shapes() -> None:
    destinations = [torch.zeros(3), torch.zeros((), dtype=torch.long), torch.zeros(2, 2)]
    sources = [torch.arange(3.0), torch.tensor(7), torch.ones(2, 2)]
    private.copy_all(destinations, sources)
    for d, s in zip(destinations, sources):
        assert torch.equal(d, s) and d.data_ptr() != s.data_ptr()
    with pytest.raises(ValueError):  # a length mismatch is an error, not a partial copy
        private.copy_all(destinations, sources[:2])


def test_copy_all_on_one_device_copies_in_one_call_and_checks_lengths() -> None:
    destinations = [torch.zeros(2), torch.zeros((), dtype=torch.long)]
    private.copy_all(destinations, [torch.ones(2), torch.tensor(3)], one_device=True)
    assert torch.equal(destinations[0], torch.ones(2)) and int(destinations[1]) == 3
    with pytest.raises(ValueError, match="2 destinations but 1 sources"):
        private.copy_all(destinations, [torch.ones(2)], one_device=True)


def test_held_only_by_caller_counts_every_other_holder() -> None:
    fresh = torch.randn(3)
    assert private.held_only_by_caller(fresh)
    # Another Python reference (a module's attribute, a hook's list, a tuple).
    kept = [fresh]
    assert not private.held_only_by_caller(fresh)
    assert private.held_only_by_caller(fresh, references=2)
    del kept
    # Another tensor over its memory, without a Python reference to it.
    alias = fresh.detach()
    assert not private.held_only_by_caller(fresh)
    del alias
    assert private.held_only_by_caller(fresh)
    # Autograd: a saved tensor of a graph that is still alive.
    leaf = torch.randn(3, requires_grad=True)
    with torch.enable_grad():
        out = leaf.exp()  # exp saves its result
    graph = out  # noqa: F841  (keeps the graph, and the saved result, alive)
    result = out.detach()
    del out
    assert not private.held_only_by_caller(result)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4)[:2],
        lambda: torch.randn(3, requires_grad=True),
        lambda: torch.nn.Parameter(torch.randn(3)),
    ],
    ids=["view", "requires-grad", "parameter"],
)
def test_held_only_by_caller_refuses_views_graph_tensors_and_subclasses(make) -> None:
    t = make()
    assert not private.held_only_by_caller(t)


def _small_graph() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    unused = torch.nn.Parameter(torch.randn(4))
    x = torch.randn(5, 3, requires_grad=True)
    h = layer(x)
    return (h.tanh(), h.square()), (x, layer.weight, layer.bias, unused)


def test_gradients_equal_autograd_grad_with_unused_inputs_as_none() -> None:
    outputs, inputs = _small_graph()
    grad_outputs = tuple(torch.randn_like(o) for o in outputs)
    wanted = torch.autograd.grad(
        outputs, inputs, grad_outputs, allow_unused=True, retain_graph=True
    )
    found = private.gradients(outputs, inputs, grad_outputs)
    assert found[3] is None and wanted[3] is None
    for f, w in zip(found[:3], wanted[:3]):
        assert torch.equal(f, w)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        private.gradients(outputs, inputs, grad_outputs)  # the graph was freed


def test_gradients_run_the_engine_directly_for_plain_tensors_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    real_grad = torch.autograd.grad

    def counting_grad(*args: Any, **kwargs: Any) -> Any:
        calls.append("grad")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    outputs, inputs = _small_graph()
    private.gradients(outputs, inputs, tuple(torch.ones_like(o) for o in outputs))
    assert calls == []
    # A gradient of another dtype goes through torch.autograd.grad, whatever it does
    # with it.
    outputs, inputs = _small_graph()
    grads = (torch.ones_like(outputs[0], dtype=torch.float64), torch.ones_like(outputs[1]))
    found = private.gradients(outputs, inputs, grads)
    assert calls == ["grad"]
    outputs, inputs = _small_graph()
    wanted = real_grad(outputs, inputs, grads, allow_unused=True)
    assert all((f is None and w is None) or torch.equal(f, w) for f, w in zip(found, wanted))
    # No inputs: torch.autograd.grad's own error (its wording and class changed over
    # releases), not a pass over every leaf.
    outputs, _ = _small_graph()
    with pytest.raises((RuntimeError, ValueError), match="empty"):
        private.gradients(outputs, (), tuple(torch.ones_like(o) for o in outputs))


@pytest.mark.parametrize(
    "register",
    [
        torch.nn.modules.module.register_module_forward_pre_hook,
        torch.nn.modules.module.register_module_forward_hook,
    ],
    ids=["pre-hook", "hook"],
)
def test_global_forward_hooks_registered(register) -> None:
    # Read from torch.nn.modules.module's private dictionaries of global hooks.
    assert not private.global_forward_hooks_registered()
    handle = register(lambda *args: None)
    try:
        assert private.global_forward_hooks_registered()
    finally:
        handle.remove()
    assert not private.global_forward_hooks_registered()
