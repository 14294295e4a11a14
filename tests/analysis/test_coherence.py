"""Store-level m-coherence against NumPy on the full gradients the store was built from."""

from __future__ import annotations

import dask.array
import numpy as np
import pytest
import xarray as xr
from gradcoh.analysis import (
    alpha,
    coherence_parts,
    debiased_alpha,
    gradient_diversity,
    layer_weights,
    m_coherence,
    noise_scale,
    open_store,
)
from gradcoh.analysis.kernels import m_coherence_from_gradients as mcoh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storefactory import build_store, random_gradients
from tolerance import assert_close

K = 512  # sketch width per layer: ‖Σs‖² has relative sd ≈ sqrt(2/k) ≈ 0.06, so rtol 0.25 is > 4 sd
TERMS = 20 * (12 + 30 + 7)  # gradient entries per step of the store: every float64 sum below is at most this long


def close64(actual, expected, m, n=TERMS):
    """The analysis against NumPy on the same float64 gradients: two sums of at most ``n`` terms each. An
    m-coherence is compared against ``m``, the size of its numerator's terms relative to the denominator
    ((Σ‖gᵢ‖)² ≤ m Σ‖gᵢ‖²), so a cancelling numerator is not held to its own small value."""
    assert_close(actual, expected, n=2 * n, dtype="float64", scale=m)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(3)
    grads = random_gradients(rng, n_steps=4, m=20, sizes=(12, 30, 7), short_step=(1, 13))
    labels = [rng.integers(0, 3, size=len(s[0])) for s in grads]
    groups = [(rng.random(len(s[0])) < 0.3).astype(np.int64) for s in grads]
    return build_store(
        tmp_path_factory.mktemp("coh") / "run.zarr",
        grads,
        labels=labels,
        groups=groups,
        group_names=("clean", "noisy"),
        layer_names=("conv1", "block.fc", "head"),
        sketch_dim=K,
        extra_steps=1,
    )


@pytest.fixture(scope="module")
def ds(store):
    return open_store(store.path)


def _per_step(store, fn):
    return np.array([fn(t) for t in range(len(store.batch.grads))])


def test_exact_network_value(store, ds):
    expected = _per_step(store, lambda t: mcoh(store.batch.flat(t)))
    got = m_coherence(ds)
    assert got.dims == ("step",)
    close64(got.values, expected, got["m"].values)
    np.testing.assert_array_equal(got["m"].values, [20, 13, 20, 20])


def test_per_layer_and_weighted_average_identity(store, ds):
    per = m_coherence(ds, per_layer=True)
    assert per.dims == ("step", "layer")
    assert list(per.layer.values) == ["conv1", "block.fc", "head"]  # depth order kept
    expected = _per_step(store, lambda t: [mcoh(g) for g in store.batch.grads[t]])
    close64(per.values, expected, per["m"].values[:, None])
    weights = layer_weights(ds)
    assert_close(weights.sum("layer").values, 1.0, n=2 * 3, dtype="float64")  # three layers' shares
    close64((weights * per).sum("layer").values, m_coherence(ds).values, per["m"].values)


def test_network_total_is_ratio_of_sums_not_mean(ds):
    per = m_coherence(ds, per_layer=True)
    assert not np.allclose(per.mean("layer").values, m_coherence(ds).values)


def test_by_group_equals_direct_subset(store, ds):
    got = m_coherence(ds, by="group")
    assert got.dims == ("step", "group") and list(got.group.values) == ["clean", "noisy"]
    for t, groups in enumerate(store.batch.groups):
        for a in range(2):
            close64(got.values[t, a], mcoh(store.batch.flat(t)[groups == a]), got["m"].values[t, a])
            assert int(got["m"].values[t, a]) == (groups == a).sum()


def test_by_group_per_layer(store, ds):
    got = m_coherence(ds, by="group", per_layer=True)
    assert got.dims == ("step", "layer", "group")
    g = store.batch.grads[2][1][store.batch.groups[2] == 1]
    value = got.sel(layer="block.fc", group="noisy")
    close64(value.values[2], mcoh(g), value["m"].values[2])


def test_sketch_source_close_to_exact(ds):
    exact, sketch = m_coherence(ds), m_coherence(ds, source="sketch")
    assert sketch.attrs["numerator_source"] == "sketch"
    np.testing.assert_allclose(sketch.values, exact.values, rtol=0.25)


def test_by_label_from_sketches(store, ds):
    got = m_coherence(ds, by="label")
    assert got.dims == ("step", "label") and list(got.label.values) == [0, 1, 2]
    assert got.attrs["numerator_source"] == "sketch"
    xr.testing.assert_identical(m_coherence(ds, by="label", source="sketch"), got)
    for t, labels in enumerate(store.batch.labels):
        for c in range(3):
            expected = mcoh(store.batch.flat(t)[labels == c])
            assert got.values[t, c] == pytest.approx(expected, rel=0.25)


def test_by_bool_and_int_masks(store, ds):
    big = (ds.sq_norm.sum("layer") > ds.sq_norm.sum("layer").median("example")).rename("big")
    got = m_coherence(ds, by=big)
    assert list(got.group.values) == ["big"]
    mask0 = big.values[0][: len(store.batch.labels[0])]
    assert got.values[0, 0] == pytest.approx(mcoh(store.batch.flat(0)[mask0]), rel=0.25)
    by_int = m_coherence(ds, by=ds.label.reset_coords(drop=True))
    xr.testing.assert_allclose(by_int, m_coherence(ds, by="label").rename(label="group"))


def test_layer_selection(store, ds):
    got = m_coherence(ds, layers=["conv*", r"he.d"])
    expected = _per_step(store, lambda t: mcoh(store.batch.flat(t, layers=[0, 2])))
    close64(got.values, expected, got["m"].values)
    assert list(m_coherence(ds, per_layer=True, layers="head|conv1").layer.values) == ["conv1", "head"]
    with pytest.raises(ValueError, match="no layer matches"):
        m_coherence(ds, layers="nothing*")


def test_derived_quantities(store, ds):
    coh = m_coherence(ds).values
    m = np.array([20, 13, 20, 20])
    assert_close(alpha(ds).values, coh / m, n=2, dtype="float64")  # one division each
    assert_close(debiased_alpha(ds).values, (coh - 1) / (m - 1), n=4, dtype="float64", scale=coh / (m - 1))
    diversity = _per_step(store, lambda t: (store.batch.flat(t) ** 2).sum() / np.sum(store.batch.flat(t).sum(0) ** 2))
    close64(gradient_diversity(ds).values, diversity, m * diversity)  # 1/coh: relative error m times coh's

    def b_simple(t):
        G = store.batch.flat(t)
        mu = G.mean(0)
        return ((G - mu) ** 2).sum(1).mean() / (mu @ mu)

    want = _per_step(store, b_simple)
    close64(noise_scale(ds).values, want, m * (want + 1))  # B = m/coh − 1: m times the diversity's error
    assert noise_scale(ds)["m"].dims == ("step",)


def test_parts_are_additive(ds):
    parts = coherence_parts(ds).compute()
    assert set(parts.data_vars) == {"numerator", "denominator", "m"}


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"per_layer": True}, {"by": "group"}, {"by": "label", "per_layer": True}, {"source": "sketch"}],
)
def test_dask_equals_numpy(ds, kwargs):
    lazy = m_coherence(ds, **kwargs)
    assert isinstance(lazy.data, dask.array.Array)
    eager = ds.compute()  # a NumPy-backed copy (load() would mutate the shared fixture)
    xr.testing.assert_allclose(lazy.compute(), m_coherence(eager, **kwargs))


def test_bad_arguments(ds, tmp_path):
    with pytest.raises(ValueError, match="source"):
        m_coherence(ds, source="approx")
    with pytest.raises(ValueError, match="by must be"):
        m_coherence(ds, by="colour")
    plain = build_store(tmp_path / "p.zarr", random_gradients(np.random.default_rng(0), n_steps=2, m=3, sizes=(2,)))
    with pytest.raises(ValueError, match="no sketches"):
        m_coherence(open_store(plain.path), by="label")


@pytest.mark.parametrize("by", ["label", "mask"])
def test_exact_subset_without_exact_sums_raises(ds, by):
    """The store has exact subset sums only for the logger's groups: asking them for labels is never estimated."""
    subset = ds.label.reset_coords(drop=True) if by == "mask" else by
    with pytest.raises(ValueError, match=r"no exact value.*source='sketch'.*by='group'"):
        m_coherence(ds, by=subset, source="exact")
    assert m_coherence(ds, by="group", source="exact").attrs["numerator_source"] == "exact"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 9),
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    steps=st.integers(1, 3),
    seed=st.integers(0, 100),
)
def test_shapes_vary(tmp_path_factory, m, sizes, steps, seed):
    grads = random_gradients(np.random.default_rng(seed), n_steps=steps, m=m, sizes=sizes)
    data = build_store(tmp_path_factory.mktemp("h") / "s.zarr", grads)
    got = m_coherence(open_store(data.path)).values
    expected = [mcoh(data.batch.flat(t)) for t in range(steps)]
    close64(got, expected, m, n=m * sum(sizes))
