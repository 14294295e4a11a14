"""Every analysis gives the same numbers on a distributed cluster as in one process, chunks follow the store."""

from __future__ import annotations

import math

import pytest
import xarray as xr
import zarr
from distributed import Client, LocalCluster
from gradcoh import analysis
from gradcoh.analysis.compact import compact_store
from gradcoh.logger import schema

ANALYSES = {
    "m_coherence_exact": lambda ds: analysis.m_coherence(ds),
    "m_coherence_sketch": lambda ds: analysis.m_coherence(ds, source="sketch"),
    "m_coherence_per_layer": lambda ds: analysis.m_coherence(ds, per_layer=True),
    "m_coherence_by_group": lambda ds: analysis.m_coherence(ds, by="group"),
    "m_coherence_by_label": lambda ds: analysis.m_coherence(ds, by="label", per_layer=True),
    "debiased_alpha_layers": lambda ds: analysis.debiased_alpha(ds, layers="layer[01]"),
    "stiffness": lambda ds: analysis.stiffness(ds, block_size=7),
    "gradient_confusion": lambda ds: analysis.gradient_confusion(ds, block_size=7, bins=50),
    "class_stiffness": lambda ds: analysis.class_stiffness(ds, block_size=7),
    "cg_fractions": lambda ds: analysis.cg_fractions(ds),
    "cg_fractions_per_layer": lambda ds: analysis.cg_fractions(ds, per_layer=True),
    "cross_group_benefit": lambda ds: analysis.cross_group_benefit(ds),
    "layer_weights": lambda ds: analysis.layer_weights(ds),
    "metrics_summary": lambda ds: analysis.metrics_summary(ds, block_size=7),
}


def _single_process(ds_path, fn):
    return fn(analysis.open_store(ds_path)).compute(scheduler="sync")


@pytest.fixture(scope="module")
def expected(rich_store):
    return {name: _single_process(rich_store.path, fn) for name, fn in ANALYSES.items()}


def test_every_analysis_on_a_two_worker_cluster(rich_store, thread_cluster, expected):
    with Client(thread_cluster) as client:
        ds = analysis.open_store(rich_store.path)
        lazy = {name: fn(ds) for name, fn in ANALYSES.items()}
        got = analysis.compute(lazy, progress=True)
        assert analysis.cluster.active_client() is client
    for name, value in got.items():
        xr.testing.assert_allclose(value, expected[name], rtol=1e-12, atol=0), name


def test_worker_processes_and_compacted_store(rich_store, tmp_path, expected):
    """Separate worker processes (everything pickled) reading a compacted, sharded store."""
    dst = tmp_path / "compact.zarr"
    compact_store(rich_store.path, dst, shard_bytes=4000)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster),
    ):
        ds = analysis.open_store(dst)
        names = ("m_coherence_by_group", "stiffness", "cross_group_benefit", "m_coherence_sketch")
        got = analysis.compute({n: ANALYSES[n](ds) for n in names})
    for name in names:
        xr.testing.assert_allclose(got[name], expected[name], rtol=1e-12, atol=0)


def test_cli_scheduler_option_and_env(rich_store, thread_cluster, monkeypatch):
    from gradcoh.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    base = runner.invoke(app, ["coherence", str(rich_store.path), "--by", "group", "--format", "csv"])
    assert base.exit_code == 0, base.output
    flag = runner.invoke(
        app, ["coherence", str(rich_store.path), "--by", "group", "--format", "csv",
              "--scheduler", thread_cluster.scheduler_address]
    )
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", thread_cluster.scheduler_address)
    env = runner.invoke(app, ["metrics", str(rich_store.path), "--format", "csv", "--no-progress"])
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
    plain = runner.invoke(app, ["metrics", str(rich_store.path), "--format", "csv", "--no-progress"])
    assert flag.exit_code == 0 and env.exit_code == 0, (flag.output, env.output)
    assert flag.stdout == base.stdout
    assert env.stdout == plain.stdout


def _zarr_step_chunk(arr: zarr.Array) -> int:
    return (arr.shards or arr.chunks)[0]


@pytest.mark.parametrize("compacted", [False, True])
def test_dask_chunks_are_whole_store_objects(rich_store, tmp_path, compacted):
    path = rich_store.path
    if compacted:
        path = tmp_path / "c.zarr"
        compact_store(rich_store.path, path, shard_bytes=8000)
    root = zarr.open_group(str(path), mode="r")
    ds = analysis.open_store(path)
    for name, var in ds.variables.items():
        if var.chunks is None or name not in root[schema.STREAM_BATCH]:
            continue
        arr = root[schema.STREAM_BATCH][name]
        inner = arr.chunks
        for dim_chunks, size in zip(var.chunks, inner, strict=True):
            # every Dask chunk but the last is a whole multiple of the zarr (inner) chunk
            assert all(c % size == 0 for c in dim_chunks[:-1]), (name, var.chunks, inner)
        if compacted and schema.DIM_STEP in var.dims:  # whole shards (one object each) along step
            step = _zarr_step_chunk(arr)
            assert all(c % step == 0 for c in var.chunks[0][:-1]), (name, var.chunks, step)
            assert var.chunks[0][0] >= min(step, var.shape[0]), (name, var.chunks, step)


def test_local_cluster_only_when_asked(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with analysis.session(workers=1) as client:
        assert client is not None
        link = client.dashboard_link
        assert "127.0.0.1" in link
        assert math.isfinite(len(client.scheduler_info()["workers"]))
