"""``nn.MultiheadAttention`` observed op by op, like every other module.

``F.multi_head_attention_forward`` is one torch function: the use tracker would see its parameters enter a single
opaque op. While a step is recorded the tracker runs :func:`multi_head_attention_forward` instead: the native
function's own ops in the same order on the same shapes and memory layouts (its private in-projection helpers
included), so that every op inside is seen. The in- and out-projections become ``F.linear`` uses (factored per
example, nothing materialised), masks and biases follow their layouts, and the attention's dropout is the batch
forward's own (nothing is recomputed per example). The one change: where the native function merges positions and
examples into one axis (``[L·B, E]``) around the output projection, the port keeps ``[L, B, E]``, which the layout
can follow; ``F.linear`` computes the same values either way. Outputs, gradients and the random numbers drawn are
those of the native function to the last bit (tests/logger/test_attention.py), so logging does not change training.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _masks(key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None, need_weights: bool,
           is_causal: bool, dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """Canonical float masks and the causal hint, as the native function derives them."""
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        return None, None, True
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=dtype, check_other=False)
    return key_padding_mask, attn_mask, is_causal and key_padding_mask is None


def _append(k: torch.Tensor, v: torch.Tensor, extra_k: torch.Tensor, extra_v: torch.Tensor, dim: int,
            attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None) -> tuple:
    """One more key position (``bias_k``/``bias_v``, or zeros): the masks get a column of zeros."""
    masks = [None if m is None else F.pad(m, (0, 1)) for m in (attn_mask, key_padding_mask)]
    return torch.cat([k, extra_k], dim), torch.cat([v, extra_v], dim), *masks


def _heads(x: torch.Tensor, static: torch.Tensor | None, rows: int, head_dim: int) -> torch.Tensor:
    """``[S, B, E] → [B·h, S, hd]`` as the native function views it (or the given static keys/values)."""
    return x.view(x.shape[0], rows, head_dim).transpose(0, 1) if static is None else static


def _merged(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, bsz: int, h: int,
            src_len: int) -> torch.Tensor | None:
    """The key padding mask merged into the attention mask, ``[B·h or 1, L or 1, S]``."""
    if key_padding_mask is None:
        return attn_mask
    pad = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(bsz * h, 1, src_len)
    return pad if attn_mask is None else attn_mask + pad


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
            is_causal: bool, need_weights: bool, bsz: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[L, B, E]`` attention output (contiguous) and, with ``need_weights``, the weights ``[B·h, L, S]``."""
    rows, tgt_len, head_dim = q.shape
    h, src_len = rows // bsz, k.shape[1]
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if mask is not None:
            weights = torch.baddbmm(mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = torch.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        return torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, bsz, h * head_dim), weights
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.shape[0] == 1 and mask.dim() == 3 else mask.view(bsz, h, -1, src_len)
    q, k, v = (x.view(bsz, h, x.shape[1], head_dim) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)
    return out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, h * head_dim), None


def multi_head_attention_forward(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, embed_dim_to_check: int, num_heads: int,
        in_proj_weight: torch.Tensor | None, in_proj_bias: torch.Tensor | None, bias_k: torch.Tensor | None,
        bias_v: torch.Tensor | None, add_zero_attn: bool, dropout_p: float, out_proj_weight: torch.Tensor,
        out_proj_bias: torch.Tensor | None, training: bool = True, key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True, attn_mask: torch.Tensor | None = None, use_separate_proj_weight: bool = False,
        q_proj_weight: torch.Tensor | None = None, k_proj_weight: torch.Tensor | None = None,
        v_proj_weight: torch.Tensor | None = None, static_k: torch.Tensor | None = None,
        static_v: torch.Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.multi_head_attention_forward``: the same arguments, results and random numbers (see the module docstring).

    Raises:
        RuntimeError: As the native function, for inconsistent shapes and options.
    """
    batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    tgt_len, bsz, e = query.shape
    if e != embed_dim_to_check:
        raise RuntimeError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {e}")
    key_padding_mask, attn_mask, is_causal = _masks(key_padding_mask, attn_mask, need_weights, is_causal,
                                                    query.dtype)
    head_dim = e // num_heads
    if use_separate_proj_weight:
        biases = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, *biases)
    else:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k, v, attn_mask, key_padding_mask = _append(k, v, bias_k.repeat(1, bsz, 1), bias_v.repeat(1, bsz, 1), 0,
                                                    attn_mask, key_padding_mask)
    rows = bsz * num_heads
    q = q.view(tgt_len, rows, head_dim).transpose(0, 1)
    k, v = _heads(k, static_k, rows, head_dim), _heads(v, static_v, rows, head_dim)
    if add_zero_attn:
        zeros = torch.zeros((rows, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v, attn_mask, key_padding_mask = _append(k, v, zeros, zeros, 1, attn_mask, key_padding_mask)
    mask = _merged(attn_mask, key_padding_mask, bsz, num_heads, k.shape[1])
    out, weights = _attend(q, k, v, mask, dropout_p if training else 0.0, is_causal, need_weights, bsz)
    out = F.linear(out, out_proj_weight, out_proj_bias)  # [L, B, E], contiguous as the native result
    if weights is not None:
        weights = weights.view(bsz, num_heads, tgt_len, -1)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    if not batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights
