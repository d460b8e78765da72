"""is_invertible_module: memcnn's semantics, and it leaves the module as it found it."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from invertnet import (
    AdditiveCoupling,
    AffineAdapterNaive,
    AffineCoupling,
    InvertibleModuleWrapper,
    is_invertible_module,
)
from tests._core_helpers import ThreeToOne, TwoWay

torch.manual_seed(0)  # the parametrized modules below are built at collection


class _Scale(nn.Module):
    """``forward(x) = x * scale``; ``inverse(y) = y / scale + error``."""

    def __init__(self, scale: float, error: float) -> None:
        super().__init__()
        self.scale, self.error = scale, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.scale + self.error


class _PassThrough(nn.Module):
    """Returns its second input unchanged: an output that is an input."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, b

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y1 - y2, y2


class _InversePassThrough(nn.Module):
    """Copies in forward, but its inverse returns its second input unchanged."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, b.clone()

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y1 - y2, y2


class _ChunkedOutputs(nn.Module):
    """One input, two outputs that are views of one tensor."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.chunk(x * 2, 2, dim=1)

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return torch.cat([y1, y2], dim=1) / 2


class _ChunkedInputs(nn.Module):
    """Two inputs; the inverse rebuilds them as views of one tensor."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b], dim=1) * 2

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.chunk(y / 2, 2, dim=1)


def _check_no_warning(*args, **kwargs) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = is_invertible_module(*args, **kwargs)
    assert [str(w.message) for w in caught] == []
    return result


@pytest.mark.parametrize(
    "module, shape",
    [
        (AdditiveCoupling(nn.Linear(2, 2)), (3, 4)),
        (AffineCoupling(nn.Linear(2, 2), adapter=AffineAdapterNaive), (3, 4)),
        (TwoWay(), ((3, 4), (3, 4))),
        (ThreeToOne(), ((2, 1), (2, 2), (2, 3))),
    ],
    ids=["additive", "affine", "two-in-two-out", "three-in-one-out"],
)
def test_invertible_modules_pass(module: nn.Module, shape) -> None:
    assert _check_no_warning(module, shape, atol=1e-5)


def test_unwraps_a_wrapper_and_does_not_free_its_inputs() -> None:
    wrapper = InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(2, 2)))
    assert _check_no_warning(wrapper, (3, 4), atol=1e-5)


def test_module_without_inverse_is_not_invertible() -> None:
    assert _check_no_warning(nn.Linear(4, 4), (2, 4)) is False


class _OneWay(nn.Module):
    """An inverse that is right in one round trip only (``torch.allclose`` semantics).

    ``expansive``: ``forward = exp(50 x)`` with a 5e-7 error in the inverse, so
    ``inverse(forward(x))`` is within atol=1e-6 but ``forward(inverse(y))`` is off
    by a relative 2.5e-5. Otherwise ``forward = log1p(x) / 50`` with the error
    2e-5 inside the inverse's exp: ``inverse(forward(x))`` is off by >= 2e-5 but
    ``forward(inverse(y))`` only by 4e-7.
    """

    def __init__(self, expansive: bool, error: float) -> None:
        super().__init__()
        self.expansive, self.error = expansive, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(50 * x) if self.expansive else torch.log1p(x) / 50

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.expansive:
            return torch.log(y) / 50 + self.error
        return torch.expm1(50 * y + self.error)


@pytest.mark.parametrize(
    "expansive, error",
    [(True, 5e-7), (False, 2e-5)],
    ids=["forward-of-inverse-wrong", "inverse-of-forward-wrong"],
)
def test_both_round_trips_are_checked(expansive: bool, error: float) -> None:
    module = _OneWay(expansive, error)
    x = torch.rand(64, 3, generator=torch.Generator().manual_seed(0))
    y = module(x)
    first_ok = torch.allclose(module.inverse(y), x, atol=1e-6)
    second_ok = torch.allclose(module(module.inverse(y)), y, atol=1e-6)
    assert first_ok != second_ok  # the module is right exactly one way
    assert _check_no_warning(module, (64, 3)) is False
    assert _check_no_warning(_OneWay(expansive, 0.0), (64, 3)) is True


def test_atol_is_used() -> None:
    module = _Scale(1.0, 1e-5)
    assert is_invertible_module(module, (4,), atol=1e-6) is False
    assert is_invertible_module(module, (4,), atol=1e-4) is True


class _Recorder(_Scale):
    def __init__(self) -> None:
        super().__init__(1.0, 0.0)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return super().forward(x)


def test_random_seed_and_dtype_select_the_inputs() -> None:
    runs = []
    for seed, dtype in ((1, torch.float32), (1, torch.float32), (2, torch.float64)):
        module = _Recorder()
        assert is_invertible_module(module, (3,), test_input_dtype=dtype, random_seed=seed)
        runs.append(module.seen[0])
    assert torch.equal(runs[0], runs[1])
    assert runs[2].dtype == torch.float64 and not torch.allclose(runs[0].double(), runs[2])
    assert all(((r >= 0) & (r < 1)).all() for r in runs)


def test_module_raising_in_round_trip_is_not_invertible_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="AdditiveCoupling raised ValueError"):
        assert is_invertible_module(AdditiveCoupling(nn.Linear(2, 2)), (3, 5)) is False


@pytest.mark.parametrize(
    "module, shape, match",
    [
        (_PassThrough(), ((2, 3), (2, 3)), "an output is one of the inputs"),
        (
            _InversePassThrough(),
            ((2, 3), (2, 3)),
            "an output of inverse is one of its inputs",
        ),
        (_ChunkedOutputs(), (2, 4), "some outputs share"),
        (_ChunkedInputs(), ((2, 2), (2, 2)), "some inputs share"),
    ],
    ids=["output-is-input", "inverse-output-is-input", "outputs-share", "inputs-share"],
)
def test_sharing_warnings(module: nn.Module, shape, match: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert is_invertible_module(module, shape) is True
    messages = [str(w.message) for w in caught]
    # Each module triggers its own warning and no other.
    assert len(messages) == (2 if isinstance(module, _PassThrough) else 1), messages
    assert any(re.search(match, m) for m in messages), messages


@pytest.mark.parametrize(
    "shape", ["abc", (), (2, -1), (2.0, 3), ((2, 3), 4), [(2, 3), ()], None, (True, 2)]
)
def test_malformed_shape_is_a_value_error(shape) -> None:
    with pytest.raises(ValueError, match="test_input_shape must be a shape"):
        is_invertible_module(AdditiveCoupling(nn.Linear(2, 2)), shape)


class _Noisy(AdditiveCoupling):
    """A coupling with BatchNorm and dropout, to check nothing leaks out of the checker."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.0)))


@pytest.mark.parametrize("training", [True, False])
def test_module_state_and_global_rng_are_left_as_found(training: bool) -> None:
    module = _Noisy().train(training)
    module.Fm[2].train(not training)  # mixed flags must come back individually
    flags = [m.training for m in module.modules()]
    buffers = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    assert is_invertible_module(module, (8, 4), atol=1e-5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in module.modules()] == flags
    for k, v in module.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    if training:  # the check really ran the BatchNorm in training mode
        module(torch.rand(8, 4))
        assert int(module.Fm[1].num_batches_tracked) == 1


def test_device_argument() -> None:
    block = AdditiveCoupling(nn.Linear(2, 2))
    assert is_invertible_module(block, (3, 4), atol=1e-5, device="cpu")
    assert is_invertible_module(block, (3, 4), atol=1e-5, device=torch.device("cpu"))


def test_a_float64_module_is_tested_in_float64_by_default() -> None:
    # The float32 default of memcnn made a float64 module "not invertible".
    block = AdditiveCoupling(nn.Linear(2, 2)).double()
    assert _check_no_warning(block, (3, 4), atol=1e-12) is True
    assert _check_no_warning(InvertibleModuleWrapper(block), (3, 4), atol=1e-12) is True


class _Buffered(_Recorder):
    """No parameters; a float64 buffer sets the dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_default_dtype_follows_parameters_then_buffers_then_the_default() -> None:
    recorder = _Recorder()  # nothing to follow: the default dtype
    assert is_invertible_module(recorder, (3,))
    assert recorder.seen[0].dtype == torch.get_default_dtype()
    buffered = _Buffered()
    assert is_invertible_module(buffered, (3,))
    assert buffered.seen[0].dtype == torch.float64
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        recorder = _Recorder()
        assert is_invertible_module(recorder, (3,))
        assert recorder.seen[0].dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)


def test_a_dtype_the_module_does_not_have_is_refused() -> None:
    block = AdditiveCoupling(nn.Linear(2, 2)).double()
    with pytest.raises(
        ValueError,
        match=r"test_input_dtype=torch.float32 but the module's floating parameters "
        r"\(or buffers\) are torch.float64.*Leave test_input_dtype out",
    ):
        is_invertible_module(block, (3, 4), test_input_dtype=torch.float32)
    # The module's own dtype, given explicitly (memcnn's keyword), is accepted.
    assert is_invertible_module(block, (3, 4), test_input_dtype=torch.float64, atol=1e-12)
    with pytest.raises(TypeError, match="test_input_dtype must be a torch.dtype"):
        is_invertible_module(block, (3, 4), test_input_dtype="float64")  # type: ignore[arg-type]
