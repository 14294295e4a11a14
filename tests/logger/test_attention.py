"""nn.MultiheadAttention observed op by op (logger/attention.py).

The port of ``F.multi_head_attention_forward`` equals the native function (values, and the random numbers it draws,
so a seeded forward is the same with and without the logger) in every mode; logged models with attention are exact
against a float64 oracle through the same batch forward, with ``batch_first`` either way and dropout in train mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from gradcoh.logger.attention import multi_head_attention_forward
from oracle import assert_layers_exact, assert_stats, log_same_forward, open_logged, per_example_grads_vmap
from tolerance import chain_length
from torch import nn

N, L, S, E, H = 3, 5, 4, 8, 2


def _masks(kind, S=S):  # S: the source length
    gen = torch.Generator().manual_seed(0)
    if kind == "key_padding_bool":
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -1] = kpm[2, -2:] = True
        return {"key_padding_mask": kpm}
    if kind == "key_padding_float":
        return {"key_padding_mask": torch.randn(N, S, generator=gen)}
    if kind == "attn_mask_float":
        return {"attn_mask": torch.randn(L, S, generator=gen)}
    if kind == "attn_mask_3d":
        return {"attn_mask": torch.randn(N * H, L, S, generator=gen)}
    if kind == "causal":
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L)[:, :S], "is_causal": True}
    return {}


MODES = [
    ("self", "none", {}), ("self", "key_padding_bool", {}), ("cross", "attn_mask_float", {}),
    ("cross", "attn_mask_3d", {}), ("cross", "causal", {}), ("cross", "key_padding_float", {"add_bias_kv": True}),
    ("cross", "key_padding_bool", {"add_zero_attn": True}), ("kdim", "none", {"kdim": 5, "vdim": 3}),
    ("encdec", "key_padding_bool", {}), ("self", "causal", {"bias": False}),
]


def _inputs(kind):
    gen = torch.Generator().manual_seed(1)
    if kind == "self":
        x = torch.randn(L, N, E, generator=gen)
        return x, x, x
    q = torch.randn(L, N, E, generator=gen)
    if kind == "encdec":  # key is value
        kv = torch.randn(S, N, E, generator=gen)
        return q, kv, kv
    if kind == "kdim":
        return q, torch.randn(S, N, 5, generator=gen), torch.randn(S, N, 3, generator=gen)
    return q, torch.randn(S, N, E, generator=gen), torch.randn(S, N, E, generator=gen)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(("inputs", "mask", "options"), MODES)
def test_port_equals_native_function(inputs, mask, options, need_weights):
    """Same outputs and parameter gradients to the last bit (logging does not change training), the same random numbers
    drawn, and a dropout after the call draws the same mask too (the output has the native memory layout)."""
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(E, H, dropout=0.4, **options)
    q, k, v = _inputs(inputs)
    kwargs = {"need_weights": need_weights, **_masks(mask, k.shape[0])}
    results = []
    for fn in (F.multi_head_attention_forward, multi_head_attention_forward):
        original = F.multi_head_attention_forward
        F.multi_head_attention_forward = fn  # nn.MultiheadAttention.forward calls it through the module
        try:
            torch.manual_seed(3)
            mha.zero_grad()
            out, weights = mha(q, k, v, **kwargs)
            after = F.dropout(out, 0.5)
            (after * torch.linspace(-1, 1, after.numel()).view_as(after)).sum().backward()
            grads = [p.grad.clone() for p in mha.parameters()]
            results.append((out, weights, after, torch.rand(3), grads))
        finally:
            F.multi_head_attention_forward = original
    (out, w, after, state, grads), (out2, w2, after2, state2, grads2) = results
    assert torch.equal(out2, out) and torch.equal(after2, after) and torch.equal(state, state2)  # to the last bit
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))
    assert (w is None) == (w2 is None)
    assert w is None or torch.equal(w2, w)


class Model(nn.Module):
    """Embedding → attention (self or cross with a padding mask) → head; batch first outside."""

    def __init__(self, batch_first, need_weights, cross, **options):
        super().__init__()
        self.emb = nn.Embedding(20, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, **options)
        self.head = nn.Linear(E, 4)
        self.need_weights, self.cross = need_weights, cross

    def forward(self, ids):
        x = self.emb(ids)
        kv = self.emb(ids.flip(1)[:, :S]) if self.cross else x
        pad = ids[:, : kv.shape[1]] < 3
        if not self.attn.batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        out, weights = self.attn(x, kv, kv, key_padding_mask=pad, need_weights=self.need_weights)
        if not self.attn.batch_first:
            out = out.transpose(0, 1)
        extra = 0 if weights is None else weights.sum(-1, keepdim=True)
        return self.head(out) + extra


@pytest.mark.parametrize(("batch_first", "need_weights", "cross", "options"), [
    (False, False, False, {"dropout": 0.3}), (True, True, True, {"dropout": 0.3}),
    (False, True, True, {"add_bias_kv": True, "dropout": 0.2}), (True, False, False, {}),
])
def test_attention_in_train_mode_is_exact(batch_first, need_weights, cross, options, tmp_path):
    torch.manual_seed(4)
    model = Model(batch_first, need_weights, cross, **options).train()
    gen = torch.Generator().manual_seed(5)
    ids, tags = torch.randint(0, 20, (N, L), generator=gen), torch.randint(0, 4, (N, L), generator=gen)

    def losses(m):
        return F.cross_entropy(m(ids).transpose(1, 2), tags, reduction="none").mean(1)

    ds, grads = log_same_forward(model, losses, tmp_path / "s.zarr")
    assert {"attn", "attn.out_proj"} <= {layer["name"] for layer in ds.attrs["gradcoh_layers"]}
    assert_layers_exact(ds, grads, n=chain_length(model, positions=L))


def test_mha_direct_call_with_weights_unused_matches_oracle(tmp_path):
    torch.manual_seed(2)

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)
            self.head = nn.Linear(E, 2)

        def forward(self, x):
            out, _ = self.attn(x, x, x)  # need_weights=True by default; weights unused
            return self.head(out.mean(1))

    model = Direct()
    x, y = torch.randn(4, L, E), torch.randint(0, 2, (4,))
    with GradientLogger(model, tmp_path / "a.zarr", sketch_dim=16) as glog:
        with glog.record(0):
            F.cross_entropy(model(x), y).backward()
    ds = open_logged(tmp_path / "a.zarr", "batch")
    assert list(ds.layer.values) == ["attn", "attn.out_proj", "head"]
    grads = per_example_grads_vmap(model, lambda o, t: F.cross_entropy(o, t.long(), reduction="none"), x, y)
    assert_stats(ds, 0, grads, n=chain_length(model, positions=L))
