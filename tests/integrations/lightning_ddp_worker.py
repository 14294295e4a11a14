"""One rank of a 2-process (gloo, CPU) Lightning run with GradcohCallback, started torchrun-style by the tests.

Usage: python lightning_ddp_worker.py STORE   (env as torchrun sets it: RANK, LOCAL_RANK, WORLD_SIZE, ...)
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/ (tolerance)
sys.path.insert(0, str(Path(__file__).parent))
from gradcoh.logger.integrations.lightning import GradcohCallback
from lightning_models import Indexed, Module


def main() -> None:
    data = Indexed()
    callback = GradcohCallback(sys.argv[1], every=1, index=lambda b: b[2], labels=lambda b: b[1])
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[callback], logger=False, accelerator="cpu",
                        devices=2, num_nodes=1, strategy="ddp", enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, use_distributed_sampler=False)
    sampler = DistributedSampler(data, num_replicas=2, rank=trainer.global_rank, shuffle=True, seed=2)
    trainer.fit(Module(), DataLoader(data, batch_size=3, sampler=sampler))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
