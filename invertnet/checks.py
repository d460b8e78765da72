"""Checking that a module really is invertible."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from invertnet.wrappers import InvertibleModuleWrapper

__all__ = ["is_invertible_module"]

Shape = Sequence[int] | Sequence[Sequence[int]]


def _is_shape(s: Any) -> bool:
    return isinstance(s, (tuple, list, torch.Size)) and all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in s
    )


def _normalise_shapes(test_input_shape: Any) -> list[tuple[int, ...]]:
    if _is_shape(test_input_shape) and len(test_input_shape) > 0:
        return [tuple(test_input_shape)]
    if (
        isinstance(test_input_shape, (tuple, list))
        and len(test_input_shape) > 0
        and all(_is_shape(s) and len(s) > 0 for s in test_input_shape)
    ):
        return [tuple(s) for s in test_input_shape]
    raise ValueError(
        "test_input_shape must be a shape (a tuple of non-negative ints, e.g. (2, 4, 8, 8)) "
        "or a tuple of shapes for a module with several inputs, got "
        f"{test_input_shape!r}"
    )


def _as_tuple(y: Any) -> tuple[torch.Tensor, ...]:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _allclose(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], atol: float) -> bool:
    return len(a) == len(b) and all(
        isinstance(x, torch.Tensor) and x.shape == y.shape and torch.allclose(x, y, atol=atol)
        for x, y in zip(a, b)
    )


@contextlib.contextmanager
def _module_state_preserved(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Leave the module, its buffers and the global RNG (CPU and ``device``) as they were."""
    modes = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    # Dropout on an accelerator draws from that device's generator, not the CPU's.
    accelerator = device.type not in ("cpu", "meta")
    devices = [device] if accelerator else []
    device_type = device.type if accelerator else "cuda"
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, mode in modes:
                m.training = mode


def _storage_ptrs(tensors: tuple[torch.Tensor, ...]) -> list[int]:
    # Storage addresses, not data_ptr: two views of one tensor (such as the halves
    # from torch.chunk) share memory even though their data_ptr differ. Empty
    # tensors hold no memory and are left out.
    return [t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0]


def _warn_shared(tensors: tuple[torch.Tensor, ...], what: str) -> None:
    ptrs = _storage_ptrs(tensors)
    if len(set(ptrs)) != len(ptrs):
        warnings.warn(
            f"is_invertible_module: some {what} share the same tensor (or its memory); an "
            "InvertibleModuleWrapper cannot free and restore such tensors independently",
            UserWarning,
            stacklevel=3,
        )


def _module_dtypes(module: nn.Module) -> list[torch.dtype]:
    """The floating dtypes of the module's parameters (of its buffers if it has no
    floating parameters), in order of first appearance."""
    for tensors in (module.parameters(), module.buffers()):
        dtypes: list[torch.dtype] = []
        for t in tensors:
            if t.is_floating_point() and t.dtype not in dtypes:
                dtypes.append(t.dtype)
        if dtypes:
            return dtypes
    return []


def _input_dtype(module: nn.Module, test_input_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to test ``module`` in; refuse one its parameters do not have."""
    dtypes = _module_dtypes(module)
    if test_input_dtype is None:
        return dtypes[0] if dtypes else torch.get_default_dtype()
    if not isinstance(test_input_dtype, torch.dtype):
        raise TypeError(
            "test_input_dtype must be a torch.dtype (such as torch.float64) or None for "
            f"the module's own dtype, got {test_input_dtype!r}"
        )
    if dtypes and test_input_dtype not in dtypes:
        have = ", ".join(str(d) for d in dtypes)
        raise ValueError(
            f"is_invertible_module: test_input_dtype={test_input_dtype} but the module's "
            f"floating parameters (or buffers) are {have}; the round trip would fail on the "
            "dtype mismatch, not on the inverse. Leave test_input_dtype out (None) to test "
            f"in the module's dtype, or convert the module (module.to({test_input_dtype}))"
        )
    return test_input_dtype


def is_invertible_module(
    module_in: nn.Module,
    test_input_shape: Shape,
    test_input_dtype: torch.dtype | None = None,
    atol: float = 1e-6,
    random_seed: int = 42,
    device: torch.device | str | None = None,
) -> bool:
    """Test numerically whether a module is invertible.

    The module is run on uniform random inputs: it passes when
    ``inverse(forward(x))`` equals ``x`` and ``forward(inverse(y))`` equals
    ``y = forward(x)``, both within ``atol``. A wrapper is unwrapped first. The
    module's training flags, buffers (such as BatchNorm statistics) and the global
    RNG state are left as they were.

    Parameters
    ----------
    module_in : torch.nn.Module
        The module (or an :class:`~invertnet.InvertibleModuleWrapper`) to test.
    test_input_shape : tuple of int, or tuple of tuples of int
        Shape of the input, or one shape per input for several inputs.
    test_input_dtype : torch.dtype, optional
        Dtype of the random inputs. ``None`` (the default; memcnn's default is
        ``torch.float32``) means the module's dtype: that of its first floating
        parameter, else of its first floating buffer, else
        :func:`torch.get_default_dtype`. A float64 module is thus tested in
        float64, not reported non-invertible because float32 inputs do not match
        its parameters.
    atol : float
        Absolute tolerance of the round trips.
    random_seed : int
        Seed of the generator that draws the inputs.
    device : torch.device or str, optional
        Where to create the inputs; by default where the module's first parameter
        lives, else the CPU.

    Returns
    -------
    bool
        ``False`` if the module has no ``inverse`` or a round trip fails.

    Raises
    ------
    ValueError
        If ``test_input_shape`` is not a shape or a tuple of shapes, or if
        ``test_input_dtype`` is given and is not the dtype of any of the module's
        floating parameters (of its floating buffers, if it has no floating
        parameters): the verdict would be about the mismatch, not the inverse.
    TypeError
        If ``test_input_dtype`` is neither ``None`` nor a :class:`torch.dtype`.

    Warns
    -----
    UserWarning
        If inputs (as rebuilt by ``inverse``) share a tensor, outputs share a tensor,
        an output of ``forward`` is one of its inputs, or an output of ``inverse`` is
        one of its inputs; sharing the memory of one tensor (views) counts. Also
        when the module raises during a round trip (the result is then ``False``).

    Examples
    --------
    >>> import torch
    >>> from invertnet import AdditiveCoupling, is_invertible_module
    >>> is_invertible_module(AdditiveCoupling(torch.nn.Linear(2, 2)), (3, 4))
    True
    >>> is_invertible_module(torch.nn.Linear(4, 4), (3, 4))  # no inverse
    False
    >>> is_invertible_module(AdditiveCoupling(torch.nn.Linear(2, 2)).double(), (3, 4))
    True
    """
    shapes = _normalise_shapes(test_input_shape)
    if isinstance(module_in, InvertibleModuleWrapper):
        module_in = module_in.module
    if not callable(getattr(module_in, "inverse", None)):
        return False
    dtype = _input_dtype(module_in, test_input_dtype)
    if device is None:
        first = next(iter(module_in.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(random_seed)
    with _module_state_preserved(module_in, device), torch.no_grad():
        xs = tuple(torch.rand(s, dtype=dtype, device=device, generator=generator) for s in shapes)
        try:
            ys = _as_tuple(module_in(*xs))
            xs_back = _as_tuple(module_in.inverse(*ys))
            inverse_returns_its_input = bool(set(_storage_ptrs(ys)) & set(_storage_ptrs(xs_back)))
            if not _allclose(xs_back, xs, atol):
                return False
            ys = _as_tuple(module_in(*xs))
            if not _allclose(_as_tuple(module_in(*_as_tuple(module_in.inverse(*ys)))), ys, atol):
                return False
        except (RuntimeError, ValueError, TypeError, ZeroDivisionError) as error:
            warnings.warn(
                f"is_invertible_module: {type(module_in).__name__} raised "
                f"{type(error).__name__} during the round trip: {error}",
                UserWarning,
                stacklevel=2,
            )
            return False
        # The generated inputs never share memory; the inputs the inverse rebuilds
        # (which a wrapper's inverse direction hands on) may.
        _warn_shared(xs_back, "inputs")
        _warn_shared(ys, "outputs")
        if set(_storage_ptrs(xs)) & set(_storage_ptrs(ys)):
            warnings.warn(
                "is_invertible_module: an output is one of the inputs (or shares its memory); "
                "an InvertibleModuleWrapper would free it while it is still needed",
                UserWarning,
                stacklevel=2,
            )
        if inverse_returns_its_input:
            warnings.warn(
                "is_invertible_module: an output of inverse is one of its inputs (or shares "
                "its memory); an InvertibleModuleWrapper's inverse direction would free it "
                "while it is still needed",
                UserWarning,
                stacklevel=2,
            )
    return True
