"""One rank of the DistributedDataParallel test (tests/test_ddp.py), and what it shares
with the single-process reference: the models, the data and the training steps.

Run as ``python -m tests._ddp_worker RANK WORLD_SIZE PORT OUT_FILE`` from the
repository root; each rank trains on its slice of every global batch and saves its
final parameters and a few observations to ``OUT_FILE``.
"""

from __future__ import annotations

import datetime
import sys
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from invertnet import AdditiveCoupling, InvertibleModuleWrapper, MomentumNet

STEPS = 3
GLOBAL_BATCH = 8
WIDTH = 8
LR = 0.1


def revnet() -> nn.Module:
    """A stack of RevNet blocks, each freeing its input (no BatchNorm: see the test)."""
    torch.manual_seed(0)
    blocks = [
        InvertibleModuleWrapper(
            AdditiveCoupling(nn.Sequential(nn.Linear(WIDTH // 2, WIDTH // 2), nn.Tanh())),
            keep_input=False,
        )
        for _ in range(4)
    ]
    return nn.Sequential(*blocks, nn.Linear(WIDTH, 2)).double()


def momentumnet() -> nn.Module:
    """A MomentumNet that reconstructs its activations in backward."""
    torch.manual_seed(0)
    functions = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(4)]
    net = MomentumNet(functions, gamma=0.9, use_backprop=False)
    return nn.Sequential(net, nn.Linear(WIDTH, 2)).double()


MODELS: dict[str, Callable[[], nn.Module]] = {"revnet": revnet, "momentumnet": momentumnet}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """``STEPS`` global batches of inputs and targets."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, WIDTH, generator=g, dtype=torch.float64)
    t = torch.randn(STEPS, GLOBAL_BATCH, 2, generator=g, dtype=torch.float64)
    return x, t


def loss_fn(model: nn.Module, x: torch.Tensor, t: torch.Tensor, share: float) -> torch.Tensor:
    # `share` scales a micro-batch's mean loss to its share of the full batch.
    # The input is cloned so that it owns its storage and the first block frees it.
    return ((model(x.clone()) - t) ** 2).mean() * share


def train_single(name: str) -> list[torch.Tensor]:
    """The reference: one process, one step on the whole global batch each time."""
    model = MODELS[name]()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, t = data()
    for step in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x[step], t[step], 1.0).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _train_ddp(name: str, rank: int, world: int, accumulate: bool) -> dict[str, object]:
    model = MODELS[name]()
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    x, t = data()
    synced_early: list[bool] = []
    for step in range(STEPS):
        xs, ts = x[step].chunk(world)[rank], t[step].chunk(world)[rank]
        opt.zero_grad()
        if accumulate:
            (x1, x2), (t1, t2) = xs.chunk(2), ts.chunk(2)
            with ddp.no_sync():
                loss_fn(ddp, x1, t1, 0.5).backward()
            synced_early.append(_grads_equal_across_ranks(model, world))
            loss_fn(ddp, x2, t2, 0.5).backward()
        else:
            loss_fn(ddp, xs, ts, 1.0).backward()
        opt.step()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "synced_inside_no_sync": synced_early,
    }


def _grads_equal_across_ranks(model: nn.Module, world: int) -> bool:
    """Whether every rank holds the same gradients now (they must not, inside no_sync)."""
    mine = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _first_block_frees_its_input() -> bool:
    """Under DDP, the wrapper still frees the input it is given."""
    ddp = DistributedDataParallel(revnet(), find_unused_parameters=False)
    x = data()[0][0].clone()
    y = ddp(x)
    freed = x.numel() == 0
    y.sum().backward()
    return freed and x.shape == (GLOBAL_BATCH, WIDTH)


def main(argv: list[str]) -> None:
    rank, world, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = {
                (name, accumulate): _train_ddp(name, rank, world, accumulate)
                for name in MODELS
                for accumulate in (False, True)
            }
            frees = _first_block_frees_its_input()
        torch.save(
            {
                "results": results,
                "first_block_frees_its_input": frees,
                "warnings": [str(w.message) for w in caught],
            },
            out,
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
