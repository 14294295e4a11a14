"""open_store: laziness, trimming to committed steps, coordinates, attributes, URLs and clear errors."""

from __future__ import annotations

import uuid

import dask.array
import numpy as np
import pytest
import xarray as xr
import zarr
from gradcoh.analysis import describe_store, open_store
from gradcoh.analysis.io import StoreNotFoundError, StreamNotFoundError
from gradcoh.logger import schema
from storefactory import build_store, random_gradients
from zarr.storage import FsspecStore


def _tiny(path, **kw):
    grads = random_gradients(np.random.default_rng(0), n_steps=3, m=4, sizes=(3, 2))
    return build_store(path, grads, **kw)


def test_lazy_dask_backed_with_coords_and_attrs(small_store):
    ds = open_store(small_store.path)
    assert isinstance(ds.sq_norm.data, dask.array.Array)
    assert isinstance(ds.sketch.data, dask.array.Array)
    for name in schema.NON_INDEX_COORDS:
        assert name in schema.OPTIONAL or (name in ds.coords and name not in ds.data_vars)
    assert ds.attrs[schema.FORMAT_KEY] == schema.FORMAT_VERSION
    assert ds.attrs[schema.CONFIG_KEY]["sketch_dim"] == 64
    assert ds.attrs["stream"] == "batch"
    assert list(ds.layer.values) == small_store.layer_names


def test_trims_to_committed_steps(small_store):
    raw = zarr.open_group(str(small_store.path), mode="r")["batch"]["sum_sq_norm"]
    ds = open_store(small_store.path)
    assert raw.shape[0] == 7  # 5 committed + 2 junk rows
    assert ds.sizes["step"] == 5
    assert list(ds.step.values) == small_store.batch.steps
    assert float(ds.sum_sq_norm.max()) < 1e29  # junk rows are gone


def test_committed_smaller_than_written(tmp_path):
    data = _tiny(tmp_path / "s.zarr", committed=2)
    ds = open_store(data.path)
    assert ds.sizes["step"] == 2


def test_padding_marked(small_store):
    ds = open_store(small_store.path).load()
    short = ds.isel(step=3)
    assert int(short.n_examples) == 9
    assert (short.index.values[9:] == -1).all()
    assert np.isnan(short.sq_norm.values[9:]).all()


def test_probe_stream_and_chunks(small_store):
    ds = open_store(small_store.path, stream="probe", chunks={"step": 4})
    assert ds.sizes["step"] == 3 and ds.sq_norm.chunks[0] == (3,)


def test_missing_path(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no such store"):
        open_store(tmp_path / "nope.zarr")


def test_plain_directory_is_not_a_zarr_store(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("hi")
    with pytest.raises(schema.FormatError, match="not a zarr store"):
        open_store(tmp_path / "d")


def test_zarr_but_not_gradcoh(tmp_path):
    zarr.open_group(tmp_path / "z.zarr", mode="w", zarr_format=3).attrs["x"] = 1
    with pytest.raises(schema.FormatError, match="not a gradcoh store"):
        open_store(tmp_path / "z.zarr")


def test_missing_format_key(tmp_path):
    _tiny(tmp_path / "s.zarr", format_version=None)
    with pytest.raises(schema.FormatError, match="not a gradcoh store"):
        open_store(tmp_path / "s.zarr")


def test_newer_format_refused(tmp_path):
    _tiny(tmp_path / "s.zarr", format_version=schema.FORMAT_VERSION + 1)
    with pytest.raises(schema.FormatError, match=r"newer gradcoh.*upgrade"):
        open_store(tmp_path / "s.zarr")


def test_missing_stream_names_existing(tmp_path):
    _tiny(tmp_path / "s.zarr")
    with pytest.raises(StreamNotFoundError, match=r"'probe'.*streams present: batch"):
        open_store(tmp_path / "s.zarr", stream="probe")


def test_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        open_store(tmp_path / "nope.zarr")


def test_memory_url():
    import fsspec

    root = f"gradcoh-io-{uuid.uuid4().hex}"  # the memory filesystem is shared by every test of the process
    try:
        store = FsspecStore.from_url(f"memory://{root}/run.zarr", read_only=False)
        _tiny(store)
        ds = open_store(f"memory://{root}/run.zarr")
        assert ds.sizes["step"] == 3
        with pytest.raises(StoreNotFoundError):
            open_store(f"memory://{root}/missing.zarr")
    finally:
        fsspec.filesystem("memory").rm(f"/{root}", recursive=True)


def test_file_url(tmp_path):
    _tiny(tmp_path / "s.zarr")
    ds = open_store(f"file://{tmp_path / 's.zarr'}")
    xr.testing.assert_identical(ds.load(), open_store(tmp_path / "s.zarr").load())


def test_storage_options_only_for_urls(tmp_path):
    _tiny(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="storage_options"):
        open_store(tmp_path / "s.zarr", storage_options={"anon": True})


def test_describe_store(small_store):
    info = describe_store(small_store.path)
    assert info["format_version"] == schema.FORMAT_VERSION
    assert [layer["name"] for layer in info["layers"]] == small_store.layer_names
    batch = info["streams"]["batch"]
    assert batch["committed_steps"] == 5 and batch["m_min"] == 9 and batch["m_max"] == 12
    assert batch["groups"] == ["clean", "corrupted"] and batch["has_sketch"]
    assert set(info["streams"]) == {"batch", "probe"}
