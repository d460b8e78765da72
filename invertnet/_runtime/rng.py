"""Recording and replaying the random-number state of sub-module calls.

Recomputation in backward must see the same random numbers as the forward pass did,
or dropout masks differ and gradients are wrong (memcnn issue 56). A coupling's inverse
calls its sub-modules in the reverse order of the forward, so restoring one global state
at the start is not enough: the state before *each* sub-module call is recorded, keyed
by the call, and set again before the same call is recomputed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from invertnet._runtime.torch_private import global_forward_hooks_registered

__all__ = ["RNGTape", "call_recorded", "calls_never_draw", "never_draws"]

_active_tape: contextvars.ContextVar[RNGTape | None] = contextvars.ContextVar(
    "invertnet_rng_tape", default=None
)


def _devices_of(tensors: Sequence[torch.Tensor]) -> list[torch.device]:
    return sorted(
        {t.device for t in tensors if t.device.type not in ("cpu", "meta")},
        key=lambda d: (d.type, d.index if d.index is not None else -1),
    )


def _wide(state: torch.Tensor) -> torch.Tensor:
    """The bytes of a generator's state as 8-byte integers where they divide evenly:
    the same comparison, at a third of the cost of comparing bytes (a CPU state
    is 5 KiB, compared once per sub-module call)."""
    return state.view(torch.int64) if state.numel() % 8 == 0 else state


class RNGTape:
    """The RNG states seen by one forward call, for replay during its backward.

    Parameters
    ----------
    tensors : sequence of torch.Tensor
        The call's inputs; the accelerator devices they live on have their
        generators recorded as well as the CPU generator.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._devices = _devices_of(tensors)
        self._initial = self._capture()
        self._states: dict[Hashable, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._last: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._last_wide: torch.Tensor | None = None  # _wide() of its CPU state
        self._replaying = False

    def _capture(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        accel = (
            [torch.get_device_module(d.type).get_rng_state(d) for d in self._devices]
            if self._devices
            else []
        )
        return torch.default_generator.get_state(), accel

    @staticmethod
    def _same(
        a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]]
    ) -> bool:
        return torch.equal(_wide(a[0]), _wide(b[0])) and all(map(torch.equal, a[1], b[1]))

    def _restore(self, state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
        cpu, accel = state
        torch.set_rng_state(cpu)
        for device, s in zip(self._devices, accel):
            torch.get_device_module(device.type).set_rng_state(s, device)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record the state before every :func:`call_recorded` inside the block."""
        token = _active_tape.set(self)
        self._replaying = False
        try:
            yield
        finally:
            _active_tape.reset(token)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Replay recorded states; the caller's RNG state is left untouched."""
        device_type = self._devices[0].type if self._devices else "cuda"
        with torch.random.fork_rng(devices=self._devices, device_type=device_type):
            self._restore(self._initial)
            token = _active_tape.set(self)
            self._replaying = True
            try:
                yield
            finally:
                self._replaying = False
                _active_tape.reset(token)

    def drawn_since_start(self) -> bool:
        """Whether the generators moved since the tape was made: something in between
        drew random numbers from them (reading the states is host-side, also for
        CUDA's generators)."""
        return not self._same(self._capture(), self._initial)

    def reset_to_initial(self) -> None:
        """Set the generators to the state at the start of the recorded call."""
        self._restore(self._initial)

    def _call(self, key: Hashable, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._replaying:
            state = self._states.get(key)
            if state is not None:
                self._restore(state)
            return self._call_untaped(fn, args)
        # Calls that find the generators as the previous call did share one record:
        # a state per call (5 KiB on the CPU) adds up over hundreds of layers, and
        # small long-lived allocations scattered through the heap keep it from
        # shrinking. Every call keeps a record all the same: a function that draws
        # under fork_rng leaves the state unchanged but still depends on it.
        state = self._capture()
        wide = _wide(state[0])
        last = self._last
        if (
            last is not None
            and torch.equal(wide, self._last_wide)
            and all(map(torch.equal, state[1], last[1]))
        ):
            state = last
        else:
            self._last, self._last_wide = state, wide
        self._states[key] = state
        return self._call_untaped(fn, args)

    @staticmethod
    def _call_untaped(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        # Nested couplings inside `fn` must not see this tape: they replay
        # naturally once the state before `fn` is restored.
        token = _active_tape.set(None)
        try:
            return fn(*args)
        finally:
            _active_tape.reset(token)


def call_recorded(key: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)``, recording or replaying its RNG state under ``key``.

    Outside a wrapper that preserves RNG state this is a plain call. ``key`` must
    identify the call uniquely within one forward pass of the enclosing module.
    """
    # A tape is only ever active in a wrapper's eager frame (the wrapper runs the
    # module uncompiled when it records): code being compiled or exported has none
    # to look up, and Dynamo before PyTorch 2.5 cannot trace ContextVar.get.
    if torch.compiler.is_compiling():
        return fn(*args)
    tape = _active_tape.get()
    if tape is None:
        return fn(*args)
    return tape._call(key, fn, args)


# -- modules that draw no random numbers -----------------------------------------
# Recording the state before every sub-module call costs a copy and a comparison of
# the generator state (5 KiB on the CPU) per call: 1 to 3% of a training step of
# small convolutional blocks, for nothing where no module can draw. A layer whose
# modules are all of the kinds below (and run no hooks) records the state around the
# whole call only, and refuses the call if the generators moved all the same, which
# then only a function replaced under one of these modules can have done.

#: The classes whose calls draw no random numbers, with the ``forward`` each had
#: when registered: a class whose ``forward`` was replaced since is not trusted.
_NEVER_DRAW: dict[type, Callable[..., Any]] = {}

_Module = TypeVar("_Module", bound=type)


def never_draws(cls: _Module) -> _Module:
    """Register ``cls``, a module class whose calls draw no random numbers whatever
    its inputs and state, given that its sub-modules draw none either (a class
    decorator). Only the class itself: a subclass is unknown until registered."""
    _NEVER_DRAW[cls] = cls.forward
    return cls


for _cls in (
    nn.Sequential,
    nn.Identity,
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
):
    never_draws(_cls)


def calls_never_draw(modules: Sequence[nn.Module]) -> bool:
    """Whether a call of ``modules[0]`` (``modules``: it and every module under it)
    can draw no random numbers: every module is of a class registered with
    :func:`never_draws`, with the ``forward`` it had then, not replaced on the
    instance, and no forward hook or pre-hook runs (one of its own or a global one),
    as a hook may draw."""
    if global_forward_hooks_registered():
        return False
    for module in modules:
        forward = _NEVER_DRAW.get(type(module))
        if (
            forward is None
            or type(module).forward is not forward
            or module._forward_pre_hooks
            or module._forward_hooks
            or "forward" in module.__dict__
        ):
            return False
    return True
