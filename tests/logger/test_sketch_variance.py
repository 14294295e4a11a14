"""The sketches' variance: an exact formula per matrix, checked against sampling, and its worst case within the bound.

The accuracy the sketches promise is a relative standard deviation of ‖s‖²/‖g‖² within 1.25·√(2/k). The TensorSketch
mean has 1.2256·√(2/k) at worst (k = 256) with 4 blocks and independent hashes, or 2 blocks and one side hashed
injectively: too close to the bound for a sampled test alone to tell the two apart, so the variance is checked in two
steps — the exact variance of each projection for a given matrix (:func:`relative_variance`, derived in
:data:`gradcoh.logger.sketch.TENSORSKETCH_BLOCKS`) equals the sampled one within its sampling error, for each of the
three ways a view is hashed (both sides at most k: injective, B = 1; one side: B = 2; neither: B = 4), and that
formula's supremum over all matrices is within the bound for the blocks the logger averages for each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradcoh.logger.sketch import Projection, tensorsketch_blocks, tensorsketch_worst_variance
from oracle import sketch_variance, tensorsketch_pair_probabilities

BOUND = 1.25
"""The promised relative standard deviation of ‖s‖²/‖g‖², in units of √(2/k)."""


def relative_variance(m: torch.Tensor, k: int, kind: str, u=None, v=None) -> float:
    """Exact variance of ‖s‖²/‖M‖² − 1 over seeds for one matrix ``M`` (:func:`oracle.sketch_variance`; ``u``,
    ``v``: its factors ``[1, T, rows]``, ``[1, T, cols]``, if any)."""
    return float(sketch_variance(m.double()[None], k, kind, u=u, v=v)[0])


def _matrices(which: str, n: int, rows: int, cols: int) -> torch.Tensor:
    """``n`` independent random matrices ``[n, rows, cols]`` of one kind."""
    gen = torch.Generator().manual_seed(4)

    def outer():
        return torch.einsum("ni,nj->nij", torch.randn(n, rows, generator=gen, dtype=torch.float64),
                            torch.randn(n, cols, generator=gen, dtype=torch.float64))

    if which == "rank_one":
        return outer()
    if which == "rank_three":
        return outer() + outer() + outer()
    return torch.randn(n, rows, cols, generator=gen, dtype=torch.float64)


# (kind, view, k, TensorSketch blocks): a CountSketch; TensorSketch means with both sides injective; the rows
# injective and the columns balanced, short enough for one block (80 at k = 64) or not (200); the columns injective;
# neither, two blocks (20 × 24 at k = 16) or four (40 × 24); small views keep the test short (the formula is exact
# at any k)
CASES = [("countsketch", (12, 20), 64, None), ("tensorsketch", (12, 20), 64, 1), ("tensorsketch", (12, 80), 64, 1),
         ("tensorsketch", (12, 200), 64, 2), ("tensorsketch", (24, 12), 16, 2), ("tensorsketch", (20, 24), 16, 2),
         ("tensorsketch", (40, 24), 16, 4)]


@pytest.mark.parametrize("kind,view,k,blocks", CASES,
                         ids=["countsketch", "ts_both", "ts_rows_one", "ts_rows", "ts_cols", "ts_neither_two",
                              "ts_neither"])
@pytest.mark.parametrize("which", ["rank_one", "rank_three", "full"])
def test_variance_over_seeds_is_the_formula(kind, view, k, blocks, which):
    """The mean square of ‖s‖²/‖M‖² − 1 over 500 seeds × 16 matrices equals the mean of :func:`relative_variance`
    within 4 standard errors.

    Seeds give independent projections; the 16 matrices sketched under one seed are not independent of each other,
    so the standard error is that of the per-seed means (their sample sd over √500: ≈ 1.7% of the mean square here;
    z = 4: P(false failure) < 10⁻⁴ per case). The formula's terms differ by more than that where the construction
    matters: rank-one 12 × 20 matrices at k = 64 have 0.96·(2/k) with both sides injective and 1 block, 1.6 with
    independent hashes and 1 block, 1.3 with 4 blocks; 12 × 80 have ≈ 1.3 with injective rows, balanced columns and
    1 block, ≈ 2 with independent columns (version 6's hash; blocks sharing one hash, a side hashed independently
    where the logger claims it injective or balanced, or a sign independent of the row, move it by ≥ 10%). The mean
    error is 0 within 4 standard errors of the per-seed means (unbiased).
    """
    assert kind == "countsketch" or tensorsketch_blocks(view, k) == blocks
    seeds, n = 500, 16
    rows, cols = view
    m = _matrices(which, n, rows, cols)
    norms = m.square().sum((1, 2))
    err = np.stack([(Projection.create(seed, "w", (rows, cols), k, kind).dense(m).square().sum(1) / norms
                     - 1).numpy() for seed in range(seeds)])  # [seeds, n]
    want = float(np.mean([relative_variance(x, k, kind) for x in m]))
    per_seed = (err**2).mean(1)
    got, se = float(per_seed.mean()), float(per_seed.std() / np.sqrt(seeds))
    assert abs(got - want) <= 4 * se, (kind, which, got / (2 / k), want / (2 / k), se / (2 / k))
    assert abs(err.mean()) <= 4 * err.mean(1).std() / np.sqrt(seeds), err.mean()


@pytest.mark.parametrize("k", [16, 256, 1024])
@pytest.mark.parametrize("case", ["neither", "rows", "cols", "both", "rows_short", "neither_short"])
def test_worst_case_variance_within_the_bound(k, case):
    """The formula's supremum over matrices is within 1.25²·(2/k) for the blocks the logger averages for each way a
    view is hashed (:func:`~gradcoh.logger.sketch.tensorsketch_blocks`, the sketches' promise).

    With ‖M‖ = 1 the pairs' terms R + C + D ≤ 1 and the quadruples' Q ≤ D ≤ 1, so one TensorSketch has at most
    2·max(P(pair collides)) + 2·(π₂(0) + π₁(0) + q), and B blocks (1/B of it) + (2/k)(B − 1)/B: an injective side
    has no collisions of its own, a balanced one of w ≤ 2k entries at most ≈ 1/(2k) (:func:`~gradcoh.logger.sketch.
    side_collision`), so one block where the other side is injective and at most ≈ 2k long, two or four otherwise,
    each ≤ ≈ 1.5·(2/k); (2/k)·k²/(k − 1)² at B = 1 with both sides injective. Also against the logger's own closed
    form (:func:`~gradcoh.logger.sketch.tensorsketch_worst_variance`, which chooses the blocks). A rank-one matrix
    of equal entries approaches the supremum (within 4/k
    of it: its rows and columns are at most k when injective, so Σ_i ‖M_i·‖⁴ ≥ 1/k); a CountSketch stays below 2/k.
    """
    long = 2 * k + 4
    view = {"neither": (long + 4, long), "rows": (k, long), "cols": (long, k), "both": (k, k),
            "rows_short": (k, k + k // 4), "neither_short": (k + k // 4, k + k // 8)}[case]
    blocks = tensorsketch_blocks(view, k)
    p = tensorsketch_pair_probabilities(*view, k)
    one = 2 * max(p["same_row"], p["same_col"], p["apart"]) + 2 * (p["same_row"] + p["same_col"] + p["diagonals"])
    sup = one / blocks + 2 / k * (blocks - 1) / blocks
    assert sup <= BOUND**2 * 2 / k, (case, blocks, np.sqrt(sup / (2 / k)))
    assert tensorsketch_worst_variance(view, k, blocks) * 2 / k == pytest.approx(sup, rel=1e-9)
    flat = torch.ones(*view, dtype=torch.float64)  # the near-worst case: rank one, no dominant entry
    u, v = torch.ones(1, 1, view[0], dtype=torch.float64), torch.ones(1, 1, view[1], dtype=torch.float64)
    near = relative_variance(flat, k, "tensorsketch", u, v)
    assert (1 - 4 / k) * sup <= near <= sup and relative_variance(flat, k, "countsketch") <= 2 / k, (
        near / (2 / k), sup / (2 / k))


def _enumerated_variance(m: np.ndarray, k: int) -> tuple[float, float]:
    """``(mean, variance)`` of ‖s‖²/‖M‖² for one TensorSketch of ``m`` over *every* value of its hashes and signs.

    Bucket ``(h₁(i) + h₂(j)) mod k``, sign ``σ₁(i)σ₂(j)``; a side runs over every balanced placement (each equally
    likely: every bucket holds as many entries as it gets of ``range(width)`` taken ``mod k``, up to a relabelling
    of the buckets — injective when ``width ≤ k``); every sign pattern. No sampling: the mean is 1 and the variance
    the formula's to rounding.
    """
    import itertools

    rows, cols = m.shape

    def side(width):
        profile = sorted(np.bincount(np.arange(width) % k, minlength=k))
        return np.array([h for h in itertools.product(range(k), repeat=width)
                         if sorted(np.bincount(h, minlength=k)) == profile])

    h1, h2 = side(rows), side(cols)
    s1 = np.array(list(itertools.product([-1.0, 1.0], repeat=rows)))
    s2 = np.array(list(itertools.product([-1.0, 1.0], repeat=cols)))
    signed = (s1[:, None, :, None] * s2[None, :, None, :]).reshape(-1, rows * cols) * m.reshape(-1)  # [S, e]
    values = []
    for a in h1:
        onehot = np.eye(k)[((a[None, :, None] + h2[:, None, :]) % k).reshape(len(h2), -1)]  # [H₂, e, k]
        values.append(np.square(np.einsum("se,hek->hsk", signed, onehot)).sum(-1).ravel())
    ratio = np.concatenate(values) / np.square(m).sum()
    return float(ratio.mean()), float(ratio.var())


# (rows, cols, k): both sides injective; the rows only; the columns only (odd k); neither side (even k: the
# diagonals' term 2/k² is largest, 0.5 at k = 2); neither side, odd k
ENUMERATED = [(3, 3, 4), (2, 5, 4), (4, 3, 3), (3, 3, 2), (4, 4, 3)]


@pytest.mark.parametrize("rows,cols,k", ENUMERATED, ids=["both", "rows", "cols", "neither_even", "neither_odd"])
@pytest.mark.parametrize("which", ["rank_one", "full"])
def test_formula_is_exact_by_enumerating_every_hash(rows, cols, k, which):
    """One TensorSketch's variance (``blocks=1``) equals :func:`oracle.sketch_variance` to rounding for tiny
    matrices, over every hash and sign value: the terms sampling cannot resolve (the 2×2 diagonals' ``O(1/k²)``,
    dropping which passes the sampled test above) are checked exactly. Unbiased: the mean is exactly 1."""
    m = _matrices(which, 1, rows, cols)[0]
    mean, var = _enumerated_variance(m.numpy(), k)
    assert abs(mean - 1) <= 1e-12
    want = float(sketch_variance(m[None], k, "tensorsketch", blocks=1)[0])
    assert abs(var - want) <= 1e-12 * max(var, 1.0), (var, want)
