"""Small invertible modules and comparison helpers shared by the core-framework tests."""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from invertnet import AdditiveCoupling, InvertibleModuleWrapper
from invertnet.couplings.additive import Add
from invertnet.couplings.base import Step


class Counting(nn.Module):
    """Wraps a module and counts its forward calls (with and without grad)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


class ScaleShiftNet(nn.Module):
    """Returns a (scale, shift) pair directly, for AffineCoupling without an adapter."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.s = nn.Linear(width, width)
        self.t = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Scales in (e^-0.5, e^0.5) keep a 10-deep float32 chain well conditioned.
        return torch.exp(0.5 * torch.tanh(self.s(x))), self.t(x)


class TwoWay(nn.Module):
    """A generic (non-coupling) invertible module with two inputs and two outputs.

    ``y1 = a * exp(w) + f(b)``, ``y2 = b + tanh(g(y1))``. It has no fused backward, so
    the wrapper takes its inverse-plus-re-forward fallback.
    """

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(0.1 * torch.randn(width))
        self.f = nn.Linear(width, width)
        self.g = nn.Linear(width, width)
        self.forward_calls = 0
        self.inverse_calls = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.forward_calls += 1
        y1 = a * torch.exp(self.w) + self.f(b)
        return y1, b + torch.tanh(self.g(y1))

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.inverse_calls += 1
        b = y2 - torch.tanh(self.g(y1))
        return (y1 - self.f(b)) * torch.exp(-self.w), b


class ThreeToOne(nn.Module):
    """Three inputs of different shapes, concatenated into one output (and split back)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))

    def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b, c], dim=1) * torch.exp(self.w)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b, c = torch.split(y * torch.exp(-self.w), [1, 2, 3], dim=1)
        # Separate tensors, not views of one: a wrapper can then free each of them.
        return a.clone(), b.clone(), c.clone()


class Unary(nn.Module):
    """One input, one output, no fused backward: ``y = x * exp(w) + b``."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.w = nn.Parameter(0.1 * torch.randn(width))
        self.b = nn.Parameter(0.1 * torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(self.w) + self.b

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.b) * torch.exp(-self.w)


class DropoutTwoWay(nn.Module):
    """A generic invertible module whose forward and inverse use dropout."""

    def __init__(self, width: int = 4, p: float = 0.5) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Dropout(p))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + self.f(b), 2 * b

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = y2 / 2
        return y1 - self.f(b), b


def wrapped_pair(
    module: nn.Module, **kwargs: object
) -> tuple[InvertibleModuleWrapper, InvertibleModuleWrapper]:
    """Two copies of ``module``: under a memory-saving wrapper, and with disable=True.

    Both are copies, so a module instance shared between parametrized cases is never
    changed (no gradients accumulate on it).
    """
    return (
        InvertibleModuleWrapper(copy.deepcopy(module), **kwargs),
        InvertibleModuleWrapper(copy.deepcopy(module), disable=True),
    )


def run_and_grads(
    net: nn.Module,
    inputs: list[torch.Tensor],
    call: Callable[..., object] | None = None,
    seed: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Run ``call(*inputs)`` (default ``net``), back-propagate a fixed random projection.

    Returns the detached outputs, the input gradients and the parameter gradients.
    Inputs are cloned leaves, so each call starts from the same values; those that
    require grad are passed as activations (``leaf * 1``), which a wrapper frees and
    rebuilds, as it does inside a model (the caller's own leaves it only hides).
    """
    net.zero_grad(set_to_none=True)
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    if seed is not None:
        torch.manual_seed(seed)
    out = (call or net)(*(leaf * 1 if leaf.requires_grad else leaf for leaf in leaves))
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(1234)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    return (
        [o.detach() for o in outs],
        [x.grad for x in leaves],
        [p.grad for p in net.parameters()],
    )


def assert_all_close(
    got: list[torch.Tensor | None], want: list[torch.Tensor | None], rtol: float, atol: float
) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"entry {i}: {g is None=} but {w is None=}"
        if g is not None:
            # Elementwise rtol plus an absolute floor of rtol times the tensor's largest
            # entry: entries that are zero in exact arithmetic (a conv bias before a
            # BatchNorm) carry rounding noise of that size, in plain autograd too.
            floor = max(atol, rtol * w.abs().max().item()) if w.numel() else atol
            torch.testing.assert_close(
                g, w, rtol=rtol, atol=floor, msg=lambda m, i=i: f"entry {i}: {m}"
            )


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) asked for by the issue: 1e-5 in float32, 1e-10 in float64."""
    return (1e-5, 1e-6) if dtype == torch.float32 else (1e-10, 1e-12)


class AddTwice(Add):
    """``a + 2m``: overrides ``apply`` and ``invert`` alone, so the engine must use
    neither Add's ``apply_into``/``invert_into`` nor its ``*_over_m`` (which compute
    ``a + m``)."""

    def apply(self, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return a + 2 * m

    def invert(self, a_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return a_new - 2 * m


class TwiceCoupling(AdditiveCoupling):
    """An additive coupling whose steps use :class:`AddTwice`."""

    def steps(self) -> tuple[Step, ...]:
        return (Step(0, 1, "Fm", AddTwice()), Step(1, 0, "Gm", AddTwice()))


class UsesShared(nn.Module):
    """A function that also uses a module it does not own (a closure over ``shared``),
    whose parameters its own backward must reach as plain autograd does."""

    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.own = nn.Linear(6, 6)
        self.shared = [shared]  # a list, so that nn.Module does not register it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.own(x) + self.shared[0](x))


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as the module ``name`` (registered in
    ``sys.modules``, which dataclasses in it need)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_grads_close(want: list[Any], got: list[Any], rtol: float, atol: float) -> None:
    """Gradient lists equal to ``rtol`` of each tensor's largest entry plus ``atol``,
    and ``None`` in the same places."""
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        if w is None or g is None:
            assert w is None and g is None, f"gradient {i}: {w is None=} but {g is None=}"
            continue
        scale = w.abs().max().item()
        err = (w - g).abs().max().item()
        assert err <= rtol * scale + atol, f"gradient {i}: off by {err:.3g}, scale {scale:.3g}"


def activation_bytes(model: nn.Module, call: Callable[[], Any]) -> int:
    """Bytes of activations that ``call()`` (a forward pass of ``model``) leaves for
    backward: the distinct storages autograd saved, plus the inputs of the model's
    :class:`~invertnet.InvertibleModuleWrapper` s that are still held after it.

    Kept block inputs do not pass through autograd's saved-tensor hooks, so they are
    counted apart, through weak references, which do not count as holders (a strong
    one would make a wrapper keep the input it would free).
    """
    import weakref

    from invertnet.bench.memory import SavedBytes

    inputs: list[weakref.ref[torch.Tensor]] = []

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        inputs.extend(weakref.ref(a) for a in args if isinstance(a, torch.Tensor))

    wrappers = [m for m in model.modules() if isinstance(m, InvertibleModuleWrapper)]
    handles = [w.register_forward_pre_hook(record) for w in wrappers]
    counter = SavedBytes(model)
    try:
        with counter.counting():
            out = call()
    finally:
        for handle in handles:
            handle.remove()
    kept = {}
    for ref in inputs:
        t = ref()
        if t is not None and t.untyped_storage().nbytes():
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del out
    return counter.nbytes + sum(kept.values())


def run_ranks(worker: str, out: Path, world: int, what: str) -> list[dict]:
    """Run ``python -m <worker> rank world port out/rank<r>.pt`` in ``world`` processes
    (gloo on the loopback) and return what each rank saved, failing the test with a
    rank's log if it fails or the ranks do not finish within 240 s."""
    import os
    import socket
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", worker, str(r), str(world), str(port), str(out / f"rank{r}.pt")],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a {what} rank did not finish within 240 s") from None
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{what} rank {r} failed:\n{log}"
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]
