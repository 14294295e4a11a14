"""``nn.MultiheadAttention`` observed op by op, like every other module.

``F.multi_head_attention_forward`` is one torch function: the use tracker would see its parameters enter a single
opaque op. While a step is recorded the tracker runs :func:`multi_head_attention_forward` instead, the same
computation written with the batch first, so that every op inside is seen: the in- and out-projections are
``F.linear`` uses (factored per example, nothing materialised), masks and biases follow their layouts, and the
attention's own dropout is the one of the batch forward (nothing is recomputed per example). The ops that draw
random numbers, ``F.scaled_dot_product_attention`` and ``F.dropout``, are called on tensors of the shapes the
native function uses, so a seeded forward draws the same masks with and without the logger.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _in_projection(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, same: tuple[bool, bool], e: int,
                   w: torch.Tensor, b: torch.Tensor | None) -> list[torch.Tensor]:
    """Packed ``in_proj`` on ``[S, B, E]`` inputs: one ``F.linear`` for self-attention, two for encoder-decoder.

    Each projection is returned ``[S, B, E]`` and contiguous, as the native function makes it (the memory order of
    the attention's inputs decides the order in which its dropout mask is drawn).
    """
    q_is_k, k_is_v = same
    if k_is_v and q_is_k:
        return _unpack(F.linear(query, w, b), 3, e)
    if k_is_v:
        w_q, w_kv = w.split([e, 2 * e])
        b_q, b_kv = (None, None) if b is None else b.split([e, 2 * e])
        return [F.linear(query, w_q, b_q), *_unpack(F.linear(key, w_kv, b_kv), 2, e)]
    ws = w.chunk(3)
    bs = (None,) * 3 if b is None else b.chunk(3)
    return [F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs, strict=True)]


def _unpack(proj: torch.Tensor, k: int, e: int) -> list[torch.Tensor]:
    """``[S, B, k·E]`` → k contiguous ``[S, B, E]`` (through the batch-first view, whose layout is followed)."""
    packed = proj.transpose(0, 1).unflatten(-1, (k, e)).permute(2, 1, 0, 3).contiguous()  # [k, S, B, E]
    return list(packed.unbind(0))


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


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """``[S, B, E] → [B, h, S, E/h]``, a view with the native function's strides."""
    return x.transpose(0, 1).unflatten(-1, (h, x.shape[-1] // h)).transpose(1, 2)


def _append(k: torch.Tensor, v: torch.Tensor, extra_k: torch.Tensor, extra_v: torch.Tensor, dim: int,
            attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None) -> tuple:
    """One more key position (``bias_k``/``bias_v``, or zeros): the masks get a column of zeros."""
    masks = [None if m is None else F.pad(m, (0, 1)) for m in (attn_mask, key_padding_mask)]
    return torch.cat([k, extra_k], dim), torch.cat([v, extra_v], dim), *masks


def _combined(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, bsz: int, h: int,
              src_len: int) -> torch.Tensor | None:
    """The additive mask ``[1 or B, 1 or h, L or 1, S]``, the shapes the native function hands to the attention."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.unflatten(0, (bsz, h))
    if key_padding_mask is not None:
        pad = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1)
        mask = pad if mask is None else mask + pad
    return mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
            is_causal: bool, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, h, L, hd]`` attention output and, with ``need_weights``, the weights ``[B, h, L, S]``."""
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal), None
    scores = torch.matmul(q * math.sqrt(1.0 / q.shape[-1]), k.transpose(-2, -1))  # [B, h, L, S]
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:  # on [B·h, L, S], as the native function
        weights = F.dropout(weights.flatten(0, 1), p=dropout_p).unflatten(0, (q.shape[0], q.shape[1]))
    return torch.matmul(weights, v), weights


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
    """``F.multi_head_attention_forward`` (same arguments and results), sequence-first in and out, batch first inside.

    Raises:
        RuntimeError: As the native function, for inconsistent shapes and options.
    """
    batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    same = (query is key, key is value)
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    _, bsz, e = query.shape
    if e != embed_dim_to_check:
        raise RuntimeError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {e}")
    key_padding_mask, attn_mask, is_causal = _masks(key_padding_mask, attn_mask, need_weights, is_causal,
                                                    query.dtype)
    h, hd = num_heads, e // num_heads
    if use_separate_proj_weight:
        bs = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, w, b) for x, w, b in zip(
            (query, key, value), (q_proj_weight, k_proj_weight, v_proj_weight), bs, strict=True))
    else:
        q, k, v = _in_projection(query, key, value, same, e, in_proj_weight, in_proj_bias)  # [S, B, E]
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k, v, attn_mask, key_padding_mask = _append(k, v, bias_k.expand(1, bsz, e), bias_v.expand(1, bsz, e), 0,
                                                    attn_mask, key_padding_mask)
    q = _heads(q, h)  # [B, h, L, hd]
    k = _heads(k, h) if static_k is None else static_k.unflatten(0, (bsz, h))
    v = _heads(v, h) if static_v is None else static_v.unflatten(0, (bsz, h))
    if add_zero_attn:
        zeros = k.new_zeros(bsz, h, 1, hd)
        k, v, attn_mask, key_padding_mask = _append(k, v, zeros, zeros, 2, attn_mask, key_padding_mask)
    mask = _combined(attn_mask, key_padding_mask, bsz, h, k.shape[2])
    out, weights = _attend(q, k, v, mask, dropout_p if training else 0.0, is_causal, need_weights)
    # [L, B, E] in the native memory order: a dropout that follows draws its mask in memory order
    out = F.linear(out.transpose(1, 2).flatten(2), out_proj_weight, out_proj_bias).transpose(0, 1).contiguous()
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    if not batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights
