"""The one record of what a forward pass ran under, replayed for its recomputation.

A memory-saving layer runs its sub-modules twice: once in the forward pass, without
a graph, and again in backward, to rebuild what it did not keep. Between the two the
user's code runs, and it can change anything the second run depends on: the random
state (dropout), autocast, the modules' training flags (a validation helper that
calls ``model.eval()``), the parameters (``optimizer.step()``), the buffers, or which
tensors the modules hold (:func:`torch.func.functional_call` swaps them in for the
call only). Autograd guards what it saves with version counters; a memory-saving
layer must guard at least as much. :class:`ForwardState` records all of it in one
place, and :meth:`ForwardState.replayed` runs the recomputation in that state, or
raises, before anything is computed, an error that names the layer, the cause and
the fix:

* random state, autocast, training flags and the tensors the modules held are
  *replayed*: the recomputation sees what the forward pass saw;
* a parameter written in place since the forward pass *raises*, as plain autograd
  does for a weight it saved;
* a buffer the forward pass itself wrote (a running statistic, spectral norm's
  vector) is replayed from its value before the pass;
* a buffer written in place since the forward pass is replayed from a copy where
  one was kept (every record of a module awaiting its backward keeps one before
  any layer runs that module again: the same layer, as in a siamese network, or
  another, as where one block sits twice in a stack), and raises otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from invertnet._grad_mode import without_grad
from invertnet._runtime.rng import RNGTape
from invertnet._runtime.torch_private import copy_all, set_version

__all__ = [
    "AutocastState",
    "BufferSnapshot",
    "ForwardState",
    "keep_awaiting_buffer_values",
    "same_objects",
    "submodules",
    "submodules_and_trainable_parameters",
    "trainable_parameters",
]


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings in force during the forward pass, for one device type."""

    device_type: str
    enabled: bool
    dtype: torch.dtype

    @staticmethod
    def capture(tensors: Sequence[torch.Tensor]) -> tuple[AutocastState, ...]:
        """Record autocast for the inputs' device type (and the CPU, which autocasts too).

        The same settings give the same tuple, shared: a wrapper records them for
        every block, and keeps them until its backward.
        """
        device_types = {t.device.type for t in tensors} | {"cpu"}
        return _interned(
            tuple(
                (d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                for d in sorted(device_types)
                if d != "meta"
            )
        )

    @staticmethod
    def restored(states: Sequence[AutocastState]) -> contextlib.AbstractContextManager[None]:
        """Re-enter the recorded autocast settings, without autocast's weight cache.

        The forward pass ran without grad, so the low-precision copies of the
        parameters it cached have no graph; a recomputation inside the same autocast
        region that found them in the cache would give the parameters no gradient
        (PyTorch 2.4 looks the cache up whatever the grad mode; 2.13 no longer). Casting
        afresh costs one cast per parameter use.
        """
        if not any(s.enabled or torch.is_autocast_enabled(s.device_type) for s in states):
            # Off then and off now: nothing to re-enter, and no generator to run
            # for every block.
            return contextlib.nullcontext()
        return _autocast_entered(states)


@functools.lru_cache(maxsize=64)
def _interned(settings: tuple[tuple[str, bool, torch.dtype], ...]) -> tuple[AutocastState, ...]:
    return tuple(AutocastState(*setting) for setting in settings)


@contextlib.contextmanager
def _autocast_entered(states: Sequence[AutocastState]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for s in states:
            stack.enter_context(
                torch.autocast(s.device_type, dtype=s.dtype, enabled=s.enabled, cache_enabled=False)
            )
        yield


def submodules(module: nn.Module) -> list[nn.Module]:
    """``module`` and every module under it, each once: what ``module.modules()``
    yields, in breadth-first order and without its generator machinery (a wrapper
    asks on every call)."""
    found, seen = [module], {id(module)}
    for owner in found:  # grows as it is walked
        for child in owner._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


def submodules_and_trainable_parameters(
    module: nn.Module,
) -> tuple[list[nn.Module], tuple[nn.Parameter, ...]]:
    """:func:`submodules` of ``module`` and their :func:`trainable_parameters`: what a
    layer asks for on every call, and what a block that lists its own modules
    (``lists_own_modules``) hands its wrapper instead."""
    modules = submodules(module)
    return modules, trainable_parameters(modules)


def trainable_parameters(modules: Iterable[nn.Module]) -> tuple[nn.Parameter, ...]:
    """The parameters of ``modules`` that require grad, each once."""
    found: dict[int, nn.Parameter] = {}
    for owner in modules:
        held = owner._parameters
        if held:  # most modules hold none
            for p in held.values():
                if p is not None and p.requires_grad:
                    found.setdefault(id(p), p)
    return tuple(found.values())


# Scratch tensors for buffer snapshots, by the buffers' shapes, dtypes and devices:
# a snapshot borrows a set and gives it back when restored, so a chain of blocks
# alike reuses one set instead of allocating copies at every block. Per thread, and
# a list per signature, since snapshots nest (a wrapper inside a wrapped module runs
# its backward during the outer one's recomputation).
_scratch = threading.local()

_Signature = tuple[tuple[torch.Size, torch.dtype, torch.device], ...]


def _borrow(signature: _Signature) -> list[torch.Tensor]:
    pool: dict[_Signature, list[list[torch.Tensor]]] = _scratch.__dict__.setdefault("pool", {})
    spare = pool.get(signature)
    if spare:
        return spare.pop()
    return [torch.empty(size, dtype=dtype, device=device) for size, dtype, device in signature]


def _give_back(signature: _Signature, tensors: list[torch.Tensor]) -> None:
    _scratch.__dict__.setdefault("pool", {}).setdefault(signature, []).append(tensors)


class BufferSnapshot:
    """Copies of the buffers of some modules, put back after a recomputation.

    Recomputing a forward pass in training mode would otherwise update running
    statistics, such as BatchNorm's, a second time (memcnn issue 12). A module that
    replaced a buffer object meanwhile gets the original object back. Taking and
    restoring a snapshot copies all the buffers in one call each (a block's many
    small buffers would otherwise cost a dispatch apiece), into scratch tensors
    reused from snapshot to snapshot.
    """

    __slots__ = ("_saved", "_buffers", "_signature", "_copies")

    def __init__(
        self,
        modules: Iterable[nn.Module] = (),
        *,
        slots: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]] | None = None,
    ) -> None:
        # `slots`: the (owner's buffer dict, name, buffer) triples, where the caller
        # has them already.
        self._saved = (
            slots
            if slots is not None
            else [
                (owner._buffers, name, buf)
                for owner in modules
                for name, buf in owner._buffers.items()
                if buf is not None
            ]
        )
        self._copies: list[torch.Tensor] | None = None
        if not self._saved:
            return
        self._buffers = [buf for _, _, buf in self._saved]
        self._signature: _Signature = tuple((b.shape, b.dtype, b.device) for b in self._buffers)
        self._copies = _borrow(self._signature)
        with without_grad():
            copy_all(self._copies, self._buffers, one_device=_one_device(self._signature))

    def restore(self) -> None:
        """Give every buffer its object and its values from the time of the snapshot
        (once: a second call does nothing)."""
        copies, self._copies = self._copies, None
        if copies is None:
            return
        for buffers, name, buf in self._saved:
            buffers[name] = buf
        with without_grad():
            copy_all(self._buffers, copies, one_device=_one_device(self._signature))
        _give_back(self._signature, copies)


@functools.lru_cache(maxsize=256)
def _one_device(signature: _Signature) -> bool:
    return len({device for _, _, device in signature}) == 1


_Slot = tuple[dict, str, torch.Tensor | None]


class ForwardState:
    """What one forward pass of a memory-saving layer ran under.

    Built before the forward pass (the random state and autocast at its start), and
    sealed after it (:meth:`seal`: the modules' training flags, and the parameters
    and buffers each module held, with their version counters). Backward runs its
    recomputation inside :meth:`replayed`.

    Reading flags, identities and version counters is host metadata: nothing here
    waits for a device. A deep stack keeps one record per block until backward, so
    a record keeps few objects for the garbage collector to track: the tensors in
    one tuple (shared with the layer's previous record where they are the same),
    their versions in a tuple of ints, no flags where every module trains, and the
    values of written buffers packed into one tensor.

    Parameters
    ----------
    layer : str
        The layer's name for error messages, such as
        ``"InvertibleModuleWrapper(AdditiveCoupling)"``.
    modules : list of torch.nn.Module
        The module the layer runs and every module under it
        (:func:`submodules`), in a fixed order.
    tape : RNGTape or None
        The random state to record and replay (``None``: nothing to replay).
    autocast : tuple of AutocastState
        The autocast settings of the forward pass (:meth:`AutocastState.capture`).
    """

    __slots__ = (
        "layer",
        "modules",
        "tape",
        "autocast",
        "_flags",
        "_tensors",
        "_versions",
        "_num_params",
        "_buffer_values",
        "_taken",
        "_written",
        "_written_values",
        "awaiting_backward",
        "__weakref__",
    )

    def __init__(
        self,
        layer: str,
        modules: list[nn.Module],
        tape: RNGTape | None,
        autocast: tuple[AutocastState, ...],
    ) -> None:
        self.layer = layer
        self.modules = modules
        self.tape = tape
        self.autocast = autocast
        # Training flags, or None where every module was training.
        self._flags: tuple[bool, ...] | None = None
        # The parameters, then the buffers, in the order _slots walks them.
        self._tensors: tuple[torch.Tensor, ...] = ()
        self._versions: tuple[int, ...] = ()
        self._num_params = 0
        # Copies of buffers, by position among the buffers (keep_buffer_values).
        self._buffer_values: dict[int, torch.Tensor] | None = None
        #: Whether the forward pass has run and its backward has not ended yet (the
        #: layer sets it to False when it has).
        self.awaiting_backward = False
        # The buffers' values before the forward pass: until seal(), scratch copies
        # of all of them (_BuffersTaken); after, only those of the buffers the pass
        # wrote, by position among the buffers, packed into one tensor (_pack).
        self._taken: _BuffersTaken | None = _BuffersTaken.take(modules)
        self._written: tuple[int, ...] = ()
        self._written_values: torch.Tensor | list[torch.Tensor] | None = None

    def recording(self) -> contextlib.AbstractContextManager[None]:
        """Enter around the forward pass: records the random state of its sub-module
        calls (nothing when there is no tape)."""
        return contextlib.nullcontext() if self.tape is None else self.tape.recording()

    def seal(self, previous: ForwardState | None = None) -> None:
        """Record, after the forward pass, what its modules held and their flags.

        A buffer the forward pass wrote (a running statistic, spectral norm's
        vector) keeps its value from before the pass, which the recomputation is
        given: a module that reads a buffer it also updates then computes what it
        computed in the forward pass. (BatchNorm in training does not read its
        running statistics; spectral normalisation does, and was 26% off with the
        values the forward pass left.)

        ``previous``, an earlier record of the same layer, lends its tuple of tensors
        where the modules hold the same ones: a layer called once per step then keeps
        no new tuple per call.
        """
        modules = self.modules
        # One pass over the modules for their flags, parameters and buffers (three
        # took twice as long on a chain of 14 blocks).
        params: list[torch.Tensor] = []
        buffers: list[torch.Tensor] = []
        all_training = True
        for owner in modules:
            if not owner.training:
                all_training = False
            held = owner._parameters
            if held:  # most modules hold none
                params.extend(t for t in held.values() if t is not None)
            held = owner._buffers
            if held:
                buffers.extend(t for t in held.values() if t is not None)
        self._flags = None if all_training else tuple(m.training for m in modules)
        self._num_params = len(params)
        tensors = (*params, *buffers)
        if previous is not None and same_objects(previous._tensors, tensors):
            tensors = previous._tensors
        self._tensors = tensors  # type: ignore[assignment]
        # A tuple of ints, which the garbage collector stops tracking (an array it
        # would track).
        self._versions = tuple(t._version for t in tensors)
        self.awaiting_backward = True
        taken, self._taken = self._taken, None
        if taken is not None:
            self._written, self._written_values = taken.written(tensors[self._num_params :])
        if self.has_buffers:
            _await_backward(self)

    @property
    def has_buffers(self) -> bool:
        """Whether the modules hold any buffer (see :meth:`keep_buffer_values`)."""
        return len(self._tensors) > self._num_params

    def keep_buffer_values(self) -> None:
        """Keep copies of the buffers as the forward pass left them, before the layer
        runs its modules again (a second call before this one's backward, as in a
        siamese network, updates running statistics in place). Buffers already
        changed since are not copied: :meth:`check` reports them."""
        if self._buffer_values is not None:
            return
        values: dict[int, torch.Tensor] = {}
        start = self._num_params
        with without_grad():
            for i, t in enumerate(self._tensors[start:]):
                if t._version == self._versions[start + i]:
                    values[i] = t.clone()
        self._buffer_values = values

    def check(self) -> None:
        """Raise if a parameter or buffer that the recomputation reads was written in
        place since the forward pass (and, for a buffer, no copy was kept)."""
        if tuple(t._version for t in self._tensors) == self._versions:
            return  # nothing written since: one pass, the common case
        kept = self._buffer_values or {}
        start = self._num_params
        written = self._written
        for i, (t, seen) in enumerate(zip(self._tensors, self._versions)):
            if t._version == seen or (i >= start and (i - start in kept or i - start in written)):
                continue
            what = "parameter" if i < start else "buffer"
            name = self._qualified_name(t, what)
            if i < start:
                raise RuntimeError(
                    f"{self.layer}: parameter {name} was modified in place between the "
                    f"forward pass and backward (version {seen} then, {t._version} now), "
                    "for example by optimizer.step(), weight clipping or a manual write. "
                    "Backward recomputes the forward pass with it, so the gradients "
                    "would be wrong; plain autograd refuses this too. Run backward "
                    "before updating the parameters (optimizer.zero_grad(), "
                    "loss.backward(), optimizer.step())"
                )
            raise RuntimeError(
                f"{self.layer}: buffer {name} was modified in place between the forward "
                f"pass and backward (version {seen} then, {t._version} now), by code "
                "outside this layer (a running statistic reset or written by hand, or "
                "the module called directly rather than through the layer). Backward "
                "recomputes the forward pass with the buffers it saw, and no copy of "
                "this one was kept. Run backward before changing buffers, or call the "
                "module through the layer, which keeps a copy when it runs again "
                "before backward"
            )

    def _qualified_name(self, t: torch.Tensor, what: str) -> str:
        kind = "_parameters" if what == "parameter" else "_buffers"
        for prefix, owner in self.modules[0].named_modules(remove_duplicate=False):
            for name, held in getattr(owner, kind).items():
                if held is t:
                    return repr(f"{prefix}.{name}" if prefix else name)
        return "(no longer held by the module)"

    def _current_slots(self) -> list[_Slot]:
        """Where each recorded tensor was held, and what is held there now."""
        slots = _slots(self.modules, "_parameters") + _slots(self.modules, "_buffers")
        if len(slots) != len(self._tensors):
            raise RuntimeError(
                f"{self.layer}: its modules hold {len(slots)} parameters and buffers now "
                f"but held {len(self._tensors)} in the forward pass (one was added or "
                "removed in between). Backward recomputes the forward pass with what it "
                "held; change a module's structure only after backward"
            )
        return slots

    @contextlib.contextmanager
    def replayed(self, checked: bool = False) -> Iterator[None]:
        """Run the block in the forward pass's state, then put today's state back.

        Checks first (:meth:`check`, unless the caller has just run it: ``checked``);
        then the modules hold the tensors they held in the forward pass (those
        :func:`torch.func.functional_call` swapped in, say), with its training flags,
        its buffer values, its autocast settings and its random state. Buffer
        updates made inside (running statistics updated again) are undone on exit,
        and hidden from the buffers' version counters.
        """
        if not checked:
            self.check()
        slots = self._current_slots()
        swapped = []
        for (tensors, name, current), t in zip(slots, self._tensors):
            if current is not t:
                swapped.append((tensors, name, current))
                tensors[name] = t
        flags = self._set_flags()
        start = self._num_params
        buffers = list(self._tensors[start:])
        snapshot = None
        if buffers:
            snapshot = BufferSnapshot(
                slots=[(d, n, t) for (d, n, _), t in zip(slots[start:], buffers)]  # type: ignore[misc]
            )
        versions = [t._version for t in buffers]
        try:
            if self._buffer_values:
                self._copy_kept_buffer_values()
            if self._written:
                assert self._written_values is not None
                targets = [buffers[i] for i in self._written]
                with without_grad():
                    for t, value in zip(targets, _unpack(self._written_values, targets)):
                        t.copy_(value)
            replaying = contextlib.nullcontext() if self.tape is None else self.tape.replaying()
            with AutocastState.restored(self.autocast), replaying:
                yield
        finally:
            if snapshot is not None:
                snapshot.restore()
                # The buffers are back as they were: hide this layer's own writes, so
                # that no version guard (a later backward pass's, another pending
                # call's) takes them for somebody else's.
                set_version(buffers, versions)
            for module in flags:
                module.training = not module.training
            for tensors, name, current in swapped:
                if current is None:
                    tensors.pop(name, None)
                else:
                    tensors[name] = current

    def _set_flags(self) -> list[nn.Module]:
        flags = self._flags
        changed = []
        for i, module in enumerate(self.modules):
            training = True if flags is None else flags[i]
            if module.training != training:
                module.training = training
                changed.append(module)
        return changed

    def _copy_kept_buffer_values(self) -> None:
        assert self._buffer_values is not None
        start = self._num_params
        with without_grad():
            for i, value in self._buffer_values.items():
                t = self._tensors[start + i]
                if t._version != self._versions[start + i]:
                    t.copy_(value)


# The records awaiting their backward, by the id of each module with buffers that
# they hold (the record holds the module, so its id stays its own while the record
# lives). Entries of records that died or ran their backward are dropped when their
# module runs again, and all of them every _SWEEP_EVERY registrations (a model
# deleted after a forward pass without backward leaves entries nobody looks up).
_awaiting: dict[int, list[weakref.ref[ForwardState]]] = {}
_awaiting_lock = threading.Lock()
_SWEEP_EVERY = 1024
_registrations = 0


def _waiting(ref: weakref.ref[ForwardState]) -> ForwardState | None:
    state = ref()
    return state if state is not None and state.awaiting_backward else None


def _await_backward(state: ForwardState) -> None:
    """Register ``state`` (sealed, holding buffers) under its modules with buffers."""
    global _registrations
    ref = weakref.ref(state)
    with _awaiting_lock:
        for module in state.modules:
            if module._buffers:
                _awaiting.setdefault(id(module), []).append(ref)
        _registrations += 1
        if _registrations % _SWEEP_EVERY == 0:
            for key, refs in list(_awaiting.items()):
                live = [r for r in refs if _waiting(r) is not None]
                if live:
                    _awaiting[key] = live
                else:
                    del _awaiting[key]


# Bookkeeping (a lock, weak references, ids) that Dynamo need not trace: called
# from the wrapper's eager frames, it runs eagerly under torch.compile too.
@torch.compiler.disable
def keep_awaiting_buffer_values(modules: Sequence[nn.Module]) -> None:
    """Before ``modules`` run again: every record awaiting its backward that holds one
    of them keeps its buffer values (:meth:`ForwardState.keep_buffer_values`).

    Running a module updates its buffers in place (BatchNorm's running statistics);
    a record made by another layer, or by the same layer's earlier call, would then
    find them written when its backward comes, and raise. Called by every layer
    before it runs its modules, so that one module under two layers, or called twice
    before backward, gives plain autograd's result.
    """
    with _awaiting_lock:
        for module in modules:
            if not module._buffers:
                continue
            refs = _awaiting.get(id(module))
            if refs is None:
                continue
            live = []
            for ref in refs:
                state = _waiting(ref)
                if state is not None:
                    state.keep_buffer_values()
                    live.append(ref)
            if live:
                _awaiting[id(module)] = live
            else:
                del _awaiting[id(module)]


def same_objects(a: Sequence[object], b: Sequence[object]) -> bool:
    """Whether ``a`` and ``b`` hold the very same objects, in the same order."""
    # Not `a == b`: tuples compare elements that are not identical with __eq__,
    # which for tensors compares values.
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _slots(modules: Sequence[nn.Module], kind: str) -> list[_Slot]:
    """``(owner's dict, name, tensor)`` for every parameter or buffer (``kind``) of
    ``modules``, in a fixed order."""
    found = []
    for owner in modules:
        tensors = getattr(owner, kind)
        if tensors:  # most modules hold none: skip their empty dicts at once
            for name, t in tensors.items():
                if t is not None:
                    found.append((tensors, name, t))
    return found


class _BuffersTaken:
    """Scratch copies of some modules' buffers, taken before a forward pass."""

    __slots__ = ("_buffers", "_versions", "_signature", "_copies")

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self._buffers = buffers
        self._versions = tuple(t._version for t in buffers)
        self._signature: _Signature = tuple((b.shape, b.dtype, b.device) for b in buffers)
        self._copies = _borrow(self._signature)
        with without_grad():
            copy_all(self._copies, buffers, one_device=_one_device(self._signature))

    @staticmethod
    def take(modules: Sequence[nn.Module]) -> _BuffersTaken | None:
        """Copy the buffers of ``modules`` that a forward pass may read after writing
        them (None where there are none).

        Left out: those of batch normalisation in training mode, whose output is
        computed from the batch alone; the running statistics it writes are never
        read in that mode, so their values before the pass need no keeping (their
        second update, in the recomputation, is undone all the same).
        """
        buffers = [
            t
            for owner in modules
            if owner._buffers and not (owner.training and isinstance(owner, _BatchNorm))
            for t in owner._buffers.values()
            if t is not None
        ]
        return _BuffersTaken(buffers) if buffers else None

    def written(
        self, sealed: Sequence[torch.Tensor]
    ) -> tuple[tuple[int, ...], torch.Tensor | list[torch.Tensor] | None]:
        """The positions in ``sealed`` (the buffers the modules hold after the pass)
        of the buffers written since :meth:`take`, and their values from then,
        packed (one object for the garbage collector, however many buffers); the
        scratch copies go back to the pool. A buffer the pass replaced by another
        object is left out: the recomputation finds the new one."""
        copies = self._copies
        written = [
            (t, copy)
            for t, seen, copy in zip(self._buffers, self._versions, copies)
            if t._version != seen
        ]
        positions: tuple[int, ...] = ()
        values = None
        if written:
            where = {id(t): k for k, t in enumerate(sealed)}
            kept = [(where[id(t)], copy) for t, copy in written if id(t) in where]
            if kept:
                positions = tuple(k for k, _ in kept)
                values = _pack([copy for _, copy in kept])
        _give_back(self._signature, copies)
        return positions, values


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One tensor holding the bytes of ``tensors`` (copies where they differ in device)."""
    if len({t.device for t in tensors}) != 1:
        return [t.clone() for t in tensors]
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])


def _unpack(
    packed: torch.Tensor | list[torch.Tensor], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    if isinstance(packed, list):
        return packed
    values, start = [], 0
    for t in like:
        n = t.numel() * t.element_size()
        values.append(packed[start : start + n].view(t.dtype).view(t.shape))
        start += n
    return values
