"""Modules and parameter uses that used to be refused or crash, now exact per example (issue 24).

``nn.EmbeddingBag`` in every mode; parameters with a dimension equal to the batch size (ConvTranspose, LoRA
adapters, masked weights: such a dimension is not a batch axis); a derived tensor written in place through a view
(Swin-V2 zeroes the key part of a cloned qkv bias) and in-place activations on derived tensors (its ``cpb_mlp``). Each
against a float64 oracle through the same batch forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_layers_exact, log_same_forward
from torch import nn

N, L, V = 3, 5, 20


class Bag(nn.Module):
    def __init__(self, flat=False, weighted=False, **options):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, 6, **options)
        self.head = nn.Linear(6, 4)
        self.flat, self.weighted = flat, weighted

    def forward(self, ids):
        if self.flat:  # 1-D input with one offset per example (bags of lengths 3, 5, 2)
            offsets = torch.tensor([0, 3, 8]) + 0 * ids[:, 0]
            return self.head(self.bag(torch.cat([ids[0, :3], ids[1], ids[2, :2]]), offsets))
        weights = torch.sigmoid(ids.to(self.head.weight.dtype)) if self.weighted else None
        return self.head(self.bag(ids, per_sample_weights=weights))


@pytest.mark.parametrize("options", [
    {"mode": "mean"}, {"mode": "sum", "padding_idx": 0}, {"mode": "max"}, {"mode": "sum", "weighted": True},
    {"mode": "mean", "scale_grad_by_freq": True}, {"mode": "mean", "flat": True}, {"mode": "sum", "flat": True},
])
def test_embedding_bag_is_exact(options, tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N, L))
    ids[0, -2:] = 0
    y = torch.randint(0, 4, (N,))
    ds, grads = log_same_forward(Bag(**options), lambda m: F.cross_entropy(m(ids), y, reduction="none"),
                                 tmp_path / "s.zarr")
    assert ds.attrs["gradcoh_layers"][0]["rule"] == "embedding_bag_rule"
    assert_layers_exact(ds, grads)


def test_embedding_bag_with_unknown_bags_is_refused(tmp_path):
    """A 1-D input whose offsets do not come from the batch: which bag is which example is unknown."""
    model = Bag()
    ids = torch.randint(0, V, (N, L))

    def losses(m):
        flat = ids.reshape(-1)
        return m.head(m.bag(flat, torch.arange(N) * L)).sum(1) + 0 * ids[:, 0]

    with pytest.raises(ValueError, match=r"EmbeddingBag.*which bags belong to which example"):
        log_same_forward(model, losses, tmp_path / "s.zarr")


class SizedLikeTheBatch(nn.Module):
    """Every parameter has a dimension of size N, the batch size."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, N, 3)  # weight [2, N, 3, 3]
        self.base = nn.Linear(N * 36, N, bias=False)
        self.lora_a = nn.Parameter(torch.randn(2, N * 36) * 0.1)  # LoRA: W + B A, B [N, 2]
        self.lora_b = nn.Parameter(torch.randn(N, 2) * 0.1)
        self.mask = nn.Parameter(torch.rand(N, N))  # a learned soft mask on a masked weight
        self.masked = nn.Parameter(torch.randn(N, N))

    def forward(self, x):
        h = self.up(x).flatten(1)
        h = F.linear(h, self.base.weight + self.lora_b @ self.lora_a)
        return F.linear(torch.tanh(h), self.masked * torch.sigmoid(self.mask))


def test_parameter_dimensions_equal_to_the_batch_size(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(N, 2, 4, 4)
    ds, grads = log_same_forward(SizedLikeTheBatch(), lambda m: m(x.to(m.lora_a.dtype)).pow(2).sum(1),
                                 tmp_path / "s.zarr")
    assert_layers_exact(ds, grads)


class InPlaceDerived(nn.Module):
    """Swin-V2's patterns: a cloned bias zeroed in place through a slice, and ReLU(inplace=True) on a parameter-only
    branch (its continuous position bias MLP) added to the activations."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.cpb = nn.Sequential(nn.Linear(2, 8), nn.ReLU(inplace=True), nn.Linear(8, 4, bias=False))
        self.register_buffer("coords", torch.randn(5, 2))

    def forward(self, x):
        bias = self.qkv.bias.clone()
        bias[4:8].zero_()
        h = F.linear(x, self.qkv.weight, bias)
        return h[..., :4] * h[..., 8:] + h[..., 4:8] + 16 * torch.sigmoid(self.cpb(self.coords))


def test_in_place_writes_on_parameter_derived_tensors(tmp_path):
    torch.manual_seed(2)
    x = torch.randn(N, 5, 4)
    ds, grads = log_same_forward(InPlaceDerived(), lambda m: m(x.to(m.coords.dtype)).pow(2).sum((1, 2)),
                                 tmp_path / "s.zarr")
    assert_layers_exact(ds, grads)


def test_a_crashing_rule_is_a_clear_refusal(tmp_path):
    """An internal failure inside a rule reaches the user as an error naming the layer, the module, the rule and the
    ways around it (not a bare IndexError from inside gradcoh)."""
    from gradcoh.logger import GradientLogger
    from gradcoh.logger.layers import default_rules

    def broken_rule(module, args, kwargs, grad_outputs):
        return [][0]

    rules = default_rules()
    rules.register(nn.Linear, broken_rule)
    model = nn.Sequential(nn.Linear(3, 2))
    with GradientLogger(model, tmp_path / "s.zarr", rules=rules, handle_sigterm=False) as glog:
        with pytest.raises(RuntimeError, match=r"layer '0': the rule broken_rule of module '0' \(Linear\) failed.*"
                                               r"IndexError.*layers=\.\.\..*LayerRules.register"):
            with glog.record(0):
                model(torch.randn(N, 3)).sum().backward()


def test_an_op_the_tracker_cannot_follow_fails_closed(tmp_path, monkeypatch):
    """A crash while following an op in the forward leaves its outputs' layout unknown: the training step runs, and
    the layer that needs the layout is refused naming the op."""
    from gradcoh.logger import GradientLogger, layout

    original = layout.propagate

    def crash_on_tanh(name, *args, **kwargs):
        if name == "tanh":
            raise IndexError("boom")
        return original(name, *args, **kwargs)

    monkeypatch.setattr("gradcoh.logger.uses.propagate", crash_on_tanh)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with GradientLogger(model, tmp_path / "s.zarr", handle_sigterm=False) as glog:
        with pytest.raises(ValueError, match=r"module '2' \(Linear\).*after the op 'tanh \(IndexError\)'"):
            with glog.record(0):
                model(torch.randn(N, 3)).sum().backward()


class DroppedTable(nn.Module):
    """A parameter-only table normalised and dropped out in train mode, then combined with the activations (DeBERTa's
    relative position embeddings): per-example gradients through the batch forward's own mask."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(5, 4)
        self.norm = nn.LayerNorm(4)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        rel = self.drop(self.norm(self.table.weight))  # [5, 4], no batch
        return self.head(torch.tanh(x @ rel.T @ rel))


def test_dropout_of_a_parameter_derived_tensor_uses_the_forward_mask(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(N, 6, 4)
    model = DroppedTable().train()
    ds, grads = log_same_forward(model, lambda m: m(x.to(m.head.weight.dtype)).pow(2).sum((1, 2)),
                                 tmp_path / "s.zarr")
    assert_layers_exact(ds, grads)
