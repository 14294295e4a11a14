"""Sketch-based pairwise metrics against exact pairwise values from the full gradients."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from gradcoh.analysis import (
    class_stiffness,
    gradient_confusion,
    mean_pairwise_cosine,
    metrics_summary,
    open_store,
    stiffness,
)
from storefactory import build_store, random_gradients

# 3 layers x k=512 -> 1536 Gaussian sketch dims: a cosine estimate has sd ≈ 1/sqrt(1536) ≈ 0.026, so single
# cosines (min, quantiles) get atol 0.1 (~4 sd); means over many pairs get 0.05; signs are compared only for
# pairs whose exact |cos| exceeds 0.1, where a sign flip needs a ~4 sd error.
K = 512
ATOL_ONE, ATOL_MEAN = 0.1, 0.05


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(5)
    grads = random_gradients(rng, n_steps=3, m=24, sizes=(40, 60, 30), shared=0.4, short_step=(1, 17))
    labels = [rng.integers(0, 3, size=len(s[0])) for s in grads]
    return build_store(
        tmp_path_factory.mktemp("pairs") / "run.zarr", grads, labels=labels, sketch_dim=K, sketch_dtype="float16"
    )


@pytest.fixture(scope="module")
def ds(store):
    return open_store(store.path)


def _exact(store, t):
    G = store.batch.flat(t)
    n = G / np.linalg.norm(G, axis=1, keepdims=True)
    C = n @ n.T
    iu = np.triu_indices(len(G), 1)
    labels = store.batch.labels[t]
    same = (labels[:, None] == labels[None, :])[iu]
    return C[iu], same


def test_stiffness_close_to_exact(store, ds):
    st = stiffness(ds, block_size=5).compute()
    assert set(st.data_vars) == {
        "cos_global",
        "cos_within",
        "cos_between",
        "sign_global",
        "sign_within",
        "sign_between",
    }
    for t in range(3):
        cos, same = _exact(store, t)
        assert st.cos_global.values[t] == pytest.approx(cos.mean(), abs=ATOL_MEAN)
        assert st.cos_within.values[t] == pytest.approx(cos[same].mean(), abs=ATOL_MEAN)
        assert st.cos_between.values[t] == pytest.approx(cos[~same].mean(), abs=ATOL_MEAN)
        clear = np.abs(cos) > 0.1
        assert st.sign_global.values[t] == pytest.approx(np.sign(cos).mean(), abs=1 - clear.mean() + ATOL_MEAN)
    assert list(st["m"].values) == [24, 17, 24]


def test_block_size_does_not_change_results(ds):
    xr.testing.assert_allclose(stiffness(ds, block_size=3).compute(), stiffness(ds, block_size=1000).compute())


def test_mean_pairwise_cosine(ds):
    xr.testing.assert_allclose(
        mean_pairwise_cosine(ds).compute(), stiffness(ds).cos_global.compute().rename("mean_pairwise_cosine")
    )


def test_gradient_confusion_close_to_exact(store, ds):
    conf = gradient_confusion(ds, quantiles=(0.05, 0.5), block_size=7).compute()
    for t in range(3):
        cos, _ = _exact(store, t)
        assert conf.min_cos.values[t] == pytest.approx(cos.min(), abs=ATOL_ONE)
        np.testing.assert_allclose(conf.cos_quantile.values[t], np.quantile(cos, [0.05, 0.5]), atol=ATOL_ONE)
        assert conf.frac_negative.values[t] == pytest.approx((cos < 0).mean(), abs=0.1)


def test_class_stiffness_close_to_exact(store, ds):
    cs = class_stiffness(ds, block_size=6).compute()
    assert cs.dims == ("step", "class_i", "class_j")
    G, labels = store.batch.flat(0), store.batch.labels[0]
    n = G / np.linalg.norm(G, axis=1, keepdims=True)
    C = n @ n.T
    np.fill_diagonal(C, np.nan)
    for a in range(3):
        for b in range(3):
            block = C[np.ix_(labels == a, labels == b)]
            assert cs.values[0, a, b] == pytest.approx(np.nanmean(block), abs=ATOL_MEAN)
    np.testing.assert_allclose(cs.values, np.swapaxes(cs.values, 1, 2))
    sign = class_stiffness(ds, kind="sign").compute()
    assert np.nanmax(np.abs(sign.values)) <= 1


def test_dask_equals_numpy(ds):
    eager = ds.compute()
    xr.testing.assert_allclose(stiffness(ds).compute(), stiffness(eager))
    xr.testing.assert_allclose(gradient_confusion(ds).compute(), gradient_confusion(eager))
    xr.testing.assert_allclose(class_stiffness(ds).compute(), class_stiffness(eager))
    xr.testing.assert_allclose(metrics_summary(ds).compute(), metrics_summary(eager))


def test_needs_sketches(tmp_path):
    data = build_store(tmp_path / "p.zarr", random_gradients(np.random.default_rng(0), n_steps=2, m=3, sizes=(2,)))
    ds = open_store(data.path)
    with pytest.raises(ValueError, match="sketch"):
        stiffness(ds)
    summary = metrics_summary(ds).compute()
    assert "cos_global" not in summary and "m_coherence" in summary


def test_bad_arguments(ds):
    with pytest.raises(ValueError):
        gradient_confusion(ds, quantiles=(1.5,))
    with pytest.raises(ValueError):
        class_stiffness(ds, kind="dot")
    with pytest.raises(ValueError):
        stiffness(ds, block_size=0)
