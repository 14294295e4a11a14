"""The MultiheadAttention rule equals the torch.func fallback (itself checked against vmap(grad)) in every mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from gradcoh.logger.grads import Composite, MatrixView
from gradcoh.logger.layers import functional_rule, mha_rule
from gradcoh.logger.sketch import Projection
from oracle import assert_stats, open_logged, per_example_grads_vmap
from tolerance import PRODUCT, assert_close, chain_length
from torch import nn

N, L, S, E, H = 3, 5, 4, 8, 2


def _masks(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "none":
        return {}
    if kind == "key_padding_bool":
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -1] = kpm[2, -2:] = True
        return {"key_padding_mask": kpm}
    if kind == "attn_mask_float":
        return {"attn_mask": torch.randn(L, S, generator=gen)}
    if kind == "causal":
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L)[:, :S], "is_causal": True}
    raise ValueError(kind)


# (A 3-D [batch·heads, L, S] mask is handled by the rule but not by the per-example fallback used as reference.)
@pytest.mark.parametrize("mask", ["none", "key_padding_bool", "attn_mask_float", "causal"])
@pytest.mark.parametrize("self_attention", [True, False])
def test_mha_rule_equals_fallback(mask, self_attention):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    if self_attention:
        q = k = v = torch.randn(N, S, E)
    else:
        q, k, v = torch.randn(N, L, E), torch.randn(N, S, E), torch.randn(N, S, E)
    kwargs = {"need_weights": False, **_masks(mask)}
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = kwargs["attn_mask"][: q.shape[1]]
    out, _ = mha(q, k, v, **kwargs)
    go = (torch.randn_like(out),)
    args = (q.detach(), k.detach(), v.detach())
    fast = mha_rule(mha, args, kwargs, go)
    ref = functional_rule(mha, args, kwargs, go)
    assert isinstance(fast, Composite)
    # two float32 routes to the same per-example gradients: each sums L·S token pairs of E-dim products through
    # the attention's Q, K, V and output projections (fan-in E each); both err, hence twice the length
    n = 2 * (L * S * E + 4 * E)
    sq = ref.sq_norms()
    assert_close(fast.sq_norms(), sq, n=n, kappa=PRODUCT, err_msg="sq_norms")
    weights = torch.tensor([[1.0], [0.0], [1.0]])
    norms = np.sqrt(np.asarray(sq, dtype=np.float64))
    assert_close(fast.group_sums(weights), ref.group_sums(weights), n=n, kappa=PRODUCT,
                 scale=(norms * weights.numpy()[:, 0]).sum() ** 2, err_msg="group_sums")
    view = MatrixView.of([tuple(p.shape) for p in mha.parameters()])
    proj = Projection.create(0, "attn", (view.rows, view.cols), 64, "tensorsketch")
    want = np.asarray(ref.sketch(proj), dtype=np.float64)  # [N, k]: each coordinate as large as the example's sketch
    assert_close(fast.sketch(proj), want, n=n + view.rows * view.cols, scale=np.linalg.norm(want, axis=-1,
                 keepdims=True), err_msg="sketch")


def test_mha_direct_call_with_weights_unused_matches_oracle(tmp_path):
    torch.manual_seed(2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)
            self.head = nn.Linear(E, 2)

        def forward(self, x):
            out, _ = self.attn(x, x, x)  # need_weights=True by default; weights unused
            return self.head(out.mean(1))

    model = Model()
    x, y = torch.randn(4, L, E), torch.randint(0, 2, (4,))
    with GradientLogger(model, tmp_path / "a.zarr", sketch_dim=16) as glog:
        with glog.record(0):
            F.cross_entropy(model(x), y).backward()
    ds = open_logged(tmp_path / "a.zarr", "batch")
    assert list(ds.layer.values) == ["attn", "head"]
    grads = per_example_grads_vmap(model, lambda o, t: F.cross_entropy(o, t.long(), reduction="none"), x, y)
    assert_stats(ds, 0, grads, n=chain_length(model, positions=L))
