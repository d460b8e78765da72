"""One rank of the FSDP2 test (tests/test_fsdp2.py), and what it shares with the
single-process reference: the models, the data and the training steps.

Run as ``python -m tests._fsdp2_worker RANK WORLD_SIZE PORT OUT_FILE`` from the
repository root. For every entry of :data:`CONFIGS`, each rank shards a model with
``fully_shard`` (each unit, then the root), trains it on its share of every global
batch, and saves the full (unsharded) parameters it ends with and what it saw of the
memory saving: the bytes each wrapper's input holds after the forward pass and after
backward, the ``InputKeptWarning`` warnings raised, and for ``MomentumNet`` the bytes that
autograd saved at two depths.
"""

from __future__ import annotations

import datetime
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import invertnet
from invertnet import (
    AdditiveCoupling,
    AffineAdapterSigmoid,
    AffineCoupling,
    InputKeptWarning,
    InvertibleModuleWrapper,
    MomentumNet,
)

STEPS = 3
GLOBAL_BATCH = 8
WIDTH = 8
DEPTH = 4
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


def _f(out: int = WIDTH // 2) -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH // 2, out), nn.Tanh())


def _coupling_wrappers(depth: int) -> list[nn.Module]:
    return [
        InvertibleModuleWrapper(
            AdditiveCoupling(_f(), _f())
            if i % 2 == 0
            else AffineCoupling(_f(WIDTH), _f(WIDTH), adapter=AffineAdapterSigmoid),
            keep_input=False,
        )
        for i in range(depth)
    ]


def couplings(depth: int = DEPTH) -> nn.Module:
    """Wrapped additive and affine couplings, alternating, each freeing its input.

    No stem: the first wrapper gets the batch itself (which it hides and hands back).
    With one unit per wrapper, every later wrapper gets its input as FSDP2's
    pre-forward hook hands it over: a whole alias (a view) of the previous wrapper's
    output, which it frees with that output (docs/distributed.rst).
    """
    torch.manual_seed(0)
    blocks = _coupling_wrappers(depth)
    return nn.Sequential(nn.Sequential(*blocks), nn.Linear(WIDTH, 2)).double()


def couplings_after_stem(depth: int = DEPTH) -> nn.Module:
    """The couplings after a linear stem: the first wrapper's input is an activation,
    which reaches it as an alias made by FSDP2's hook also where the stack of
    wrappers is one unit (the hook of that unit makes it)."""
    torch.manual_seed(0)
    blocks = _coupling_wrappers(depth)
    stem = nn.Linear(WIDTH, WIDTH)
    return nn.Sequential(stem, nn.Sequential(*blocks), nn.Linear(WIDTH, 2)).double()


def reversible_sequential(depth: int = DEPTH) -> nn.Module:
    """``invertnet.ReversibleSequential`` of couplings, ``(F, G)`` pairs and wrappers,
    after a linear stem, so that the stack's input is an activation (as a RevNet
    stage's is) and, in a unit of its own, goes through FSDP2's pre-forward hook."""
    torch.manual_seed(0)
    kinds: list[Callable[[], Any]] = [
        lambda: AdditiveCoupling(_f(), _f()),
        lambda: (_f(), _f()),
        lambda: InvertibleModuleWrapper(AdditiveCoupling(_f(), _f()), keep_input=False),
        lambda: AffineCoupling(_f(WIDTH), _f(WIDTH), adapter=AffineAdapterSigmoid),
    ]
    blocks = [kinds[i % len(kinds)]() for i in range(depth)]
    stack = invertnet.ReversibleSequential(*blocks, split_dim=1, keep_input=False)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), stack, nn.Linear(WIDTH, 2)).double()


def momentumnet(depth: int = DEPTH) -> nn.Module:
    """A MomentumNet that reconstructs its activations in backward, after a stem."""
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(depth)]
    net = MomentumNet(functions, gamma=0.9, use_backprop=False)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), net, nn.Linear(WIDTH, 2)).double()


MODELS: dict[str, Callable[..., nn.Module]] = {
    "couplings": couplings,
    "couplings_after_stem": couplings_after_stem,
    "reversible_sequential": reversible_sequential,
    "momentumnet": momentumnet,
}

# How the model is sharded before the root gets its own fully_shard call:
# "per_block": every block its own unit (each wrapper; each function of a MomentumNet),
#   with FSDP2's default reshard_after_forward=True, so that a block's parameters are
#   all-gathered again for the recomputation in backward;
# "per_block_no_reshard": the same with reshard_after_forward=False;
# "per_stack": the stack of blocks (the model's body) as one unit.
SHARDINGS = ("per_block", "per_block_no_reshard", "per_stack")

# (model, sharding, optimizer): every model and sharding with SGD, and the FSDP2
# default (per_block) with Adam too, whose per-element state is sharded as well.
CONFIGS: list[tuple[str, str, str]] = [
    (name, sharding, "sgd") for name in MODELS for sharding in SHARDINGS
] + [(name, "per_block", "adam") for name in MODELS]


def body_of(model: nn.Module) -> nn.Module:
    """The stack of blocks: what the model holds besides its linear stem and head."""
    (body,) = (m for m in model if not isinstance(m, nn.Linear))
    return body


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The model's blocks: the wrappers of its body, or a MomentumNet's functions."""
    body = body_of(model)
    if isinstance(body, MomentumNet):
        return list(body.functions)
    return list(body)


def wrappers_of(model: nn.Module) -> list[InvertibleModuleWrapper]:
    return [m for m in model.modules() if isinstance(m, InvertibleModuleWrapper)]


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` global batches of inputs and targets."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, WIDTH, generator=g, dtype=torch.float64)
    t = torch.randn(STEPS, GLOBAL_BATCH, 2, generator=g, dtype=torch.float64)
    return x, t


def loss_fn(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # A mean: FSDP2 averages the ranks' gradients, so the mean over each share
    # averages to the mean over the whole batch. The input is cloned so that it owns
    # its storage and the first block may take it.
    return ((model(x.clone()) - t) ** 2).mean()


def train_single(name: str, optimizer: str) -> dict[str, torch.Tensor]:
    """The reference: one process, one step on the whole global batch each time."""
    model = MODELS[name]()
    opt = OPTIMIZERS[optimizer](model.parameters())
    x, t = data()
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x[step], t[step]).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _fully_shard() -> Callable[..., Any]:
    # Imported here, in the ranks only, so that importing this module (the test does)
    # needs no torch.distributed.
    try:  # torch >= 2.6
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4 and 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def shard(model: nn.Module, sharding: str, mesh: object) -> list[nn.Module]:
    """Apply ``fully_shard`` to the units of ``sharding``, then to the root, as users
    do; return the units (root last)."""
    fully_shard = _fully_shard()
    units = [body_of(model)] if sharding == "per_stack" else blocks_of(model)
    reshard = sharding != "per_block_no_reshard"
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh)
    return [*units, model]


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _train_fsdp(
    name: str, sharding: str, optimizer: str, rank: int, world: int, mesh: object
) -> dict[str, Any]:
    model = MODELS[name]()
    units = shard(model, sharding, mesh)
    opt = OPTIMIZERS[optimizer](model.parameters())
    x, t = data()
    # The inputs of every wrapper in the first step, as the wrapper gets them (after
    # FSDP2's own pre-forward hook, which is prepended).
    seen: list[torch.Tensor] = []
    hooks = [
        w.register_forward_pre_hook(
            lambda mod, args: seen.extend(a for a in args if isinstance(a, torch.Tensor))
        )
        for w in wrappers_of(model)
    ]
    after_forward: list[int] = []
    after_backward: list[int] = []
    full_size: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            xs, ts = x[step].chunk(world)[rank], t[step].chunk(world)[rank]
            opt.zero_grad()
            loss = loss_fn(model, xs, ts)
            if step == 0:
                for h in hooks:
                    h.remove()
                after_forward = [_nbytes(a) for a in seen]
            loss.backward()
            if step == 0:
                after_backward = [_nbytes(a) for a in seen]
                full_size = [a.numel() * a.element_size() for a in seen]
                seen.clear()
            opt.step()
    return {
        "params": {n: _full(p.detach()).clone() for n, p in model.named_parameters()},
        "all_dtensors": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "fsdp_units": sum(callable(getattr(u, "unshard", None)) for u in units),
        "input_bytes_after_forward": after_forward,
        "input_bytes_after_backward": after_backward,
        "input_bytes_full": full_size,
        "kept_warnings": [str(w.message) for w in caught if w.category is InputKeptWarning],
        "other_warnings": [str(w.message) for w in caught if w.category is not InputKeptWarning],
    }


def _saved_bytes(depth: int, sharding: str, rank: int, world: int, mesh: object) -> int:
    """Bytes autograd saves for backward in one training step of a sharded MomentumNet."""
    model = momentumnet(depth)
    shard(model, sharding, mesh)
    x, t = data()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(model, x[0].chunk(world)[rank], t[0].chunk(world)[rank])
    loss.backward()
    return total


def main(argv: list[str]) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, world, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    mesh = init_device_mesh("cpu", (world,))
    try:
        results = {
            config: _train_fsdp(*config, rank=rank, world=world, mesh=mesh) for config in CONFIGS
        }
        saved = {
            (sharding, depth): _saved_bytes(depth, sharding, rank, world, mesh)
            for sharding in SHARDINGS
            for depth in (DEPTH, 2 * DEPTH)
        }
        torch.save({"results": results, "momentumnet_saved_bytes": saved}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
