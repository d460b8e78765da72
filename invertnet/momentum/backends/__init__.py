"""The backends of the exact momentum arithmetic, one chosen per forward pass.

``MomentumNet(use_backprop=False)`` runs each layer's step in four phases
(:class:`Backend`: ``advance``, ``retreat_position``, ``retreat_velocity``,
``backpropagate``). Three backends compute them, with the same states bit for bit:

* ``"tensor"``: tensor operations (:mod:`~.tensor`), the reference, which serves
  everything;
* ``"native"``: fused C loops on the CPU (:mod:`~.native`), where the extension
  was built at installation (:data:`NATIVE`);
* ``"triton"``: Triton kernels on CUDA (:mod:`~.triton`), where Triton loads
  (:func:`triton_available`).

:func:`select` picks, once per forward pass, the first registered backend that is
enabled and serves the pass's state, else the reference; backward uses the same.
A phase given tensors that backend cannot walk (a function that returns a
transposed tensor, or ``bfloat16`` under autocast where the C loops need
``float32``) takes the reference for that call. :func:`use_backends` is the one
switch that enables them; :func:`native_kernels` and :func:`triton_kernels`, the
switches of earlier versions, set it. :func:`register` adds a backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from invertnet.momentum.backends.base import Backend, Peaks
from invertnet.momentum.backends.native import NATIVE, NativeBackend
from invertnet.momentum.backends.tensor import TensorBackend
from invertnet.momentum.backends.triton import TritonBackend

__all__ = [
    "NATIVE",
    "REFERENCE",
    "Backend",
    "Peaks",
    "enabled_backends",
    "get",
    "native_kernels",
    "register",
    "registered",
    "select",
    "triton_available",
    "triton_kernels",
    "unregister",
    "use_backends",
]

#: The reference backend: tensor operations, which serve every state.
REFERENCE: Backend = TensorBackend()

_TRITON = TritonBackend()

# In order of preference: select takes the first that is enabled and serves.
_registry: list[Backend] = [_TRITON, NativeBackend()]

# The one switch: the names of the backends select may take; None for all.
_enabled: frozenset[str] | None = None


def registered() -> tuple[str, ...]:
    """The names of the registered backends, in the order :func:`select` tries them
    (the reference, ``"tensor"``, last)."""
    return (*(b.name for b in _registry), REFERENCE.name)


def get(name: str) -> Backend:
    """The registered backend called ``name``.

    Raises
    ------
    KeyError
        If none is, naming those that are.
    """
    for backend in (*_registry, REFERENCE):
        if backend.name == name:
            return backend
    raise KeyError(f"no momentum backend {name!r}; registered: {', '.join(registered())}")


def register(backend: Backend) -> Backend:
    """Add ``backend``, tried by :func:`select` before those registered earlier.

    A backend of the same name is replaced, where it was. Returns ``backend``.

    Raises
    ------
    TypeError
        If ``backend`` is not a :class:`Backend`.
    ValueError
        If it has no name, or the reference's, ``"tensor"``.
    """
    if not isinstance(backend, Backend):
        raise TypeError(
            f"register: a momentum backend must subclass Backend, got {type(backend).__name__}"
        )
    if not backend.name or backend.name == REFERENCE.name:
        raise ValueError(
            f"register: a momentum backend needs a name of its own, got {backend.name!r}"
        )
    for i, known in enumerate(_registry):
        if known.name == backend.name:
            _registry[i] = backend
            return backend
    _registry.insert(0, backend)
    return backend


def unregister(name: str) -> None:
    """Remove the backend called ``name`` (the reference stays).

    Raises
    ------
    KeyError
        If no backend of that name is registered, or it is the reference.
    """
    for i, known in enumerate(_registry):
        if known.name == name:
            del _registry[i]
            return
    raise KeyError(f"no removable momentum backend {name!r}; registered: {', '.join(registered())}")


def enabled_backends() -> tuple[str, ...]:
    """The names of the backends :func:`select` may take now, in its order (the
    reference, which always serves, last)."""
    names = (b.name for b in _registry if _enabled is None or b.name in _enabled)
    return (*names, REFERENCE.name)


@contextlib.contextmanager
def use_backends(*names: str) -> Iterator[None]:
    """Let :func:`select` take only the backends ``names``, inside the ``with`` block.

    The one switch of the exact momentum arithmetic. The reference, ``"tensor"``,
    always serves what the others do not: ``use_backends()`` (or
    ``use_backends("tensor")``) runs everything as tensor operations. Every choice
    gives the same states bit for bit, and so the same outputs; the gradients may
    differ in their last bits (the loops add in another order). The setting is
    process-wide, not per thread, and is read when a forward pass starts: its
    backward uses the backend that pass took.

    Parameters
    ----------
    *names : str
        Registered backends (:func:`registered`).

    Raises
    ------
    ValueError
        If a name is not registered.

    Examples
    --------
    >>> import torch
    >>> from invertnet import MomentumNet
    >>> from invertnet.momentum.backends import use_backends
    >>> net = MomentumNet([torch.nn.Tanh()] * 3, gamma=0.9, use_backprop=False)
    >>> with use_backends("tensor"):
    ...     out = net(torch.ones(2, 4, requires_grad=True))
    """
    known = registered()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"use_backends: no momentum backend {', '.join(map(repr, unknown))}; "
            f"registered: {', '.join(known)}"
        )
    global _enabled
    before, _enabled = _enabled, frozenset(names)
    try:
        yield
    finally:
        _enabled = before


def select(dtype: torch.dtype, state: tuple[torch.Tensor, ...]) -> Backend:
    """The backend for a forward pass whose functions take ``dtype``: the first
    registered one that is enabled (:func:`use_backends`) and serves the float64
    ``state`` tensors, else the reference. Called once per forward pass."""
    enabled = _enabled
    for backend in _registry:
        if (enabled is None or backend.name in enabled) and backend.serves(dtype, state):
            return backend
    return REFERENCE


@contextlib.contextmanager
def _switched(name: str, enabled: bool) -> Iterator[None]:
    """Enable or disable one backend, the others as they are (:func:`use_backends`)."""
    names = set(enabled_backends())
    if enabled:
        names.add(name)
    else:
        names.discard(name)
    with use_backends(*names):
        yield


@contextlib.contextmanager
def native_kernels(enabled: bool) -> Iterator[None]:
    """Use the C loops, where they apply, only if ``enabled``, inside the ``with`` block.

    Enables or disables the ``"native"`` backend in the one switch,
    :func:`use_backends`, leaving the others as they are. Both ways give the same
    states bit for bit, and so the same outputs; the gradients may differ in their
    last bits (the loops add in another order). The setting is process-wide, not
    per thread.

    Parameters
    ----------
    enabled : bool
        ``False`` makes every CPU step take the tensor operations.

    Raises
    ------
    RuntimeError
        If ``enabled`` is true and the extension was not built (:data:`NATIVE`).

    Examples
    --------
    >>> import torch
    >>> from invertnet import MomentumNet
    >>> net = MomentumNet([torch.nn.Tanh()] * 3, gamma=0.9, use_backprop=False)
    >>> with native_kernels(False):
    ...     out = net(torch.ones(2, 4, requires_grad=True))
    """
    if enabled and not NATIVE:
        raise RuntimeError(
            "native_kernels(True): the C extension invertnet.momentum.backends._native is "
            "not built (it needs a C compiler when invertnet is installed); reinstall with one"
        )
    with _switched(NativeBackend.name, bool(enabled)):
        yield


@contextlib.contextmanager
def triton_kernels(enabled: bool) -> Iterator[None]:
    """Use the Triton kernels on CUDA, where they apply, only if ``enabled``, inside the block.

    Enables or disables the ``"triton"`` backend in the one switch,
    :func:`use_backends`, leaving the others as they are. Both ways give the same
    states bit for bit; the gradients may differ in their last bits. The setting
    is process-wide, not per thread. Turning the kernels on where Triton is not
    installed is no error: the tensor operations serve (see :func:`triton_available`).

    Parameters
    ----------
    enabled : bool
        ``False`` makes every CUDA step take the tensor operations.

    Examples
    --------
    >>> import torch
    >>> from invertnet import MomentumNet
    >>> net = MomentumNet([torch.nn.Tanh()] * 3, gamma=0.9, use_backprop=False)
    >>> with triton_kernels(False):
    ...     out = net(torch.ones(2, 4, requires_grad=True))
    """
    with _switched(TritonBackend.name, bool(enabled)):
        yield


def triton_available() -> bool:
    """Whether the Triton kernels can be loaded (Triton is installed and imports).

    Imports Triton on the first call.
    """
    return _TRITON.kernels is not None
