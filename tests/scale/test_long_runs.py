"""Long runs (issue 28): per-array chunks sized by bytes, per-step sums, lazy graphs, O(1) opening.

Every value is checked against NumPy on the raw zarr arrays (float64 sums of at most m·L terms: relative error
≤ m·L·2⁻⁵³ ≈ 1e-13 here; the tolerance 1e-12 leaves room for both summation orders).
"""

from __future__ import annotations

from typing import ClassVar

import make_synthetic_store  # scripts/ is on the path (conftest.py)
import numpy as np
import pytest
import zarr
import zarr.storage
from gradcoh import analysis
from gradcoh.analysis.coherence import coherence_family
from gradcoh.analysis.io import TASK_BYTES, task_steps
from gradcoh.logger import schema
from gradcoh.logger.schema import CHUNK_TARGET_BYTES, MAX_STEPS_PER_CHUNK, steps_per_chunk

RTOL = 1e-12


def _spec(steps: int) -> make_synthetic_store.Spec:
    return make_synthetic_store.Spec(steps=steps, m=24, layers=((4, 4), (3, 5), (2, 2)), sketch_dim=16,
                                     groups=("clean", "corrupted"), seed=5)


@pytest.fixture(scope="module")
def long_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "long.zarr"
    make_synthetic_store.make_synthetic_store(str(path), _spec(300))
    return path


@pytest.fixture(scope="module")
def short_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("short") / "short.zarr"
    make_synthetic_store.make_synthetic_store(str(path), _spec(3))
    return path


def test_chunk_rule(monkeypatch):
    """The rule at the product's 4 MiB target (tests/conftest.py sets 64 KiB through ``GRADCOH_CHUNK_BYTES``)."""
    assert schema.chunk_target_bytes({}) == 4 * 2**20
    assert schema.chunk_target_bytes({schema.CHUNK_BYTES_ENV: "65536"}) == 65536
    for bad in ("0", "-5", "4MiB"):
        with pytest.raises(ValueError, match=schema.CHUNK_BYTES_ENV):
            schema.chunk_target_bytes({schema.CHUNK_BYTES_ENV: bad})
    for target in (schema.chunk_target_bytes({}), CHUNK_TARGET_BYTES):
        monkeypatch.setattr(schema, "CHUNK_TARGET_BYTES", target)
        assert steps_per_chunk(10**9) == 1
        for step_bytes in (100, 1000, 4096, 262_144, 3 * 2**20):
            n = steps_per_chunk(step_bytes)
            assert n & (n - 1) == 0
            assert n == 1 if step_bytes > target else n * step_bytes <= target < 2 * n * step_bytes
    monkeypatch.setattr(schema, "CHUNK_TARGET_BYTES", schema.chunk_target_bytes({}))
    assert steps_per_chunk(8) == MAX_STEPS_PER_CHUNK
    assert task_steps(8, 65536, 40_000) == 65536  # one task for a small array, whatever the step count
    assert task_steps(2**20, 1, 10_000) == TASK_BYTES // 2**20
    assert task_steps(2**20, 16, 10_000) % 16 == 0


def test_each_array_chunked_by_its_own_bytes(long_store):
    batch = zarr.open_group(str(long_store), mode="r")[schema.STREAM_BATCH]
    assert batch.attrs[schema.COMMITTED_KEY] == 300
    for name in schema.VARIABLES:
        if name in batch:
            arr = batch[name]
            step_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
            assert arr.chunks[0] == steps_per_chunk(step_bytes), name
    # small arrays hold the whole run in one chunk; the sketch is the largest per step
    assert batch[schema.N_EXAMPLES].chunks[0] >= 300
    assert batch[schema.SKETCH].chunks[0] < batch[schema.SQ_NORM].chunks[0] < batch[schema.INDEX].chunks[0]


def test_stored_per_step_sums_equal_numpy(long_store):
    batch = zarr.open_group(str(long_store), mode="r")[schema.STREAM_BATCH]
    sq, group = batch[schema.SQ_NORM][:], batch[schema.GROUP][:]
    np.testing.assert_allclose(batch[schema.SQ_NORM_TOTAL][:], np.nansum(sq, axis=1), rtol=RTOL)
    for a in range(2):
        member = (group == a)[:, :, None]
        np.testing.assert_allclose(batch[schema.GROUP_SQ_NORM][:, :, a], np.where(member, sq, 0).sum(1), rtol=RTOL)
        np.testing.assert_array_equal(batch[schema.GROUP_COUNT][:, a], (group == a).sum(1))


def _numpy_coherence(path, by):
    batch = zarr.open_group(str(path), mode="r")[schema.STREAM_BATCH]
    sq = np.nan_to_num(batch[schema.SQ_NORM][:])
    if by is None:
        return batch[schema.SUM_SQ_NORM][:].sum(1) / sq.sum((1, 2))
    gram, group = batch[schema.GROUP_GRAM][:], batch[schema.GROUP][:]
    return np.stack([gram[:, :, a, a].sum(1) / np.where((group == a)[:, :, None], sq, 0).sum((1, 2))
                     for a in range(gram.shape[2])], axis=-1)


@pytest.mark.parametrize("by", [None, "group"])
def test_values_with_and_without_stored_sums(long_store, tmp_path, by):
    """Format 3 uses the stored sums; a store without them (format 2) sums sq_norm: both equal NumPy."""
    want = _numpy_coherence(long_store, by)
    ds = analysis.open_store(long_store)
    coh = analysis.m_coherence(ds, by=by)
    np.testing.assert_allclose(coh.values, want, rtol=RTOL)
    np.testing.assert_array_equal(coh.m.values, ds.n_examples.values if by is None else ds.group_count.values)
    old = tmp_path / "format2.zarr"
    import shutil

    shutil.copytree(long_store, old)
    root = zarr.open_group(str(old), mode="r+")
    root.attrs[schema.FORMAT_KEY] = 2
    for name in schema.PER_STEP_SUMS:
        del root[schema.STREAM_BATCH][name]
    old_coh = analysis.m_coherence(analysis.open_store(old), by=by)
    np.testing.assert_allclose(old_coh.values, want, rtol=RTOL)
    np.testing.assert_array_equal(old_coh.m.values, coh.m.values)


class _Counting(zarr.storage.LocalStore):
    reads: ClassVar[list[str]] = []

    async def get(self, key, *args, **kwargs):
        _Counting.reads.append(key)
        return await super().get(key, *args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setattr("gradcoh.analysis.io.LocalStore", _Counting)
    _Counting.reads = []
    return _Counting.reads


def test_open_store_reads_a_constant_number_of_objects(short_store, long_store, counted):
    analysis.open_store(short_store)
    short = list(counted)
    counted.clear()
    analysis.open_store(long_store)
    assert len(counted) == len(short), (short, list(counted))
    assert sum("/c/" in k for k in counted) <= 4  # the step coordinate (and static coordinates), one object each


@pytest.mark.parametrize("kwargs", [{}, {"per_layer": True}, {"by": "group"}, {"by": "group", "source": "sketch"},
                                    {"source": "sketch"}])
def test_graph_building_reads_no_data(long_store, counted, kwargs):
    ds = analysis.open_store(long_store)
    counted.clear()
    coh = analysis.m_coherence(ds, **kwargs)
    fam = coherence_family(ds, **kwargs)
    assert not [k for k in counted if "/c/" in k], counted
    assert np.isfinite(coh.values).all() and np.isfinite(fam.alpha.values).all()
    assert [k for k in counted if "/c/" in k]


def test_tasks_grow_with_bytes_not_steps(short_store, long_store):
    def tasks(path, **kw):
        return len(analysis.m_coherence(analysis.open_store(path), **kw).data.__dask_graph__())

    for kw in ({}, {"by": "group"}):
        assert tasks(long_store, **kw) == tasks(short_store, **kw)  # 300 steps: one task per array and operation


def test_nonfinite_warning_comes_at_compute(long_store, tmp_path):
    import shutil
    import warnings

    path = tmp_path / "nan.zarr"
    shutil.copytree(long_store, path)
    finite = zarr.open_group(str(path), mode="r+")[schema.STREAM_BATCH][schema.FINITE]
    flags = finite[:]
    flags[7, 1] = False
    finite[:] = flags
    ds = analysis.open_store(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coh = analysis.m_coherence(ds)  # building reads nothing, so it cannot know yet
    with pytest.warns(RuntimeWarning, match=r"1 of 300 steps have non-finite gradient statistics .*steps 7\)"):
        values = coh.values
    assert np.isnan(values[7]) and np.isfinite(np.delete(values, 7)).all()
    with pytest.warns(RuntimeWarning):
        per_layer = analysis.m_coherence(ds, per_layer=True).values
    assert np.isnan(per_layer[7, 1]) and np.isfinite(per_layer[7, [0, 2]]).all()


def test_append_continues_a_partly_filled_chunk(tmp_path):
    """Append mode reloads the committed rows of every partly filled chunk and continues them exactly."""
    path = tmp_path / "appended.zarr"
    whole = tmp_path / "whole.zarr"
    make_synthetic_store.make_synthetic_store(str(whole), _spec(40))
    make_synthetic_store.make_synthetic_store(str(path), _spec(25), flush_secs=0.001)  # a commit every step
    spec = _spec(40)
    from gradcoh.logger.store import StreamWriter, open_run
    from gradcoh.logger.writer import AsyncWriter

    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    root = open_run(str(path), "append", attrs).root
    layers = attrs[schema.LAYERS_KEY]
    writer = AsyncWriter(lambda name: StreamWriter(root, name, layers, spec.groups, spec.sketch_dim,
                                                   spec.sketch_dtype), str(path), flush_secs=0.001)
    means = make_synthetic_store._means(spec)
    sketches = make_synthetic_store._projections(spec)
    for t in range(25, 40):
        writer.put(schema.STREAM_BATCH, make_synthetic_store.sample_step(spec, t, means, sketches))
    writer.close()
    a = zarr.open_group(str(path), mode="r")[schema.STREAM_BATCH]
    b = zarr.open_group(str(whole), mode="r")[schema.STREAM_BATCH]
    for name in schema.VARIABLES:
        if name in b and name != schema.WALL_TIME:
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def _numpy_pair_means(sketch: np.ndarray, n: int) -> tuple[float, float]:
    """The O(m²) definition on one step: means of cos and sign(cos) over ordered pairs i ≠ j (float64)."""
    rows = sketch[:n].reshape(n, -1).astype(np.float64)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = np.clip(unit @ unit.T, -1, 1)
    off = ~np.eye(n, dtype=bool)
    return cos[off].mean(), np.sign(cos[off]).mean()


def test_sampled_stiffness_within_stated_error_of_all_pairs(long_store):
    ds = analysis.open_store(long_store)
    est = analysis.sampled_stiffness(ds, steps=40, pairs=400, seed=1).compute()
    chosen = est.step.values
    assert len(chosen) == 40 and chosen[0] == 0 and chosen[-1] == 299
    batch = zarr.open_group(str(long_store), mode="r")[schema.STREAM_BATCH]
    sketch, n_ex = batch[schema.SKETCH], batch[schema.N_EXAMPLES][:]
    z_cos, z_sign = [], []
    for k, step in enumerate(chosen):
        cos, sign = _numpy_pair_means(sketch[int(step)], int(n_ex[step]))
        z_cos.append((est.stiffness.values[k] - cos) / est.stiffness_stderr.values[k])
        z_sign.append((est.sign_stiffness.values[k] - sign) / est.sign_stiffness_stderr.values[k])
    z_cos, z_sign = np.array(z_cos), np.array(z_sign)
    # Each z is ~N(0, 1) if the stated error is right: |z| < 5 always (false failure < 1e-5 over 80 draws), and the
    # spread of 40 z's within [0.6, 1.5] (chi-square with 39 d.o.f.: outside with probability < 1e-3).
    assert np.abs(z_cos).max() < 5 and np.abs(z_sign).max() < 5, (z_cos, z_sign)
    assert 0.6 < z_cos.std() < 1.5 and 0.6 < z_sign.std() < 1.5, (z_cos.std(), z_sign.std())
    np.testing.assert_array_equal(est.n_pairs.values, 400)
    # with many pairs the estimate converges to the exact all-pairs value of pairwise.stiffness
    exact = analysis.stiffness(ds.isel(step=[0, 150])).cos_global.values
    many = analysis.sampled_stiffness(ds.isel(step=[0, 150]), steps=None, pairs=200_000, seed=2)
    assert np.all(np.abs(many.stiffness.values - exact) < 5 * many.stiffness_stderr.values)
    assert np.all(many.stiffness_stderr.values < 0.002)
    again = analysis.sampled_stiffness(ds, steps=40, pairs=400, seed=1).compute()
    np.testing.assert_array_equal(again.stiffness.values, est.stiffness.values)  # seeded
