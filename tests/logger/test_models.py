"""Real architectures under the logger: torchvision resnet18 (in-place residuals) and a Transformer encoder."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from oracle import expected_stats, open_logged, per_example_grads_vmap
from torch import nn
from torchvision.models import resnet18


def ce(out, y):
    return F.cross_entropy(out, y.long(), reduction="none")


def test_resnet18_eval_bn_matches_oracle(tmp_path):
    torch.manual_seed(0)
    model = resnet18(num_classes=5).eval()  # eval-mode BatchNorm: exact per-example
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,))
    with GradientLogger(model, tmp_path / "r.zarr", sketch_dim=64) as glog:
        with glog.record(0):
            F.cross_entropy(model(x), y).backward()
    ds = open_logged(tmp_path / "r.zarr", "batch")
    assert ds.sizes["layer"] == len([m for m in model.modules() if list(m.parameters(recurse=False))])
    grads = per_example_grads_vmap(model, ce, x, y)
    sq, sums, _ = expected_stats(ds, grads)
    np.testing.assert_allclose(ds.sq_norm.values[0], sq, rtol=2e-4, atol=1e-9 * sq.max())
    np.testing.assert_allclose(ds.sum_sq_norm.values[0], sums, rtol=2e-4, atol=1e-9 * sums.max())


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
    sq, sums, gram = expected_stats(ds, grads, np.array([0, 1, 1, 0]), 2)
    np.testing.assert_allclose(ds.sq_norm.values[0], sq, rtol=2e-4, atol=1e-9 * sq.max())
    np.testing.assert_allclose(ds.sum_sq_norm.values[0], sums, rtol=2e-4, atol=1e-9 * sums.max())
    np.testing.assert_allclose(ds.group_gram.values[0], gram, rtol=2e-4, atol=1e-7 * np.abs(gram).max())
