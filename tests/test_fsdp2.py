"""FSDP2 (``fully_shard``): two CPU processes (gloo, loopback) train exactly as one,
and the blocks still free their inputs.

Two ranks shard wrapped couplings (with and without a stem before them), an
``invertnet.ReversibleSequential`` and a ``MomentumNet(use_backprop=False)`` with
``fully_shard`` (each block, then the root, as users do; also with
``reshard_after_forward=False``, and with the whole stack as one unit), train them
for three steps on their halves of every global batch, and must end with the
parameters of single-process training on the whole batch, to 1e-6 in float64. With
the default ``reshard_after_forward=True`` a block's parameters are resharded after
its forward pass and all-gathered again by FSDP2's pre-backward hook, before the
wrapper's backward recomputes the block. FSDP2's pre-forward hook hands a unit's
inputs that require grad over as whole aliases (views) of the tensors passed to it:
every wrapper still frees its input.

``fully_shard`` on a module inside a wrapper is refused before anything runs
(in one process, a world of size 1).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from invertnet import AdditiveCoupling, InvertibleModuleWrapper
from tests._core_helpers import run_ranks
from tests._fsdp2_worker import (
    CONFIGS,
    DEPTH,
    MODELS,
    SHARDINGS,
    _fully_shard,
    train_single,
    wrappers_of,
)

WORLD = 2
TOLERANCE = 1e-6

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend",
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Launch the two ranks once and return what each saved."""
    return run_ranks("tests._fsdp2_worker", tmp_path_factory.mktemp("fsdp2"), WORLD, "FSDP2")


@pytest.mark.parametrize("config", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_fsdp2_matches_single_process_training(
    ranks: list[dict], config: tuple[str, str, str]
) -> None:
    name, sharding, optimizer = config
    expected = train_single(name, optimizer)
    initial = dict(MODELS[name]().named_parameters())
    for r, saved in enumerate(ranks):
        result = saved["results"][config]
        # FSDP2 really sharded it: every parameter a DTensor, every unit and the root
        # an FSDP module.
        assert result["all_dtensors"]
        units = 1 if sharding == "per_stack" else DEPTH
        assert result["fsdp_units"] == units + 1
        got = result["params"]
        assert got.keys() == expected.keys()
        for n, e in expected.items():
            err = (got[n] - e).abs().max().item()
            assert err <= TOLERANCE, f"rank {r}, {n}: differs by {err:.3g}"
        assert result["other_warnings"] == []
    # Training changed every parameter, so the comparison is not trivially true.
    assert all(not torch.equal(expected[n], p) for n, p in initial.items())


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("name", ["couplings", "couplings_after_stem", "reversible_sequential"])
def test_wrappers_still_free_their_inputs_under_fsdp2(
    ranks: list[dict], name: str, sharding: str
) -> None:
    n_inputs = 2 * DEPTH if name == "reversible_sequential" else DEPTH  # two streams
    assert len(wrappers_of(MODELS[name]())) == DEPTH
    for saved in ranks:
        result = saved["results"][(name, sharding, "sgd")]
        assert len(result["input_bytes_full"]) == n_inputs
        assert all(b > 0 for b in result["input_bytes_full"])
        # Every block's input is freed by the forward pass, and given back by backward.
        assert result["input_bytes_after_forward"] == [0] * n_inputs
        assert result["input_bytes_after_backward"] == result["input_bytes_full"]
        assert result["kept_warnings"] == []


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_momentumnet_saves_no_activations_per_layer_under_fsdp2(
    ranks: list[dict], sharding: str
) -> None:
    for saved in ranks:
        shallow = saved["momentumnet_saved_bytes"][(sharding, DEPTH)]
        deep = saved["momentumnet_saved_bytes"][(sharding, 2 * DEPTH)]
        assert shallow > 0
        assert deep == shallow, f"{DEPTH} layers saved {shallow} bytes, {2 * DEPTH}: {deep}"


@pytest.fixture
def world_of_one() -> Iterator[object]:
    """A process group of this process alone (gloo, an in-memory store) and its mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharded", ["Fm", "Gm.0", "module"])
def test_fully_shard_inside_a_wrapper_is_refused_before_anything_is_freed(
    world_of_one: object, sharded: str
) -> None:
    """``fully_shard`` on the wrapped module or one inside it would leave those
    parameters without gradient, silently: the call raises, naming the module and
    the fix, and the input is left as it was."""
    fully_shard = _fully_shard()
    torch.manual_seed(0)
    wrapper = InvertibleModuleWrapper(
        AdditiveCoupling(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh())),
        keep_input=False,
    ).double()
    target = wrapper.module if sharded == "module" else wrapper.module.get_submodule(sharded)
    fully_shard(target, mesh=world_of_one)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    h = x * 2  # an activation, which the wrapper would free
    before = h.detach().clone()
    name = "AdditiveCoupling" if sharded == "module" else "Linear"
    where = "the wrapped module" if sharded == "module" else f"the module {sharded!r}"
    with pytest.raises(RuntimeError, match=rf"{where} .*{name}\) is an FSDP2 unit") as error:
        wrapper(h)
    assert "fully_shard on the wrapper itself, or on a module that holds it" in str(error.value)
    assert h.untyped_storage().nbytes() == 3 * 8 * 8 and torch.equal(h.detach(), before)
