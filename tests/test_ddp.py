"""DistributedDataParallel: two CPU processes (gloo, loopback) train exactly as one.

Memory-saving layers have a history of breaking under DDP ("Expected to mark a
variable ready only once", memcnn issues 44 and 69). Here two ranks train a RevNet
stack and a MomentumNet (use_backprop=False) with ``find_unused_parameters=False``,
plainly and with gradient accumulation under ``no_sync()``, and must end with the
parameters of single-process training on the whole batch. float64 makes the
comparison tight; BatchNorm is left out because each rank normalises its own slice.
"""

from __future__ import annotations

import pytest
import torch

from tests._core_helpers import run_ranks
from tests._ddp_worker import MODELS, train_single

WORLD = 2

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend",
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Launch the two ranks once and return what each saved."""
    return run_ranks("tests._ddp_worker", tmp_path_factory.mktemp("ddp"), WORLD, "DDP")


@pytest.mark.parametrize("accumulate", [False, True], ids=["one_step", "no_sync_accumulation"])
@pytest.mark.parametrize("name", list(MODELS))
def test_ddp_matches_single_process_training(
    ranks: list[dict], name: str, accumulate: bool
) -> None:
    expected = train_single(name)
    for r, saved in enumerate(ranks):
        got = saved["results"][(name, accumulate)]["params"]
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            err = (g - e).abs().max().item()
            assert err <= 1e-6, f"rank {r}, parameter {i}: differs by {err:.3g}"
    # Training changed the parameters, so the comparison is not trivially true.
    assert any(not torch.equal(e, i) for e, i in zip(expected, MODELS[name]().parameters()))


@pytest.mark.parametrize("name", list(MODELS))
def test_no_sync_really_defers_the_gradient_all_reduce(ranks: list[dict], name: str) -> None:
    for saved in ranks:
        assert saved["results"][(name, True)]["synced_inside_no_sync"] == [False] * 3


def test_wrapper_still_frees_its_input_under_ddp(ranks: list[dict]) -> None:
    assert all(saved["first_block_frees_its_input"] for saved in ranks)
    for saved in ranks:
        assert not [w for w in saved["warnings"] if "kept in memory" in w], saved["warnings"]
