"""Debug mode and the NaN/Inf check: wrong reconstructions fail loudly, with names and sizes."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from invertnet import (
    ActNorm,
    AdditiveCoupling,
    Flow,
    InvertibleModuleWrapper,
    Permutation,
    ReconstructionError,
    debug_reconstruction,
    set_debug_reconstruction,
    set_finite_check,
)
from invertnet.couplings.additive import Add
from invertnet.couplings.base import Step
from invertnet.wrappers.debug import ReconstructionReport


class Scale(nn.Module):
    """``y = x * s``; ``inverse`` adds ``offset`` to the true inverse (0 means correct)."""

    def __init__(self, scale: torch.Tensor, offset: float = 0.0) -> None:
        super().__init__()
        self.s = nn.Parameter(scale.clone())
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.s + self.offset


class SloppyAdd(Add):
    """Addition whose inverse is off by a constant: a wrong coupling on the fused path."""

    def invert(self, a_new: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return a_new - m + 0.25


class SloppyCoupling(AdditiveCoupling):
    def steps(self) -> tuple[Step, ...]:
        return (Step(0, 1, "Fm", SloppyAdd()), Step(1, 0, "Gm", Add()))


@pytest.fixture(autouse=True)
def _reset_global_switches() -> Iterator[None]:
    yield
    set_debug_reconstruction(False)
    set_finite_check(True)


def _input(*shape: int) -> torch.Tensor:
    # A non-leaf that owns its storage, so that the wrapper frees it.
    leaf = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    return leaf * 1.0


def test_debug_mode_accepts_a_correct_inverse_and_still_frees_the_input() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        *(InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(3, 3).double())) for _ in range(3))
    )
    x = _input(4, 6)
    with debug_reconstruction(model=net):
        y = net(x)
    assert x.shape == (0,), "debug mode must not change what the wrapper frees"
    y.sum().backward()
    assert x.shape == (4, 6)


@pytest.mark.parametrize("fused", [False, True], ids=["inverse_then_forward", "fused_coupling"])
def test_debug_mode_names_the_module_and_the_error_size(fused: bool) -> None:
    torch.manual_seed(0)
    if fused:
        bad = InvertibleModuleWrapper(SloppyCoupling(nn.Linear(3, 3).double()))
        expected_error = 0.25
    else:
        bad = InvertibleModuleWrapper(Scale(torch.full((6,), 2.0, dtype=torch.float64), 0.1))
        expected_error = 0.1
    net = nn.Sequential(InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(3, 3).double())), bad)
    x = _input(4, 6)
    with debug_reconstruction(model=net):
        y = net(x)
    # The check runs in backward, whether or not the block is still active.
    with pytest.raises(ReconstructionError) as info:
        y.sum().backward()
    error = info.value
    message = str(error)
    assert f"{type(bad.module).__name__}) '1'" in message
    assert error.module_name.endswith("'1'")
    assert error.input_index == 0
    assert error.max_abs_error == pytest.approx(expected_error, rel=1e-6)
    assert f"{expected_error:.3g}" in message
    assert "is_invertible_module" in message and "keep_input=True" in message


def test_outside_debug_mode_a_wrong_inverse_goes_unnoticed() -> None:
    # Why debug mode exists: without the kept original nothing can tell.
    bad = InvertibleModuleWrapper(Scale(torch.full((6,), 2.0, dtype=torch.float64), 0.1))
    x = _input(4, 6)
    bad(x).sum().backward()
    assert x.shape == (4, 6)


def test_debug_mode_applies_to_forward_passes_run_inside_it_only() -> None:
    bad = InvertibleModuleWrapper(Scale(torch.full((6,), 2.0, dtype=torch.float64), 0.1))
    x = _input(4, 6)
    y = bad(x)
    with debug_reconstruction():
        y.sum().backward()  # forward ran outside: no copy was kept, nothing to compare


def test_global_switch_turns_debug_mode_on_and_off() -> None:
    bad = InvertibleModuleWrapper(Scale(torch.full((6,), 2.0, dtype=torch.float64), 0.1))
    set_debug_reconstruction(True)
    with pytest.raises(ReconstructionError, match=r"InvertibleModuleWrapper\(Scale\)"):
        bad(_input(4, 6)).sum().backward()
    set_debug_reconstruction(False)
    bad(_input(4, 6)).sum().backward()


def test_tolerances_are_respected() -> None:
    bad = InvertibleModuleWrapper(Scale(torch.full((6,), 2.0, dtype=torch.float64), 1e-3))
    with debug_reconstruction(atol=1e-2, rtol=0.0):
        y = bad(_input(4, 6))
    y.sum().backward()
    with debug_reconstruction(atol=1e-4, rtol=0.0):
        y = bad(_input(4, 6))
    with pytest.raises(ReconstructionError, match="atol=0.0001"):
        y.sum().backward()


def test_nan_created_by_the_inverse_is_reported_without_debug_mode() -> None:
    # A zero scale: the forward output is a finite 0, the inverse computes 0/0.
    scale = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    block = InvertibleModuleWrapper(Scale(scale))
    x = _input(5, 3)
    y = block(x)
    with pytest.raises(ReconstructionError, match=r"5 NaN/Inf value\(s\) of 15") as info:
        y.sum().backward()
    assert info.value.nonfinite == 5
    assert "Scale" in str(info.value)


def test_nan_in_debug_mode_is_reported_against_the_original() -> None:
    scale = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    block = InvertibleModuleWrapper(Scale(scale))
    with debug_reconstruction():
        y = block(_input(5, 3))
    with pytest.raises(ReconstructionError, match=r"5 NaN/Inf value\(s\) appeared") as info:
        y.sum().backward()
    assert info.value.nonfinite == 5


def test_finite_check_can_be_turned_off_and_then_nan_propagates() -> None:
    scale = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    block = InvertibleModuleWrapper(Scale(scale))
    set_finite_check(False)
    x = _input(5, 3)
    block(x).sum().backward()
    assert torch.isnan(x).any()


def test_nan_already_in_the_input_is_not_blamed_on_the_inverse() -> None:
    # Plain autograd propagates a NaN input; so does the wrapper, without error.
    block = InvertibleModuleWrapper(AdditiveCoupling(nn.Linear(3, 3).double()))
    x = _input(2, 6)
    with torch.no_grad():
        x[0, 0] = float("nan")
    block(x).sum().backward()
    assert torch.isnan(x[0, 0])
    with debug_reconstruction():
        x = _input(2, 6)
        with torch.no_grad():
            x[0, 0] = float("nan")
        y = block(x)
    y.sum().backward()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"atol": -1.0}, ValueError, "atol must be a non-negative number"),
        ({"rtol": "1e-3"}, ValueError, "rtol must be a non-negative number"),
        ({"atol": float("nan")}, ValueError, "atol must be a non-negative number"),
        ({"model": "net"}, TypeError, "model must be the nn.Module"),
    ],
)
def test_bad_debug_arguments_are_rejected(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match), debug_reconstruction(**kwargs):
        pass
    with pytest.raises(error, match=match):
        set_debug_reconstruction(True, **kwargs)


def test_bad_switch_values_are_rejected() -> None:
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_finite_check(1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_debug_reconstruction("on")  # type: ignore[arg-type]


# -- the report: how far each wrapper's reconstruction drifted ------------------------


def _scales(*offsets: float) -> nn.Sequential:
    return nn.Sequential(
        *(
            InvertibleModuleWrapper(Scale(torch.full((6,), 2.0, dtype=torch.float64), offset))
            for offset in offsets
        )
    )


def test_report_records_every_wrapper_within_the_tolerance() -> None:
    net = _scales(0.0, 1e-3, 2e-3)  # the inverses' errors: 0, 1e-3, 2e-3
    x = _input(4, 6)
    with torch.no_grad():
        x.copy_(torch.linspace(-4.0, 2.0, 24, dtype=torch.float64).reshape(4, 6))
    with debug_reconstruction(atol=1e-2, rtol=0.0, model=net) as report:
        y = net(x)
    assert isinstance(report, ReconstructionReport) and len(report) == 0
    y.sum().backward()  # within the tolerance: nothing raised, all recorded
    worst = report.by_module()
    assert list(worst) == [f"InvertibleModuleWrapper(Scale) '{i}'" for i in (2, 1, 0)]
    r2, r1, r0 = worst.values()
    # Block 2 rebuilds its input 2e-3 off; block 1 adds 1e-3 to half of that; block
    # 0 halves it again. Relative to the inputs' largest values, 16, 8 and 4.
    assert r2.max_abs_error == pytest.approx(2e-3, rel=1e-9)
    assert r1.max_abs_error == pytest.approx(2e-3, rel=1e-9)
    assert r0.max_abs_error == pytest.approx(1e-3, rel=1e-9)
    assert r2.rel_error == pytest.approx(2e-3 / 16, rel=1e-9)
    assert r1.rel_error == pytest.approx(2e-3 / 8, rel=1e-9)
    assert r0.rel_error == pytest.approx(1e-3 / 4, rel=1e-9)
    assert all(r.within_tolerance and r.nonfinite == 0 and r.input_index == 0 for r in report)
    assert all(r.dtype == torch.float64 for r in report)
    assert report.max_abs_error == pytest.approx(2e-3, rel=1e-9)
    assert report.worst() is r1
    assert "| InvertibleModuleWrapper(Scale) '2' | 0 | 0.002 |" in report.table()
    report.clear()
    assert len(report) == 0 and report.worst() is None and report.max_rel_error == 0.0


def test_report_keeps_the_failing_record_before_raising() -> None:
    net = _scales(0.0, 0.1)
    with debug_reconstruction(model=net) as report:
        y = net(_input(4, 6))
    with pytest.raises(ReconstructionError):
        y.sum().backward()
    (record,) = report.records
    assert record.module_name.endswith("'1'") and not record.within_tolerance
    assert record.max_abs_error == pytest.approx(0.1, rel=1e-9)


def test_raise_errors_false_records_every_wrapper_and_raises_nothing() -> None:
    net = _scales(0.1, 0.0, 0.1)
    with debug_reconstruction(model=net, raise_errors=False) as report:
        y = net(_input(4, 6))
    y.sum().backward()
    failed = {name: not r.within_tolerance for name, r in report.by_module().items()}
    assert failed == {
        "InvertibleModuleWrapper(Scale) '2'": True,
        "InvertibleModuleWrapper(Scale) '1'": True,  # rebuilt from block 2's wrong input
        "InvertibleModuleWrapper(Scale) '0'": True,
    }
    with (
        pytest.raises(TypeError, match="raise_errors must be a bool"),
        debug_reconstruction(raise_errors=1),  # type: ignore[arg-type]
    ):
        pass


def test_global_switch_returns_its_report() -> None:
    net = _scales(0.0, 1e-3)
    report = set_debug_reconstruction(True, atol=1e-2, model=net)
    assert report is not None
    net(_input(4, 6)).sum().backward()
    net(_input(4, 6)).sum().backward()
    assert len(report) == 4 and len(report.by_module()) == 2  # two passes, two wrappers
    assert set_debug_reconstruction(False) is None


def test_report_names_flow_blocks_and_shows_drift_growing_down_the_flow() -> None:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(6):  # additive couplings adding large values: float32 loses digits
        f = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
        with torch.no_grad():
            f[2].weight.mul_(5.0)
            f[2].bias.mul_(5.0)
        blocks += [ActNorm(8), AdditiveCoupling(f), Permutation(8)]
    flow = Flow(blocks, (8,))
    x = torch.randn(64, 8)
    with torch.no_grad():
        flow(x)
    with debug_reconstruction(model=flow, raise_errors=False) as report:
        loss = -flow.log_prob(x).mean()
    loss.backward()
    names = list(report.by_module())
    # 18 blocks: the groups start at 0 (kept, the caller's input), 1, 5, 9, 13, 17.
    assert names[0] == "InvertibleModuleWrapper(_FusedLogDetChain) 'blocks.17'"
    assert names[1] == "InvertibleModuleWrapper(_FusedLogDetChain) 'blocks.13' to 'blocks.16'"
    assert names[-1] == "InvertibleModuleWrapper(_FusedLogDetChain) 'blocks.1' to 'blocks.4'"
    errors = [r.rel_error for r in report.by_module().values()]
    # Each input is rebuilt from the rebuilt one above it: the error compounds.
    assert errors[0] == 0.0  # block 17, a permutation: exact
    assert errors[-1] > 20 * errors[1] > 0
    assert not all(r.within_tolerance for r in report)
    with debug_reconstruction():  # raising, and without a model: the blocks' indices
        loss = -flow.log_prob(x).mean()
    with pytest.raises(ReconstructionError, match=r"\(flow blocks 1 to 4\).*keep_every"):
        loss.backward()


def test_debug_mode_names_a_tensor_a_module_stores_on_itself_in_forward() -> None:
    """A side output (an auxiliary loss kept on the module) has no graph under the
    wrapper: debug mode names it, so that a missing gradient can be found."""
    import invertnet

    class KeepsAux(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.linear(x)
            self.aux = y.square().mean()
            return y

    block = invertnet.InvertibleModuleWrapper(invertnet.AdditiveCoupling(KeepsAux()))
    x = torch.randn(3, 4, requires_grad=True) * 1
    with invertnet.debug_reconstruction(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = block(x)
    messages = sorted(str(w.message) for w in seen)
    assert len(messages) == 2  # Gm is a copy of Fm
    assert "'Fm.aux'" in messages[0] and "'Gm.aux'" in messages[1]
    assert all("no gradient" in m and "disable=True" in m for m in messages)
    y.sum().backward()
    # Outside debug mode nothing is looked at.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(torch.randn(3, 4, requires_grad=True) * 1).sum().backward()


def test_debug_mode_finds_a_tensor_the_module_uses_without_holding_it() -> None:
    """A weight reached through a plain list gets no gradient from the wrapper, which
    passes autograd only the wrapped modules' parameters: debug mode names it."""
    import invertnet
    from tests._core_helpers import UsesShared

    shared = torch.nn.Linear(6, 6)
    block = invertnet.InvertibleModuleWrapper(invertnet.AdditiveCoupling(UsesShared(shared)))
    x = torch.randn(3, 12, requires_grad=True) * 1
    with invertnet.debug_reconstruction():
        y = block(x)
    # Four: Gm is a copy of Fm, with a copy of the shared Linear of its own.
    with pytest.raises(RuntimeError, match=r"uses 4 tensor\(s\) that require grad.*Register"):
        y.sum().backward()
    # Registered on the module, the same weight is found and differentiated.
    fm = UsesShared(shared)
    fm.registered = shared
    block = invertnet.InvertibleModuleWrapper(invertnet.AdditiveCoupling(fm))
    with invertnet.debug_reconstruction():
        block(torch.randn(3, 12, requires_grad=True) * 1).sum().backward()
    assert shared.weight.grad is not None
