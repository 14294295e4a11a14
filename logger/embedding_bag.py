"""``nn.EmbeddingBag``: each example is one bag, ``y_b = reduce_{t ∈ bag b} c_t W[idx_t]``.

The per-example gradient is ``G_b = Σ_{t ∈ bag b} e_{idx_t} (c_t δ_b)ᵀ``, a lookup's factored form
(:func:`~gradcoh.logger.ops.embedding.embedding`, rows addressed by index) with one position per bag entry:
``c_t = 1`` (sum), ``1 / |bag|`` (mean, padding entries excluded), the per-sample weight (weighted sum); in max mode
each feature's gradient goes to the entry that held the maximum. Bags come from a 2-D input (one row per example)
or from a 1-D input with offsets whose rows are the examples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import layout
from .grads import Factored
from .ops.embedding import embedding

_NAMES = ("input", "offsets", "per_sample_weights")


def _bound(args: tuple, kwargs: dict) -> dict:
    return dict(zip(_NAMES, args, strict=False)) | kwargs


def rows_per_example(module: nn.EmbeddingBag, args: tuple, kwargs: dict, layout_of: Any, n: int) -> int:
    """Rows per example of a call: bags must be the examples (2-D input, or 1-D input with per-example offsets).

    Args:
        module: The module.
        args: The call's positional arguments.
        kwargs: Its keyword arguments.
        layout_of: The example layout of a tensor (None for constants).
        n: Examples in the micro-batch.

    Raises:
        ValueError: The bags are not known to be the examples.
    """
    bound = _bound(args, kwargs)
    x, offsets = bound["input"], bound.get("offsets")
    lay = layout_of(x) if x.dim() == 2 else None if offsets is None else layout_of(offsets)
    ok = isinstance(lay, tuple) and lay[0] == 0
    if x.dim() == 1:
        ok = ok and lay == (0, 1) and offsets.shape[0] == n and not module.include_last_offset
    if not ok:
        raise ValueError(
            f"EmbeddingBag: gradcoh cannot tell which bags belong to which example (input {tuple(x.shape)}); pass "
            "one bag per example as a 2-D input [batch, bag length] (or a 1-D input with one offset per example), or "
            "exclude the module with layers=..."
        )
    return lay[1]


def _padded(module: nn.EmbeddingBag, bound: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(rows [n, L], valid [n, L], per-sample weights [n, L] or None)`` of the bags, padded to the longest."""
    x, psw = bound["input"], bound.get("per_sample_weights")
    if x.dim() == 2:
        return x, torch.ones_like(x, dtype=torch.bool), psw
    offsets = bound["offsets"]
    ends = torch.cat([offsets[1:], offsets.new_tensor([x.shape[0]])])
    sizes = ends - offsets
    longest = int(sizes.max()) if sizes.numel() else 0
    pos = offsets.unsqueeze(1) + torch.arange(longest, device=x.device)  # [n, L]
    valid = pos < ends.unsqueeze(1)
    pos = pos.clamp(max=max(x.shape[0] - 1, 0))
    return x[pos], valid, None if psw is None else psw[pos]


def embedding_bag_rule(module: nn.EmbeddingBag, args: tuple, kwargs: dict, grad_outputs: tuple) -> Factored:
    """Per-example gradients of ``nn.EmbeddingBag`` (sum, mean, max; per-sample weights; padding_idx)."""
    bound = _bound(args, kwargs)
    rows, valid, psw = _padded(module, bound)
    go = grad_outputs[0]  # [n, d]
    if module.padding_idx is not None:
        valid = valid & (rows != module.padding_idx)
    coef = valid.to(go.dtype)
    if psw is not None:
        coef = coef * psw.to(go.dtype)
    if module.mode == "mean":
        coef = coef / valid.sum(1, keepdim=True).clamp(min=1).to(go.dtype)
    delta = coef.unsqueeze(2) * go.unsqueeze(1)  # [n, L, d]
    if module.mode == "max":  # each feature's gradient to the first entry holding the maximum
        values = module.weight.detach()[rows].masked_fill(~valid.unsqueeze(2), float("-inf"))
        first = values.argmax(1, keepdim=True)  # [n, 1, d]
        hit = torch.arange(rows.shape[1], device=rows.device).view(1, -1, 1) == first
        delta = go.unsqueeze(1) * (hit & valid.unsqueeze(2)).to(go.dtype)
    return embedding(rows, delta, module.num_embeddings, scale_grad_by_freq=module.scale_grad_by_freq,
                     looked_up=bound["input"])


embedding_bag_rule.rows_per_example = rows_per_example  # type: ignore[attr-defined]


def _layout(op: Any) -> layout.Layout | None:
    """``F.embedding_bag(input, weight, offsets, ...)``: one output row per bag."""
    inp, offsets = op.arg(0, "input"), op.arg(2, "offsets")
    lays = {id(t): lay for _, t, lay in op.data}
    lay = lays.get(id(inp))
    if torch.is_tensor(inp) and inp.dim() == 2 and isinstance(lay, tuple) and lay[0] == 0:
        return lay
    if torch.is_tensor(offsets) and lays.get(id(offsets)) == (0, 1) and offsets.shape[0] == op.out.shape[0]:
        return (0, 1)
    return None


layout.register(("embedding_bag",), _layout)
