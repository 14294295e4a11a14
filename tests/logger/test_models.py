"""Real architectures under the logger: torchvision resnet18 (in-place residuals) and a Transformer encoder."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from oracle import assert_stats, open_logged, per_example_grads_vmap
from tolerance import chain_length
from torch import nn


def ce(out, y):
    return F.cross_entropy(out, y.long(), reduction="none")


def test_resnet18_eval_bn_matches_oracle(tmp_path):
    from torchvision.models import resnet18  # (≈ 1.5 s to import: here, not in every xdist worker's collection)

    torch.manual_seed(0)
    model = resnet18(num_classes=5).eval()  # eval-mode BatchNorm: exact per-example
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,))
    with GradientLogger(model, tmp_path / "r.zarr", sketch_dim=64) as glog:
        with glog.record(0):
            F.cross_entropy(model(x), y).backward()
    ds = open_logged(tmp_path / "r.zarr", "batch")
    assert ds.sizes["layer"] == len([m for m in model.modules() if list(m.parameters(recurse=False))])
    grads = per_example_grads_vmap(model, ce, x, y)
    assert_stats(ds, 0, grads, n=chain_length(model, positions=32 * 32))


def test_transformer_encoder_matches_oracle(tmp_path):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, tokens):
            return self.head(self.enc(self.emb(tokens)).mean(1))

    model = Model()
    x, y = torch.randint(0, 20, (4, 7)), torch.randint(0, 3, (4,))
    with GradientLogger(model, tmp_path / "t.zarr", groups=("a", "b")) as glog:
        with glog.record(0, group=torch.tensor([0, 1, 1, 0])):
            F.cross_entropy(model(x), y).backward()
    ds = open_logged(tmp_path / "t.zarr", "batch")
    grads = per_example_grads_vmap(model, ce, x, y)
    assert_stats(ds, 0, grads, n=chain_length(model, positions=7), group=np.array([0, 1, 1, 0]), n_groups=2)
