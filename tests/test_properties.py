"""Property tests (hypothesis): every coupling, any shape, split dimension, dtype and
memory layout, reconstructs its input under the wrapper and gets the gradients of
plain autograd; ``is_invertible_module`` never accepts a wrong inverse.

The number of examples is set by a hypothesis profile: ``ci`` (the default: few
examples, derandomised so that CI is reproducible and its time bounded) or
``thorough`` (many random examples), chosen with the environment variable
``INVERTNET_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineAdapterSigmoid,
    AffineCoupling,
    InvertibleModuleWrapper,
    MomentumCoupling,
    ReconstructionError,
    debug_reconstruction,
    is_invertible_module,
)

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile(os.environ.get("INVERTNET_HYPOTHESIS_PROFILE", "ci"))

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
#: (rtol, atol) for a reconstructed input and for gradients, per dtype: a few units
#: of rounding of one coupling (bfloat16 keeps 8 bits of mantissa).
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (6e-2, 6e-2),
}


class Mixer(nn.Module):
    """A shape-preserving sub-module for halves of any shape: mixes neighbours along
    the last dimension, so every output depends on several inputs."""

    def __init__(self, out_factor: int = 1) -> None:
        super().__init__()
        self.out_factor = out_factor
        self.w = nn.Parameter(0.5 * torch.randn(2 * out_factor))
        self.b = nn.Parameter(0.1 * torch.randn(out_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.w.to(x.dtype), self.b.to(x.dtype)
        rolled = x.roll(1, dims=-1)
        outs = [
            torch.tanh(w[2 * k] * x + w[2 * k + 1] * rolled + b[k]) for k in range(self.out_factor)
        ]
        # AffineAdapterSigmoid wants twice the channels (dimension 1).
        return outs[0] if self.out_factor == 1 else torch.cat(outs, dim=1)


COUPLINGS: dict[str, Callable[[int, float], nn.Module]] = {
    "additive": lambda d, g: AdditiveCoupling(Mixer(), split_dim=d),
    "affine_naive": lambda d, g: AffineCoupling(Mixer(), adapter=AffineAdapterNaive, split_dim=d),
    "affine_sigmoid": lambda d, g: AffineCoupling(
        Mixer(out_factor=2), adapter=AffineAdapterSigmoid, split_dim=d
    ),
    "momentum": lambda d, g: MomentumCoupling(Mixer(), gamma=g, split_dim=d),
}


@st.composite
def cases(draw: st.DrawFn) -> dict:
    ndim = draw(st.integers(2, 4))
    split_dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    shape[split_dim] = 2 * draw(st.integers(1, 3))
    return {
        "coupling": draw(st.sampled_from(sorted(COUPLINGS))),
        "dtype": DTYPES[draw(st.sampled_from(sorted(DTYPES)))],
        "shape": tuple(shape),
        "split_dim": split_dim,
        "gamma": draw(st.sampled_from([0.5, 0.9, 0.99, 1.0])),
        # leaf: contiguous; permuted_owner: non-contiguous strides over a storage of
        # its own (freeable); view: a transposed view of another tensor (kept).
        "layout": draw(st.sampled_from(["leaf", "permuted_owner", "view"])),
        "perm": draw(st.permutations(range(ndim))),
        "seed": draw(st.integers(0, 2**16)),
    }


def _make_input(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x, leaf): the wrapper's input and the leaf whose gradient is compared."""
    shape, perm, dtype = case["shape"], case["perm"], case["dtype"]
    if case["layout"] == "leaf":
        x = torch.randn(shape, dtype=dtype).requires_grad_()
        return x, x
    # Lay the data out in `perm` order, then view it back in `shape` order.
    inverse_perm = [perm.index(i) for i in range(len(perm))]
    stored = torch.randn([shape[p] for p in perm], dtype=dtype)
    if case["layout"] == "permuted_owner":
        # clone() keeps the permuted strides and gives the tensor its own storage.
        x = stored.permute(inverse_perm).clone().requires_grad_()
        return x, x
    leaf = stored.requires_grad_()
    return leaf.permute(inverse_perm), leaf


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=what)


@PROFILE
@given(case=cases())
def test_wrapped_coupling_reconstructs_and_matches_plain_gradients(case: dict) -> None:
    torch.manual_seed(case["seed"])
    module = COUPLINGS[case["coupling"]](case["split_dim"], case["gamma"])
    plain = InvertibleModuleWrapper(copy.deepcopy(module), disable=True)
    wrapped = InvertibleModuleWrapper(module)

    x, leaf = _make_input(case)
    x_ref, leaf_ref = _make_input(case) if case["layout"] == "view" else (None, None)
    if x_ref is None:
        x_ref = leaf_ref = x.detach().clone().requires_grad_()
    with torch.no_grad():
        leaf_ref.copy_(leaf)
    original = x.detach().clone()
    size, stride = x.shape, x.stride()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Debug mode's default tolerances must accept every correct coupling.
        with debug_reconstruction():
            y = wrapped(x)
    kept = [w for w in caught if "kept in memory" in str(w.message)]
    if case["layout"] == "view":
        assert kept, "a view must be kept, not freed"
        assert x.shape == size
    else:
        assert not kept, [str(w.message) for w in kept]
        assert x.numel() == 0, "an input that owns its storage must be freed"

    y_ref = plain(x_ref)
    _close(y, y_ref, case["dtype"], "outputs")
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)

    assert x.shape == size and x.stride() == stride
    _close(x.detach(), original, case["dtype"], "reconstructed input")
    _close(leaf.grad, leaf_ref.grad, case["dtype"], "input gradient")
    for (name, p), p_ref in zip(wrapped.named_parameters(), plain.parameters()):
        _close(p.grad, p_ref.grad, case["dtype"], f"gradient of {name}")


class WrongInverse(nn.Module):
    """A correct coupling whose inverse is perturbed by at least ``eps`` somewhere."""

    def __init__(self, module: nn.Module, kind: str, eps: float, index: int) -> None:
        super().__init__()
        self.module = module
        self.kind, self.eps, self.index = kind, eps, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        x = self.module.inverse(y)
        if self.kind == "offset_everywhere":
            return x + self.eps
        if self.kind == "offset_one_element":
            flat = x.flatten().clone()
            flat[self.index % flat.numel()] -= self.eps
            return flat.view_as(x)
        # input_dependent: a smooth error, never smaller than eps
        return x + self.eps * (1 + y.square())


@PROFILE
@given(
    coupling=st.sampled_from(sorted(COUPLINGS)),
    kind=st.sampled_from(["offset_everywhere", "offset_one_element", "input_dependent"]),
    log_atol=st.integers(-7, -2),
    factor=st.floats(2.0, 1e4),
    index=st.integers(0, 10_000),
    seed=st.integers(0, 2**16),
)
def test_is_invertible_module_rejects_every_wrong_inverse(
    coupling: str, kind: str, log_atol: int, factor: float, index: int, seed: int
) -> None:
    torch.manual_seed(seed)
    shape = (3, 4, 2)
    module = COUPLINGS[coupling](1, 0.9).double()
    atol = 10.0**log_atol
    # The checker compares with torch.allclose (rtol 1e-5 on inputs in [0, 1)).
    eps = factor * (atol + 1e-5)
    assert is_invertible_module(module, shape, torch.float64, atol=atol)
    wrong = WrongInverse(module, kind, eps, index)
    assert not is_invertible_module(wrong, shape, torch.float64, atol=atol)


@PROFILE
@given(
    coupling=st.sampled_from(sorted(COUPLINGS)),
    kind=st.sampled_from(["offset_everywhere", "offset_one_element", "input_dependent"]),
    eps=st.floats(1e-3, 1.0),
    index=st.integers(0, 10_000),
)
def test_debug_mode_rejects_every_wrong_inverse(
    coupling: str, kind: str, eps: float, index: int
) -> None:
    torch.manual_seed(0)
    wrong = InvertibleModuleWrapper(WrongInverse(COUPLINGS[coupling](1, 0.9), kind, eps, index))
    # An activation: rebuilt by the inverse (a leaf of the caller's is handed back).
    x = torch.randn(3, 4, 2, requires_grad=True) * 1
    with debug_reconstruction():
        y = wrong(x)
    try:
        y.sum().backward()
    except ReconstructionError as error:
        assert error.max_abs_error >= 0.99 * eps
    else:
        raise AssertionError("debug mode accepted a wrong inverse")
