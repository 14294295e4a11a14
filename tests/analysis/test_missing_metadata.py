"""Stores logged without ``index=``/``labels=``: padding is decided by position, missing labels warn.

The same small model is logged twice on the same data and weights, once with ``index``, ``labels`` and ``group``
and once with ``group`` only; the last step is short, so both stores are padded. Everything that does not need
labels must agree between the two stores, and ``by="label"`` on the label-less store must warn naming ``labels=``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
import zarr
from gradcoh import analysis
from gradcoh.analysis import MissingMetadataWarning, open_store, valid_examples
from gradcoh.cli.main import app
from gradcoh.logger import schema
from storefactory import build_store, random_gradients
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

N_STEPS, BATCH, LAST = 4, 12, 7  # the last step is short: positions 7..11 are padding
GROUPS = ("clean", "noisy")
SKETCH = 32
STIFFNESS_BY_LABEL = ("cos_within", "cos_between", "sign_within", "sign_between")


def _log(path, *, metadata: bool):
    """Train a tiny MLP for N_STEPS SGD steps, logging every step; identical runs apart from the metadata."""
    from gradcoh.logger import GradientLogger

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    n = BATCH * (N_STEPS - 1) + LAST
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    with GradientLogger(model, path, sketch_dim=SKETCH, groups=GROUPS) as glog:
        start = 0
        for step in range(N_STEPS):
            idx = torch.arange(start, start + (LAST if step == N_STEPS - 1 else BATCH))
            start += len(idx)
            meta = {"group": (idx % 3 == 0).long()}  # both groups at every step
            if metadata:
                meta |= {"index": idx, "labels": y[idx]}
            with glog.record(step, **meta):
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("metadata")
    return _log(base / "full.zarr", metadata=True), _log(base / "bare.zarr", metadata=False)


@pytest.fixture(scope="module")
def full(stores):
    return open_store(stores[0])


@pytest.fixture(scope="module")
def bare(stores):
    return open_store(stores[1])


def _expected_group_sizes() -> np.ndarray:
    sizes = [BATCH] * (N_STEPS - 1) + [LAST]
    starts = np.cumsum([0, *sizes[:-1]])
    noisy = [int(((np.arange(s, s + m) % 3) == 0).sum()) for s, m in zip(starts, sizes, strict=True)]
    return np.array([[m - k, k] for m, k in zip(sizes, noisy, strict=True)])


def test_stores_differ_only_in_metadata(full, bare):
    assert list(bare.n_examples.values) == [BATCH] * (N_STEPS - 1) + [LAST]
    assert bare.sizes["example"] == BATCH
    assert (bare.index.values == -1).all() and (bare.label.values == -1).all()
    assert (full.index.values[:-1] >= 0).all() and (full.index.values[-1, LAST:] == -1).all()
    np.testing.assert_array_equal(full.sq_norm.values, bare.sq_norm.values)


def test_valid_examples_by_position(bare):
    expected = np.ones((N_STEPS, BATCH), bool)
    expected[-1, LAST:] = False
    mask = valid_examples(bare)
    assert mask.dims == ("step", "example")
    np.testing.assert_array_equal(mask.values, expected)


ANALYSES = {
    "m_coherence": lambda ds: analysis.m_coherence(ds),
    "m_coherence_per_layer": lambda ds: analysis.m_coherence(ds, per_layer=True),
    "m_coherence_by_group": lambda ds: analysis.m_coherence(ds, by="group"),
    "m_coherence_by_group_per_layer": lambda ds: analysis.m_coherence(ds, by="group", per_layer=True),
    "m_coherence_by_group_sketch": lambda ds: analysis.m_coherence(ds, by="group", source="sketch"),
    "m_coherence_sketch": lambda ds: analysis.m_coherence(ds, source="sketch"),
    "m_coherence_by_mask": lambda ds: analysis.m_coherence(ds, by=(ds.group == 1).reset_coords(drop=True)),
    "alpha": lambda ds: analysis.alpha(ds, by="group"),
    "debiased_alpha": lambda ds: analysis.debiased_alpha(ds, by="group"),
    "gradient_diversity": lambda ds: analysis.gradient_diversity(ds, by="group"),
    "noise_scale": lambda ds: analysis.noise_scale(ds),
    "coherence_parts": lambda ds: analysis.coherence_parts(ds, by="group"),
    "layer_weights": lambda ds: analysis.layer_weights(ds),
    "membership": lambda ds: analysis.membership(ds, "group"),
    "cross_group_benefit": lambda ds: analysis.cross_group_benefit(ds),
    "cg_fractions": lambda ds: analysis.cg_fractions(ds),
    "pair_statistics_by_group": lambda ds: analysis.pair_statistics(ds, by="group", bins=50),
    "stiffness_by_group": lambda ds: analysis.stiffness(ds, by="group"),
    "class_stiffness_by_group": lambda ds: analysis.class_stiffness(ds, by="group"),
    "mean_pairwise_cosine": lambda ds: analysis.mean_pairwise_cosine(ds),
    "gradient_confusion": lambda ds: analysis.gradient_confusion(ds, bins=50),
    "valid_examples": lambda ds: valid_examples(ds),
}


@pytest.mark.parametrize("name", sorted(ANALYSES))
def test_same_results_without_index_and_labels(full, bare, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingMetadataWarning)  # nothing here needs labels or indices
        want, got = ANALYSES[name](full).compute(), ANALYSES[name](bare).compute()
    xr.testing.assert_equal(got, want)  # the same float64 operations on the same values: equal bit for bit
    values = got.to_array() if isinstance(got, xr.Dataset) else got
    assert values.size and not values.isnull().all(), "all NaN"


def test_m_counts_real_examples_only(bare):
    by_group = analysis.m_coherence(bare, by="group").compute()
    np.testing.assert_array_equal(by_group["m"].values, _expected_group_sizes())
    assert np.isfinite(by_group.values).all()
    whole = analysis.m_coherence(bare).compute()
    np.testing.assert_array_equal(whole["m"].values, bare.n_examples.values)
    # ordered pairs i ≠ j among the real examples only (the padding of the short step has no sketch)
    pairs = analysis.pair_statistics(bare, by="group", bins=10).compute()
    m = bare.n_examples.values
    np.testing.assert_array_equal(pairs["stats"].sel(stat="n_all").values, m * (m - 1))


def test_metrics_summary_warns_once_and_keeps_label_free_metrics(full, bare):
    want = analysis.metrics_summary(full).compute()
    with pytest.warns(MissingMetadataWarning, match=r"labels= to GradientLogger\.record\(\)") as record:
        got = analysis.metrics_summary(bare).compute()
    assert sum(issubclass(w.category, MissingMetadataWarning) for w in record) == 1
    assert "metrics_summary" in str(record[0].message)
    label_free = [v for v in want.data_vars if v not in STIFFNESS_BY_LABEL]
    xr.testing.assert_equal(got[label_free], want[label_free])  # the same float64 operations: bit for bit
    assert got[list(STIFFNESS_BY_LABEL)].to_array().isnull().all()
    assert want[list(STIFFNESS_BY_LABEL)].to_array().notnull().all()


def test_by_label_needs_labels(full, bare):
    assert analysis.m_coherence(full, by="label").sizes["label"] == 3
    with pytest.warns(MissingMetadataWarning, match=r"by='label'.*labels=") as record:
        coh = analysis.m_coherence(bare, by="label").compute()
    assert sum(issubclass(w.category, MissingMetadataWarning) for w in record) == 1
    assert record[0].filename == __file__  # points at the caller, not at gradcoh internals
    assert coh.sizes["label"] == 0


@pytest.mark.parametrize(
    ("fn", "kwargs", "what"),
    [
        (analysis.stiffness, {}, "stiffness"),
        (analysis.pair_statistics, {"bins": 10}, "pair_statistics"),
        (analysis.class_stiffness, {}, "class_stiffness"),
        (analysis.stiffness, {"by": "true_label"}, "true_labels="),
    ],
)
def test_pairwise_by_label_warns(bare, fn, kwargs, what):
    with pytest.warns(MissingMetadataWarning, match="labels=") as record:
        fn(bare, **kwargs).compute()
    assert sum(issubclass(w.category, MissingMetadataWarning) for w in record) == 1
    assert what in str(record[0].message)


def test_label_free_pairwise_metrics_do_not_warn(bare):
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingMetadataWarning)
        assert analysis.mean_pairwise_cosine(bare).notnull().all()
        assert analysis.gradient_confusion(bare, bins=20)["min_cos"].notnull().all()


def test_export_tensorboard_by_group(full, bare, tmp_path):
    pytest.importorskip("tensorboard")
    n_full = analysis.export_tensorboard(full, tmp_path / "full", by="group")
    n_bare = analysis.export_tensorboard(bare, tmp_path / "bare", by="group")
    assert n_full == n_bare == N_STEPS * len(GROUPS)


def test_padding_junk_is_ignored(tmp_path):
    """Metadata values at padding positions do not matter: only ``example < n_examples`` does."""
    rng = np.random.default_rng(5)
    grads = random_gradients(rng, n_steps=3, m=6, sizes=(4, 3), short_step=(1, 4))
    groups = [rng.integers(0, 2, size=len(s[0])) for s in grads]
    data = build_store(tmp_path / "s.zarr", grads, groups=groups, group_names=("a", "b"), sketch_dim=16)
    before = analysis.m_coherence(open_store(data.path), by="group").compute()
    stream = zarr.open_group(str(data.path), mode="r+")["batch"]
    for name in (schema.INDEX, schema.LABEL, schema.GROUP):  # junk where the writer put −1
        values = stream[name][...]
        values[1, 4:] = 0
        stream[name][...] = values
    after = analysis.m_coherence(open_store(data.path), by="group").compute()
    xr.testing.assert_identical(after, before)
    np.testing.assert_array_equal(after["m"].values.sum(1), [6, 4, 6])


def test_cli_coherence_by_group_without_index(full, bare, stores):
    runner = CliRunner()
    result = runner.invoke(app, ["coherence", str(stores[1]), "--by", "group", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "nan" not in result.stdout.lower()
    rows = [line.split(",") for line in result.stdout.strip().splitlines()]
    assert rows[0] == ["step", "group", "m", "m_coherence"]
    values = np.array([float(r[3]) for r in rows[1:]])
    assert values.size == N_STEPS * len(GROUPS) and np.isfinite(values).all()
    expected = analysis.m_coherence(full, by="group").compute()
    np.testing.assert_array_equal(values, expected.values.ravel())  # CSV writes repr, which round-trips
    np.testing.assert_array_equal([int(r[2]) for r in rows[1:]], _expected_group_sizes().ravel())
    table = runner.invoke(app, ["coherence", str(stores[1]), "--by", "group"])
    assert table.exit_code == 0 and "NaN" not in table.stdout


def test_cli_coherence_by_label_warns(stores):
    with pytest.warns(MissingMetadataWarning, match="labels="):
        result = CliRunner().invoke(app, ["coherence", str(stores[1]), "--by", "label"])
    assert result.exit_code == 0, result.output


def test_multi_process_store_pads_per_rank(tmp_path):
    """Each rank's padding sits inside its block of the example axis; its own n_examples decides it."""
    rng = np.random.default_rng(9)
    path = tmp_path / "ddp.zarr"
    zarr.open_group(str(path), mode="w", zarr_format=3)
    ranks = []
    for rank, short in enumerate([(1, 3), None]):  # rank 0 is short at step 1: padding in the middle
        grads = random_gradients(rng, n_steps=3, m=5, sizes=(4, 3), short_step=short)
        groups = [rng.integers(0, 2, size=len(s[0])) for s in grads]
        ranks.append(build_store(path / schema.rank_group(rank), grads, groups=groups, group_names=("a", "b"),
                                 sketch_dim=8))
    root = zarr.open_group(str(path), mode="a")
    root.attrs.update({**zarr.open_group(str(path / "rank-00000")).attrs.asdict(), schema.WORLD_SIZE_KEY: 2})
    ds = open_store(path)
    expected = np.ones((3, 10), bool)
    expected[1, 3:5] = False
    np.testing.assert_array_equal(valid_examples(ds).values, expected)
    m = analysis.m_coherence(ds, by="group")["m"].values
    counts = [[sum(int((r.batch.groups[t] == k).sum()) for r in ranks) for k in (0, 1)] for t in range(3)]
    np.testing.assert_array_equal(m, counts)
    pairs = analysis.pair_statistics(ds, by="group", bins=10)["stats"].sel(stat="n_all").values
    np.testing.assert_array_equal(pairs, [90, 56, 90])
