"""NumPy kernels: plain arrays in, arrays out, no xarray (the xskillscore ``np_*`` layer).

The xarray wrappers in :mod:`gradcoh.analysis.coherence`, :mod:`~gradcoh.analysis.pairwise` and friends call these
through :func:`xarray.apply_ufunc`; the kernels never see Dask. Pairwise kernels walk the m×m matrix of one step in
``block_size × block_size`` blocks, so memory is one block plus the step's sketch, never m².
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = [
    "CLASS_PARTS",
    "HIST_START",
    "PAIR_STATS",
    "ClassPart",
    "PairStat",
    "class_pair_sums",
    "histogram_quantiles",
    "m_coherence_from_gradients",
    "pairwise_m_coherence",
    "pairwise_stats",
    "safe_ratio",
]

class PairStat(enum.IntEnum):
    """Position of each pair statistic in the output of :func:`pairwise_stats`; the cosine histogram follows.

    For each pair set (all pairs, pairs with the same label, pairs with different labels): the number of ordered
    pairs, the sum of their cosines and the sum of their cosine signs. Then the number of pairs with a negative
    cosine and the smallest cosine.
    """

    n_all = 0
    cos_all = 1
    sign_all = 2
    n_within = 3
    cos_within = 4
    sign_within = 5
    n_between = 6
    cos_between = 7
    sign_between = 8
    n_negative = 9
    min_cos = 10


PAIR_STATS = tuple(stat.name for stat in PairStat)
"""Names of the leading entries of :func:`pairwise_stats`' output, in order; the cosine histogram follows."""

HIST_START = len(PairStat)
"""Position of the first histogram bin in the output of :func:`pairwise_stats`."""

_PAIR_SETS = (
    (PairStat.n_all, PairStat.cos_all, PairStat.sign_all),
    (PairStat.n_within, PairStat.cos_within, PairStat.sign_within),
    (PairStat.n_between, PairStat.cos_between, PairStat.sign_between),
)
"""(count, cosine sum, sign sum) positions of the all / within / between pair sets."""


class ClassPart(enum.IntEnum):
    """Position of each sum along the last axis of :func:`class_pair_sums`' output."""

    n = 0
    cos = 1
    sign = 2


CLASS_PARTS = tuple(part.name for part in ClassPart)
"""Names of the entries along the last axis of :func:`class_pair_sums`' output, in order."""


def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den <= 0`` or is NaN (no warnings)."""
    num, den = np.broadcast_arrays(np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64))
    out = np.full(num.shape, np.nan)
    ok = den > 0
    np.divide(num, den, out=out, where=ok)
    return out


def sum_sq_of_sum(sketch: np.ndarray) -> np.ndarray:
    """‖Σ_i s_i‖² over the last two axes ``(example, proj)`` in one pass; NaN rows (padding) count as zero.

    The sum over examples accumulates in float64 straight from the stored float16/float32 values (no float64 copy
    of the block), which is what makes the sketch numerator read-bound.
    """
    total = np.nansum(sketch, axis=-2, dtype=np.float64)  # [..., proj]
    return np.einsum("...k,...k->...", total, total)


def m_coherence_from_gradients(grads: np.ndarray, axis: int = -2) -> np.ndarray:
    """O(m) m-coherence ``‖Σ_i g_i‖² / Σ_i ‖g_i‖²`` of full gradients.

    Args:
        grads: Per-example gradients, examples along ``axis``, parameters along the last axis.
        axis: The example axis.

    Returns:
        The m-coherence, with the example and parameter axes removed.

    """
    grads = np.asarray(grads, dtype=np.float64)
    total = grads.sum(axis=axis)
    return safe_ratio((total * total).sum(-1), (grads * grads).sum(axis=(axis, -1)))


def pairwise_m_coherence(grads: np.ndarray) -> float:
    """O(m²) reference: ``m · mean_{i,j} g_i·g_j / mean_i ‖g_i‖²`` (pairs include i = j), for one (m, P) matrix."""
    grads = np.asarray(grads, dtype=np.float64)
    m = grads.shape[0]
    gram = grads @ grads.T
    return float(m * gram.mean() / np.diag(gram).mean())


def _unit_rows(block: np.ndarray) -> np.ndarray:
    rows = block.astype(np.float64)
    norms = np.sqrt((rows * rows).sum(1, keepdims=True))
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def _block_pairs(m: int, block_size: int):
    """Blocks (i0, i1, j0, j1, weight) of the upper triangle; off-diagonal blocks stand for both orders."""
    for i0 in range(0, m, block_size):
        i1 = min(i0 + block_size, m)
        for j0 in range(i0, m, block_size):
            yield i0, i1, j0, min(j0 + block_size, m), (1.0 if i0 == j0 else 2.0)


def _accumulate(acc: np.ndarray, cos: np.ndarray, pair: np.ndarray, same: np.ndarray, weight: float) -> None:
    """Add one block of cosines (``pair`` masks valid ordered pairs, ``same`` marks same-label pairs)."""
    bins = acc.size - HIST_START
    sign = np.sign(cos)
    known = same >= 0
    masks = (pair, pair & (same == 1) & known, pair & (same == 0) & known)
    for (count, cos_sum, sign_sum), mask in zip(_PAIR_SETS, masks, strict=True):
        acc[count] += weight * mask.sum()
        acc[cos_sum] += weight * cos[mask].sum()
        acc[sign_sum] += weight * sign[mask].sum()
    values = cos[pair]
    acc[PairStat.n_negative] += weight * (values < 0).sum()
    if values.size:
        acc[PairStat.min_cos] = min(acc[PairStat.min_cos], values.min())
    idx = np.clip(((values + 1.0) * (bins / 2.0)).astype(np.int64), 0, bins - 1)
    acc[HIST_START:] += weight * np.bincount(idx, minlength=bins)


def _same_label(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 for equal known labels, 0 for different known labels, −1 when either label is unknown (< 0)."""
    same = (a[:, None] == b[None, :]).astype(np.int8)
    same[(a[:, None] < 0) | (b[None, :] < 0)] = -1
    return same


def _pairwise_one(sketch: np.ndarray, labels: np.ndarray, valid: np.ndarray, block_size: int, bins: int):
    rows = sketch.reshape(sketch.shape[0], -1)[valid]
    labels = labels[valid]
    acc = np.zeros(HIST_START + bins)
    acc[PairStat.min_cos] = np.inf
    for i0, i1, j0, j1, weight in _block_pairs(rows.shape[0], block_size):
        a, b = _unit_rows(rows[i0:i1]), _unit_rows(rows[j0:j1])
        cos = np.clip(a @ b.T, -1.0, 1.0)  # [block, block]
        pair = np.ones(cos.shape, bool)
        if i0 == j0:
            np.fill_diagonal(pair, False)
        _accumulate(acc, cos, pair, _same_label(labels[i0:i1], labels[j0:j1]), weight)
    if not np.isfinite(acc[PairStat.min_cos]):
        acc[PairStat.min_cos] = np.nan
    return acc


def pairwise_stats(
    sketch: np.ndarray, labels: np.ndarray, valid: np.ndarray, *, block_size: int = 1024, bins: int = 2000
) -> np.ndarray:
    """Sums over ordered pairs i ≠ j of cosines, signs and a cosine histogram, block by block.

    Args:
        sketch: ``(..., example, *feature)``; features (e.g. layer × proj) are flattened.
        labels: ``(..., example)`` integer labels; ``< 0`` = unknown (counted in ``all`` only).
        valid: ``(..., example)`` boolean, False for padding rows.
        block_size: Rows per block; peak extra memory is ``block_size²`` float64 values.
        bins: Histogram bins on [−1, 1].

    Returns:
        ``(..., HIST_START + bins)``: the :class:`PairStat` entries, then the histogram counts.

    """
    lead = labels.shape[:-1]
    out = np.empty((*lead, HIST_START + bins))
    for pos in np.ndindex(lead):
        out[pos] = _pairwise_one(sketch[pos], labels[pos], valid[pos].astype(bool), block_size, bins)
    return out


def _class_one(sketch: np.ndarray, codes: np.ndarray, n_classes: int, block_size: int) -> np.ndarray:
    keep = codes >= 0
    rows, codes = sketch.reshape(sketch.shape[0], -1)[keep], codes[keep]
    onehot = np.eye(n_classes)[codes]  # [m, C]
    out = np.zeros((n_classes, n_classes, len(ClassPart)))
    counts = onehot.sum(0)
    out[..., ClassPart.n] = np.outer(counts, counts) - np.diag(counts)
    for i0, i1, j0, j1, weight in _block_pairs(rows.shape[0], block_size):
        cos = np.clip(_unit_rows(rows[i0:i1]) @ _unit_rows(rows[j0:j1]).T, -1.0, 1.0)
        if i0 == j0:
            np.fill_diagonal(cos, 0.0)  # excludes i = j; sign(0) = 0 too
        for part, values in ((ClassPart.cos, cos), (ClassPart.sign, np.sign(cos))):
            block = onehot[i0:i1].T @ values @ onehot[j0:j1]
            out[..., part] += block if weight == 1.0 else block + block.T
    return out


def class_pair_sums(
    sketch: np.ndarray, codes: np.ndarray, valid: np.ndarray, *, n_classes: int, block_size: int = 1024
) -> np.ndarray:
    """Per class pair (a, b): number of ordered pairs i ≠ j, and sums of their cosines and cosine signs.

    Args:
        sketch: ``(..., example, *feature)``.
        codes: ``(..., example)`` class positions in ``[0, n_classes)``; ``< 0`` = excluded.
        valid: ``(..., example)`` boolean, False for padding.
        n_classes: Number of classes C.
        block_size: Rows per block.

    Returns:
        ``(..., C, C, len(ClassPart))``: pair counts, cosine sums, sign sums (:class:`ClassPart` order).

    """
    lead = codes.shape[:-1]
    out = np.empty((*lead, n_classes, n_classes, len(ClassPart)))
    for pos in np.ndindex(lead):
        masked = np.where(valid[pos].astype(bool), codes[pos], -1)
        out[pos] = _class_one(sketch[pos], masked, n_classes, block_size)
    return out


def histogram_quantiles(hist: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Quantiles of values in [−1, 1] from histogram counts (linear within a bin; error ≤ one bin width).

    Args:
        hist: ``(..., bins)`` counts over equal bins on [−1, 1].
        quantiles: ``(q,)`` levels in [0, 1].

    Returns:
        ``(..., q)``; NaN where the histogram is empty.

    """
    hist = np.asarray(hist, dtype=np.float64)
    bins = hist.shape[-1]
    cum = np.cumsum(hist, axis=-1)
    total = cum[..., -1:]
    out = np.full((*hist.shape[:-1], len(quantiles)), np.nan)
    for pos in np.ndindex(hist.shape[:-1]):
        if total[pos][0] <= 0:
            continue
        # a tiny floor makes q = 0 land in the first non-empty bin rather than at −1
        target = np.maximum(np.asarray(quantiles) * total[pos][0], np.finfo(np.float64).tiny)
        k = np.minimum(np.searchsorted(cum[pos], target, side="left"), bins - 1)
        before = np.where(k > 0, cum[pos][np.maximum(k - 1, 0)], 0.0)
        frac = np.divide(target - before, hist[pos][k], out=np.zeros(len(k)), where=hist[pos][k] > 0)
        out[pos] = -1.0 + (k + np.clip(frac, 0.0, 1.0)) * (2.0 / bins)
    return out
