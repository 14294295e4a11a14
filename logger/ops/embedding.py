"""Lookups ``y = W[idx]`` (``nn.Embedding``, ``F.embedding``): ``G_n = Σ_t e_{idx_t} δ_tᵀ``, rows addressed by index.

Kept factored with ``rows_index`` (the one-hot row factor is never formed): a ``V × d`` block per example is never
materialised unless a reduction needs it.
"""

from __future__ import annotations

import torch

from ..grads import Factored


def embedding(rows: torch.Tensor, delta: torch.Tensor, num_embeddings: int, *, padding_idx: int | None = None,
              scale_grad_by_freq: bool = False, looked_up: torch.Tensor | None = None) -> Factored:
    """Per-example gradients of a lookup in the view ``(num_embeddings, d)``.

    Args:
        rows: ``[n, T]`` the row each position of each example reads.
        delta: The output gradient, ``[n, T, d]`` (or any shape with ``n·T·d`` entries in that order).
        num_embeddings: Rows of the table.
        padding_idx: A row that receives no gradient (negative: counted from the end, as ``F.embedding``).
        scale_grad_by_freq: The batch gradient divides each row's gradient by the row's count in the lookup. The
            count couples the examples, so, as for train-mode BatchNorm, each example's gradient is its
            *contribution* to the batch gradient (the contributions sum exactly to ``.grad``).
        looked_up: The indices the op itself looked up, whose counts ``scale_grad_by_freq`` divides by (default:
            ``rows``; a lookup of constant indices broadcast to the batch counts them once).
    """
    v = delta.reshape(rows.shape[0], rows.shape[1], -1)
    if padding_idx is not None:
        pad = padding_idx + num_embeddings if padding_idx < 0 else padding_idx
        v = v * (rows != pad).unsqueeze(-1).to(v.dtype)
    if scale_grad_by_freq:
        idx = rows if looked_up is None else looked_up
        counts = torch.bincount(idx.reshape(-1), minlength=num_embeddings).to(v.dtype)
        v = v / counts[rows].unsqueeze(-1)
    return Factored(None, v, rows_index=rows, n_rows=num_embeddings)
