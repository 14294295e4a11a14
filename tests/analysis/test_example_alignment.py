"""example_alignment and rank_examples against NumPy on the full per-example gradients, and the figure."""

from __future__ import annotations

import numpy as np
import pytest
from gradcoh import analysis
from gradcoh.analysis import plots
from storefactory import aligned_store, build_store, random_gradients
from tolerance import assert_close


@pytest.fixture
def aligned(tmp_path):
    return aligned_store(tmp_path / "a.zarr")


def _cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def _close64(actual, want, grads, scale):
    """The analysis against NumPy on the same float64 gradients ``[m, P]``: two computations of sums over at most
    m·P products each; ``scale`` is the size of the terms (a cosine against Σ‖g‖/‖Σg‖, its conditioning)."""
    assert_close(actual, want, n=2 * grads.size, dtype="float64", scale=scale)


def test_example_alignment_normalisations_match_numpy(aligned):
    store, _, reference = aligned
    ds = analysis.open_store(store.path, stream="batch")  # Dask-backed
    per_layer = {n: analysis.example_alignment(ds, normalize=n).compute().values for n in ("cosine", "share", None)}
    net = analysis.example_alignment(ds, per_layer=False).compute().values
    ref = analysis.example_alignment(ds, reference=True, per_layer=False).compute().values
    for t, layers in enumerate(store.batch.grads):
        mt = len(layers[0])
        assert np.isnan(per_layer["cosine"][t, mt:]).all()  # padding
        for j, g in enumerate(layers):
            total = g.sum(0)
            norms, size = np.linalg.norm(g, axis=1), np.linalg.norm(g, axis=1).sum()  # ‖gᵢ‖ and Σ‖gⱼ‖ ≥ ‖G‖
            _close64(per_layer[None][t, :mt, j], g @ total, g, norms * size)
            _close64(per_layer["cosine"][t, :mt, j], [_cos(x, total) for x in g], g, size / np.linalg.norm(total))
            _close64(per_layer["share"][t, :mt, j], g @ total / (total @ total), g, norms * size / (total @ total))
        full, r = store.batch.flat(t), np.concatenate(reference)
        size = np.linalg.norm(full, axis=1).sum() / np.linalg.norm(full.sum(0))
        _close64(net[t, :mt], [_cos(x, full.sum(0)) for x in full], full, size)
        _close64(ref[t, :mt], [_cos(x, r) for x in full], full, 1.0)  # R is given: no cancelling sum


def test_rank_examples_matches_a_python_loop(aligned):
    store, index, _ = aligned
    ds = analysis.open_store(store.path, stream="batch")
    ranked = analysis.rank_examples(ds)
    seen: dict[int, list[float]] = {}
    size, terms = 0.0, 0
    for t, layers in enumerate(store.batch.grads):
        full = store.batch.flat(t)
        size = max(size, np.linalg.norm(full, axis=1).sum() / np.linalg.norm(full.sum(0)))  # a cosine's conditioning
        terms = max(terms, full.size)
        for e, x in enumerate(full):
            seen.setdefault(int(index[t, e]), []).append(_cos(x, full.sum(0)))
    assert sorted(ranked["index"].values.tolist()) == sorted(seen)
    means = ranked["mean_alignment"].values
    assert (np.diff(means) >= 0).all()  # most negative first
    for i in ranked["index"].values:
        row = ranked.sel(index=i)
        # a mean of cosines, each from at most ``terms`` products, over the steps the example was seen
        assert_close(float(row["mean_alignment"]), np.mean(seen[int(i)]), n=2 * (terms + len(seen[int(i)])),
                     dtype="float64", scale=size, err_msg="mean_alignment")
        assert float(row["negative_fraction"]) == np.mean(np.array(seen[int(i)]) < 0)  # a count over a count
        assert int(row["seen"]) == len(seen[int(i)])
    assert set(ranked["group_name"].values) <= {"clean", "corrupted"}
    frame = ranked.to_dataframe()
    assert list(frame.columns[:3]) == ["mean_alignment", "negative_fraction", "seen"]


def test_missing_variables_and_bad_arguments_are_clear(tmp_path, aligned):
    rng = np.random.default_rng(0)
    plain = build_store(tmp_path / "p.zarr", random_gradients(rng, n_steps=2, m=3, sizes=(2,)))
    ds = analysis.open_store(plain.path, stream="batch")
    with pytest.raises(ValueError, match="alignment=True"):
        analysis.example_alignment(ds)
    with pytest.raises(ValueError, match="reference="):
        analysis.example_alignment(ds, reference=True)
    with pytest.raises(ValueError, match="normalize"):
        analysis.example_alignment(analysis.open_store(aligned[0].path, stream="batch"), normalize="l2")


def test_alignment_figure(aligned):
    store, _, _ = aligned
    ds = analysis.open_store(store.path, stream="batch")
    data = {"G": analysis.example_alignment(ds, per_layer=False).compute()}
    fig = plots.plot_alignment(data, groups=["clean", "corrupted"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["clean: median", "clean: 25–75%", "corrupted: median", "corrupted: 25–75%"]
    with pytest.raises(plots.NothingToPlotError):
        plots.plot_alignment({})


def test_share_with_the_reference_keeps_each_examples_sign(aligned):
    store, _, reference = aligned
    ds = analysis.open_store(store.path, stream="batch")
    share = analysis.example_alignment(ds, normalize="share", reference=True, per_layer=False).compute().values
    r = np.concatenate(reference)
    for t in range(len(store.batch.grads)):
        full = store.batch.flat(t)
        dots = full @ r
        scale = np.linalg.norm(full, axis=1) * np.linalg.norm(r) / abs(dots.sum())  # Σ dots may cancel
        _close64(share[t, : len(full)], dots / abs(dots.sum()), full, scale * len(full))
        assert (np.sign(share[t, : len(full)]) == np.sign(dots)).all()
