"""Train a small RevNet with DistributedDataParallel; launch with torchrun.

On GPUs (one process per GPU, NCCL)::

    torchrun --nproc_per_node=4 examples/ddp_revnet.py

On the CPU (gloo), for example to try it out on a laptop::

    torchrun --nproc_per_node=2 examples/ddp_revnet.py --backend gloo

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for
each process; ``init_process_group`` reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from invertnet import AdditiveCoupling, InvertibleModuleWrapper, MomentumNet


def branch(channels: int) -> nn.Module:
    # GroupNorm rather than BatchNorm: each rank would normalise its own slice.
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.GroupNorm(1, channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


def model(channels: int = 32, depth: int = 6) -> nn.Module:
    blocks = [
        InvertibleModuleWrapper(AdditiveCoupling(branch(channels // 2))) for _ in range(depth)
    ]
    momentum = MomentumNet([branch(channels) for _ in range(depth)], gamma=0.9, use_backprop=False)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        *blocks,
        momentum,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="per process")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts them)
    net = model().to(device)
    ddp = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(args.accumulate):
            x = torch.randn(args.batch, 3, 32, 32, generator=generator).to(device)
            y = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
            # Accumulate locally, all-reduce on the last micro-batch; no_sync must
            # cover the forward pass as well as the backward.
            last = micro == args.accumulate - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                loss = nn.functional.cross_entropy(ddp(x), y) / args.accumulate
                loss.backward()
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item() * args.accumulate:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
