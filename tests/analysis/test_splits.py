"""Cross-group benefit and Coherent-Gradients fractions against direct dot products of group sums."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from gradcoh.analysis import cg_fractions, cross_group_benefit, m_coherence, open_store
from storefactory import build_store, random_gradients
from tolerance import assert_close


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(11)
    grads = random_gradients(rng, n_steps=3, m=15, sizes=(5, 8), short_step=(2, 10))
    groups = [rng.integers(0, 3, size=len(s[0])) for s in grads]
    return build_store(
        tmp_path_factory.mktemp("splits") / "run.zarr",
        grads,
        groups=groups,
        group_names=("clean", "flipped", "random"),
    )


@pytest.fixture(scope="module")
def ds(store):
    return open_store(store.path)


TERMS = 2 * 15 * (5 + 8)  # two float64 computations, each over at most m·P gradient entries


def _sizes(store, t):
    """[group] Σ_{i∈a} ‖gᵢ‖: the size of the terms behind group a's sum (whatever it cancels to)."""
    G, g = store.batch.flat(t), store.batch.groups[t]
    return np.array([np.linalg.norm(G[g == a], axis=1).sum() for a in range(3)])


def _group_sums(store, t):
    G = store.batch.flat(t)
    g = store.batch.groups[t]
    sums = np.stack([G[g == a].sum(0) for a in range(3)])
    self_terms = np.array([(G[g == a] ** 2).sum() for a in range(3)])
    return G, sums, self_terms


def test_diagonal_is_group_m_coherence(ds):
    benefit = cross_group_benefit(ds)
    assert benefit.dims == ("step", "group_i", "group_j")
    diag = np.einsum("tii->ti", benefit.values)
    coh = m_coherence(ds, by="group")  # the same float64 sums, reduced in two orders; an m-coherence against m
    assert_close(diag, coh.values, n=TERMS, dtype="float64", scale=coh["m"].values)


def test_off_diagonal_matches_direct(store, ds):
    benefit = cross_group_benefit(ds).values
    for t in range(3):
        _, sums, self_terms = _group_sums(store, t)
        expected = (sums @ sums.T) / self_terms[:, None]
        size = _sizes(store, t)
        assert_close(benefit[t], expected, n=TERMS, dtype="float64", scale=np.outer(size, size) / self_terms[:, None])


def test_benefit_sizes_and_per_layer(store, ds):
    benefit = cross_group_benefit(ds, per_layer=True)
    assert benefit.dims == ("step", "layer", "group_i", "group_j")
    assert int(benefit["m_i"].sel(group_i="flipped").values[0]) == (store.batch.groups[0] == 1).sum()


def test_cg_fractions_sum_to_one_and_match_dot_products(store, ds):
    out = cg_fractions(ds)
    for t in range(3):
        G, sums, _ = _group_sums(store, t)
        g = G.sum(0)
        size = _sizes(store, t)  # terms: Σ_{i∈a}‖gᵢ‖ · Σⱼ‖gⱼ‖ (inner), over ‖G‖² (fraction)
        assert_close(out.inner.values[t], sums @ g, n=TERMS, dtype="float64", scale=size * size.sum())
        assert_close(out.fraction.values[t], (sums @ g) / (g @ g), n=TERMS, dtype="float64",
                     scale=size * size.sum() / (g @ g))
        assert_close(out.fraction.values[t].sum(), 1.0, n=TERMS, dtype="float64", scale=size.sum() ** 2 / (g @ g))


def test_dask_equals_numpy(ds):
    eager = ds.compute()
    xr.testing.assert_allclose(cross_group_benefit(ds).compute(), cross_group_benefit(eager))
    xr.testing.assert_allclose(cg_fractions(ds, per_layer=True).compute(), cg_fractions(eager, per_layer=True))
