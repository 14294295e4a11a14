"""Ghost norms ``‖Σ_t u_t v_tᵀ‖² = ⟨U Uᵀ, V Vᵀ⟩`` per example, from the symmetric blocks of the position Grams.

``U Uᵀ`` and ``V Vᵀ`` (``[T, T]`` per example) are symmetric, and so is their elementwise product: the sum over
``(t, s)`` is the sum over the diagonal blocks plus twice the sum over the blocks above them. The positions are
halved ``L`` times (:func:`levels`): each level's sibling halves give one off-diagonal block, the last level's blocks
the diagonal, ``(1/2^L + Σ_l 2^-(l+2))·T²`` entries instead of ``T²`` (5/8 for ``L = 2``), each block one batched
GEMM over examples and blocks, with no copy (the blocks are views of the factor).

A factor read by several forms in one backward pass (the input of the query, key and value projections, of a
gated MLP's gate and up projections) has one set of blocks: :class:`GramCache` keeps the most recent ones, keyed by
the tensor's storage, offset, shape, strides and version. An entry holds the tensor, so its storage cannot be freed
and reused by another tensor while the key can still match; any in-place change bumps the version.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

MIN_BLOCK = 32
"""Smallest block side: below it a batched GEMM's fixed cost outweighs the multiply-adds the blocks save."""

MAX_LEVELS = 3


def levels(t: int) -> int:
    """How many times ``t`` positions are halved (0: the whole Gram in one GEMM).

    The most (at most :data:`MAX_LEVELS`) that divide ``t`` exactly with blocks of at least :data:`MIN_BLOCK`.
    """
    out = 0
    while out < MAX_LEVELS and t % (2 ** (out + 1)) == 0 and t >> (out + 1) >= MIN_BLOCK:
        out += 1
    return out


def _tail(t: int) -> bool:
    """Whether ``t`` positions are split as two halves of at least :data:`MIN_BLOCK` and one last position.

    An odd ``t`` (which :func:`levels` never splits): a ViT's patches and its class token, 64 + 1.
    """
    return levels(t) == 0 and t % 2 == 1 and t >= 2 * MIN_BLOCK + 1


def gram_fraction(t: int) -> float:
    """Entries of the ``[t, t]`` Gram the blocks compute, as a fraction of ``t²`` (the cost model's factor)."""
    if _tail(t):
        return (0.75 * (t - 1) ** 2 + t) / (t * t)
    n_levels = levels(t)
    return 2.0**-n_levels + sum(2.0 ** -(level + 2) for level in range(n_levels))


def ghost_macs(t: int, rows: int, cols: int) -> float:
    """Multiply-adds per example of the ghost norm of ``Σ_t u_t v_tᵀ`` (``u: [t, rows]``, ``v: [t, cols]``)."""
    if t == 1:
        return float(rows + cols)
    return gram_fraction(t) * t * t * (rows + cols)


class Blocks(NamedTuple):
    """The blocks of one factor's per-example Gram ``x xᵀ`` that :func:`gram_blocks` computes.

    Attributes:
        off: Off-diagonal blocks (each stands for itself and its transpose).
        diag: Diagonal blocks.
        strip: ``[n, T - m, T]``: the last positions against all (None when ``m = T``).
        m: Positions covered by ``off`` and ``diag``.
    """

    off: tuple[torch.Tensor, ...]
    diag: tuple[torch.Tensor, ...]
    strip: torch.Tensor | None
    m: int


def gram_blocks(x: torch.Tensor) -> Blocks:
    """The blocks of ``x xᵀ`` per example (``x: [n, T, c]``).

    With ``L = levels(T)`` halvings, level ``l`` splits each of the ``2^l`` blocks of the level above into halves of
    ``h_l = T / 2^(l+1)`` positions and keeps their cross products (one ``[n·2^l, h_l, h_l]`` GEMM on views), then
    one GEMM gives the ``2^L`` diagonal blocks. An odd ``T`` (:func:`_tail`) gets two halves and a strip for the last
    position (the halves are views with the example stride of ``T`` positions: one GEMM per block).
    """
    n, t, c = x.shape
    if _tail(t):
        h = (t - 1) // 2
        a0, a1 = x[:, :h], x[:, h : 2 * h]
        return Blocks((torch.bmm(a0, a1.transpose(1, 2)),),
                      (torch.bmm(a0, a0.transpose(1, 2)), torch.bmm(a1, a1.transpose(1, 2))),
                      torch.bmm(x[:, 2 * h :], x.transpose(1, 2)), 2 * h)
    depth = levels(t)
    if depth == 0:
        return Blocks((), (torch.bmm(x, x.transpose(1, 2)),), None, t)
    off = []
    for level in range(depth):
        h = t >> (level + 1)
        halves = x.reshape(n << level, 2, h, c)
        off.append(torch.bmm(halves[:, 0], halves[:, 1].transpose(1, 2)))
    blocks = x.reshape(n << depth, t >> depth, c)
    return Blocks(tuple(off), (torch.bmm(blocks, blocks.transpose(1, 2)),), None, t)


def _products(xs: tuple[torch.Tensor, ...], ys: tuple[torch.Tensor, ...], n: int) -> torch.Tensor | None:
    """``[n]`` sums of the elementwise products of paired blocks (None without blocks)."""
    out = None
    for pa, pb in zip(xs, ys, strict=True):
        part = (pa * pb).reshape(n, -1).sum(1)
        out = part if out is None else out + part
    return out


def contract(a: Blocks, b: Blocks, n: int) -> torch.Tensor:
    """``[n]`` sums ``Σ_{t,s} (x xᵀ)_{ts} (y yᵀ)_{ts}`` from the blocks of two factors (:func:`gram_blocks`)."""
    out = _products(a.diag, b.diag, n)
    twice = _products(a.off, b.off, n)
    if a.strip is not None:  # the last positions against the first m (and their transposes), then among themselves
        prod = a.strip * b.strip
        part = prod[:, :, : a.m].sum((1, 2))
        twice = part if twice is None else twice + part
        out = out + prod[:, :, a.m :].sum((1, 2))
    return out if twice is None else out + 2 * twice


def sq_norms(u: torch.Tensor, v: torch.Tensor, cache: GramCache | None = None) -> torch.Tensor:
    """``[n]`` squared norms ``‖Σ_t u_t v_tᵀ‖²`` (``u: [n, T, r]``, ``v: [n, T, c]``, ``T > 1``)."""
    if cache is None:
        return contract(gram_blocks(u), gram_blocks(v), u.shape[0])
    return contract(cache.blocks(u), cache.blocks(v), u.shape[0])


class GramCache:
    """The Gram blocks of the most recent factors of a backward pass, shared by forms that read the same tensor.

    Args:
        size: Entries kept (least recently used dropped first): enough for the factors read by several layers in a
            row (the query/key/value input, the gate/up input).
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, Blocks]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(x: torch.Tensor) -> tuple:
        """What identifies ``x``'s values while the cache holds ``x``: storage, offset, shape, strides, version."""
        return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x._version, x.dtype,
                x.device)

    def blocks(self, x: torch.Tensor) -> Blocks:
        """:func:`gram_blocks` of ``x``, computed once while it stays among the recent entries."""
        key = self.key(x)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        self.misses += 1
        out = gram_blocks(x)
        self._entries[key] = (x, out)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return out

    def clear(self) -> None:
        """Drop every entry (the end of a backward pass)."""
        self._entries.clear()
