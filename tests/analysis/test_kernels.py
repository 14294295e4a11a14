"""NumPy kernels against closed forms and the O(m²) pairwise definitions of stiffness and gradient confusion."""

from __future__ import annotations

import numpy as np
import pytest
from gradcoh.analysis import kernels
from hypothesis import given, settings
from hypothesis import strategies as st


def mcoh(G):
    return float(kernels.m_coherence_from_gradients(G))


def test_orthogonal_rows_with_any_norms_give_one(rng):
    Q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    G = Q[:8] * np.arange(1, 9)[:, None]
    assert mcoh(G) == pytest.approx(1.0)


@pytest.mark.parametrize("m", [1, 2, 7, 50])
def test_identical_rows_give_m(rng, m):
    assert mcoh(np.tile(rng.normal(size=13), (m, 1))) == pytest.approx(m)


@given(a=st.integers(1, 30), b=st.integers(0, 30))
def test_e1_e2_mixture(a, b):
    G = np.vstack([np.tile([1.0, 0.0, 0.0], (a, 1)), np.tile([0.0, 1.0, 0.0], (b, 1))])
    assert mcoh(G) == pytest.approx((a * a + b * b) / (a + b))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 25), p=st.integers(1, 20), seed=st.integers(0, 10_000), shift=st.floats(-1, 1))
def test_o_m_form_equals_pairwise_definition(m, p, seed, shift):
    G = np.random.default_rng(seed).normal(size=(m, p)) + shift
    assert mcoh(G) == pytest.approx(kernels.pairwise_m_coherence(G), rel=1e-9)


def test_reciprocal_is_gradient_diversity_and_scale_invariant(rng):
    G = rng.normal(size=(40, 9)) + 0.4
    diversity = (G * G).sum() / (G.sum(0) @ G.sum(0))
    assert 1 / mcoh(G) == pytest.approx(diversity)
    assert mcoh(3.7 * G) == pytest.approx(mcoh(G))
    assert mcoh(-0.01 * G) == pytest.approx(mcoh(G))


def test_alpha_equals_one_over_one_plus_simple_noise_scale(rng):
    G = rng.normal(size=(100, 50)) + 0.3
    mu = G.mean(0)
    b_simple = ((G - mu) ** 2).sum(1).mean() / (mu @ mu)
    assert mcoh(G) / 100 == pytest.approx(1 / (1 + b_simple))


def test_safe_ratio_gives_nan_for_empty_denominators():
    out = kernels.safe_ratio(np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0, np.nan]))
    assert out[0] == 0.5 and np.isnan(out[1]) and np.isnan(out[2])


def _exact_pairs(G, labels):
    n = G / np.linalg.norm(G, axis=1, keepdims=True)
    C = n @ n.T
    iu = np.triu_indices(len(G), 1)
    cos = C[iu]
    same = (labels[:, None] == labels[None, :])[iu]
    return cos, same


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 30), block=st.integers(1, 12), seed=st.integers(0, 1000))
def test_blockwise_pair_stats_equal_full_matrix(m, block, seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(m, 2, 5)) + 0.2  # (example, layer, proj)
    labels = rng.integers(0, 3, size=m)
    valid = np.ones(m, bool)
    out = kernels.pairwise_stats(G[None], labels[None], valid[None], block_size=block, bins=400)[0]
    stats = dict(zip(kernels.PAIR_STATS, out, strict=False))
    cos, same = _exact_pairs(G.reshape(m, -1), labels)
    n_pairs = m * (m - 1)  # ordered pairs
    assert stats["n_all"] == n_pairs
    assert stats["cos_all"] / n_pairs == pytest.approx(cos.mean())
    assert stats["sign_all"] / n_pairs == pytest.approx(np.sign(cos).mean())
    assert stats["n_within"] == 2 * same.sum()
    if same.any():
        assert stats["cos_within"] / stats["n_within"] == pytest.approx(cos[same].mean())
    if (~same).any():
        assert stats["sign_between"] / stats["n_between"] == pytest.approx(np.sign(cos[~same]).mean())
    assert stats["min_cos"] == pytest.approx(cos.min())
    assert stats["n_negative"] == 2 * (cos < 0).sum()
    assert out[len(kernels.PAIR_STATS) :].sum() == n_pairs


def test_padding_rows_and_unknown_labels_are_ignored(rng):
    G = rng.normal(size=(6, 4))
    padded = np.vstack([G, np.full((3, 4), np.nan)])
    labels = np.array([0, 0, 1, 1, -1, -1, -1, -1, -1])
    valid = np.arange(9) < 6
    out = kernels.pairwise_stats(padded[None], labels[None], valid[None], block_size=4, bins=10)[0]
    stats = dict(zip(kernels.PAIR_STATS, out, strict=False))
    assert stats["n_all"] == 30
    assert stats["n_within"] == 4 and stats["n_between"] == 8  # pairs among the 4 labelled rows


def test_class_pair_sums_match_direct(rng):
    m, C = 17, 3
    G = rng.normal(size=(m, 8)) + 0.3
    codes = rng.integers(0, C, size=m)
    out = kernels.class_pair_sums(G[None], codes[None], np.ones((1, m), bool), n_classes=C, block_size=5)[0]
    n = G / np.linalg.norm(G, axis=1, keepdims=True)
    cos = n @ n.T
    np.fill_diagonal(cos, np.nan)
    for a in range(C):
        for b in range(C):
            block = cos[np.ix_(codes == a, codes == b)]
            vals = block[np.isfinite(block)]
            assert out[a, b, 0] == vals.size
            assert out[a, b, 1] == pytest.approx(vals.sum())
            assert out[a, b, 2] == pytest.approx(np.sign(vals).sum())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(5, 400))
def test_histogram_quantiles_within_one_bin(seed, n):
    values = np.tanh(np.random.default_rng(seed).normal(size=n))
    bins = 500
    hist = np.bincount(np.clip(((values + 1) * bins / 2).astype(int), 0, bins - 1), minlength=bins)
    qs = np.array([0.0, 0.05, 0.5, 0.95, 1.0])
    got = kernels.histogram_quantiles(hist[None].astype(float), qs)[0]
    lo = np.quantile(values, qs, method="inverted_cdf")
    assert np.all(np.abs(got - lo) <= 2 * 2.0 / bins + 1e-12)
