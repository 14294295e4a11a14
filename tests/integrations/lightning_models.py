"""The Lightning dataset and module of tests/integrations/test_lightning.py and its DDP worker.

A module of its own so that ``import lightning`` happens only where Lightning runs, not when pytest collects
test_lightning.py in every xdist worker.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from gradcoh.logger.integrations.lightning import GradcohCallback
from torch import nn
from torch.utils.data import Dataset

__all__ = ["GradcohCallback", "Indexed", "Module", "N"]

N = 16


class Indexed(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 5, generator=g)
        self.y = torch.randint(0, 3, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class Module(L.LightningModule):
    def __init__(self, attached=False):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.attached = attached

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        per = F.cross_entropy(self.net(x), y, reduction="none")
        # per-example losses: stored by the callback; attached to the graph, they are verified too
        return {"loss": per.mean(), "losses": per if self.attached else per.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)
