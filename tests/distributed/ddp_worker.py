"""One rank of a 2-process DDP run logging with gradcoh (launched by test_ddp.py; also a torchrun example).

Usage: python ddp_worker.py STORE STEPS [single]   (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for DDP;
DDP_WORKER_LR, default 0.1, the SGD learning rate)
With ``single`` the script runs one process that logs the concatenated global batch (the reference).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from torch import nn

GLOBAL_BATCH = 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 1, 6, 6, generator=gen)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen)
    return x, y, torch.arange(GLOBAL_BATCH) % 2


def main() -> None:
    path, steps = sys.argv[1], int(sys.argv[2])
    single = len(sys.argv) > 3 and sys.argv[3] == "single"
    slow = len(sys.argv) > 3 and sys.argv[3] == "slow"
    if single:
        rank, world = 0, 1
        model = make_model()
    else:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=float(os.environ.get("DDP_WORKER_LR", "0.1")))
    share = GLOBAL_BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    gen = torch.Generator().manual_seed(7)
    px, py = torch.randn(10, 1, 6, 6, generator=gen), torch.randint(0, 4, (10,), generator=gen)
    reference = (px[:6], py[:6], lambda o, t: F.cross_entropy(o, t, reduction="none"))
    with GradientLogger(model, path, groups=("a", "b"), sketch_dim=16, flush_secs=0.2, alignment=True,
                        reference=reference) as glog:
        for step in range(steps):
            x, y, g = batch(step)
            x, y, g = x[rows], y[rows], g[rows]
            with glog.record(step, index=torch.arange(GLOBAL_BATCH)[rows], labels=y, group=g):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            glog.probe(step, px, py, lambda o, t: F.cross_entropy(o, t, reduction="none"), every=2,
                       group=torch.arange(10) % 2, batch_size=3)
            if slow:
                glog.flush()
                time.sleep(0.3)
    if not single:
        dist.destroy_process_group()
    if os.environ.get("GRADCOH_PRINT_WEIGHTS"):
        print(float(sum(p.double().sum() for p in model.parameters())))


if __name__ == "__main__":
    main()
