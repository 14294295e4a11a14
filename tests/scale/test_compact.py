"""``compact_store`` / ``gradcoh compact``: sharded, consolidated, every value preserved, readable by open_store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr
from gradcoh import analysis
from gradcoh.analysis import compact as compact_mod
from gradcoh.analysis.compact import COMPACTED_KEY, CompactionError, compact_store, count_objects
from gradcoh.logger import schema
from storefactory import build_store, random_gradients


@pytest.fixture(scope="module")
def many_chunks(tmp_path_factory):
    """20 steps in 2-step chunks (10 objects per array), a crashed tail, sketches, groups, labels, probe stream."""
    rng = np.random.default_rng(5)
    grads = random_gradients(rng, n_steps=20, m=10, sizes=(5, 7), short_step=(4, 6))
    return build_store(
        tmp_path_factory.mktemp("many") / "run.zarr", grads,
        labels=[rng.integers(0, 3, size=len(s[0])) for s in grads],
        groups=[rng.integers(0, 2, size=len(s[0])) for s in grads], group_names=("clean", "corrupted"),
        sketch_dim=16, probe=random_gradients(rng, n_steps=3, m=4, sizes=(5, 7)), extra_steps=3,
    )


def _values(path) -> dict[str, np.ndarray]:
    """Every array of every stream, read with plain zarr and trimmed to the committed steps."""
    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    out = {}
    for stream, group in root.groups():
        committed = group.attrs[schema.COMMITTED_KEY]
        for name, arr in group.arrays():
            dims = arr.metadata.dimension_names
            out[f"{stream}/{name}"] = arr[:committed] if dims[0] == schema.DIM_STEP else arr[...]
    return out


def test_every_value_preserved_sharded_consolidated(many_chunks, tmp_path):
    dst = tmp_path / "c.zarr"
    summary = compact_store(many_chunks.path, dst)
    assert summary["verified"] and summary["objects_after"] < summary["objects_before"] / 2
    before, after = _values(many_chunks.path), _values(dst)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        np.testing.assert_array_equal(after[key], value, err_msg=key)  # NaN == NaN here
    root = zarr.open_group(str(dst), mode="r")
    batch = root[schema.STREAM_BATCH]
    assert batch[schema.SKETCH].shards is not None and batch[schema.SKETCH].shape[0] == 20  # crashed tail dropped
    for name in (schema.SKETCH, schema.SQ_NORM, schema.N_EXAMPLES):  # rechunked by each array's own size
        arr = batch[name]
        step_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
        assert arr.chunks[0] == min(schema.steps_per_chunk(step_bytes), 20), name
        assert arr.shards[0] % arr.chunks[0] == 0 and arr.shards[0] >= 20, name  # whole run in one shard here
    assert "consolidated_metadata" in json.loads((dst / "zarr.json").read_text())
    assert root.attrs[COMPACTED_KEY]["shard_steps"][schema.STREAM_BATCH] >= 20


def test_each_array_sharded_by_its_own_size(many_chunks, tmp_path):
    """Inner chunks and shards follow each array's own bytes a step (the writer's rule; about ``shard_bytes``)."""
    dst = tmp_path / "c.zarr"
    compact_store(many_chunks.path, dst, shard_bytes=4000)
    batch = zarr.open_group(str(dst), mode="r")[schema.STREAM_BATCH]
    for name in (schema.SKETCH, schema.SQ_NORM, schema.N_EXAMPLES, schema.FINITE):
        arr = batch[name]
        step_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:]))
        per_shard = max(arr.chunks[0], 4000 // (step_bytes * arr.chunks[0]) * arr.chunks[0])
        assert arr.shards[0] == min(per_shard, -(-20 // arr.chunks[0]) * arr.chunks[0]), name
    assert batch[schema.N_EXAMPLES].shards[0] >= 20


def test_open_store_reads_compacted_store(many_chunks, tmp_path):
    dst = tmp_path / "c.zarr"
    compact_store(many_chunks.path, dst, shard_bytes=2000)  # several shards per array
    src, new = analysis.open_store(many_chunks.path), analysis.open_store(dst)
    assert new.attrs.pop(COMPACTED_KEY)["shard_bytes"] == 2000
    xr.testing.assert_identical(new.load(), src.load())
    for stream in ("batch", "probe"):
        a, b = analysis.open_store(many_chunks.path, stream=stream), analysis.open_store(dst, stream=stream)
        xr.testing.assert_equal(analysis.m_coherence(a, per_layer=True), analysis.m_coherence(b, per_layer=True))
    xr.testing.assert_equal(analysis.stiffness(src), analysis.stiffness(new))
    assert analysis.describe_store(dst)["streams"] == analysis.describe_store(many_chunks.path)["streams"]


def test_corruption_is_detected(many_chunks, tmp_path, monkeypatch):
    def bad_copy(src, dst, start, stop):
        block = src[start:stop]
        if block.dtype.kind == "f" and block.size:
            block = np.where(np.isnan(block), block, block + 1e-12 * np.abs(block).max())
        dst[start:stop] = block
        return int(block.nbytes)

    monkeypatch.setattr(compact_mod, "_copy_shard", bad_copy)
    with pytest.raises(CompactionError, match="differs"):
        compact_store(many_chunks.path, tmp_path / "bad.zarr")


def test_refusals(many_chunks, tmp_path):
    with pytest.raises(ValueError, match="differ"):
        compact_store(many_chunks.path, many_chunks.path)
    dst = tmp_path / "c.zarr"
    compact_store(many_chunks.path, dst)
    with pytest.raises(FileExistsError):
        compact_store(many_chunks.path, dst)
    compact_store(many_chunks.path, dst, overwrite=True)
    with pytest.raises(schema.FormatError):
        compact_store(tmp_path / "missing.zarr", tmp_path / "x.zarr")


def test_cli_compact(many_chunks, tmp_path):
    from gradcoh.cli.main import app
    from typer.testing import CliRunner

    src = tmp_path / "run.zarr"
    build_store(src, many_chunks.batch.grads, sketch_dim=8, extra_steps=1)
    runner = CliRunner()
    result = runner.invoke(app, ["compact", str(src), "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dst"] == str(tmp_path / "run.compact.zarr") and summary["verified"]
    assert count_objects(summary["dst"]) == summary["objects_after"]
    again = runner.invoke(app, ["compact", str(src)])
    assert again.exit_code == 2 and "already exists" in again.stderr
    out = runner.invoke(app, ["coherence", summary["dst"], "--format", "csv"])
    base = runner.invoke(app, ["coherence", str(src), "--format", "csv"])
    assert out.stdout == base.stdout


def test_multi_process_store(many_chunks, tmp_path):
    """Per-rank groups (rank-XXXXX/batch) are compacted recursively and still open as one dataset."""
    import shutil

    src = tmp_path / "ddp.zarr"
    root = zarr.open_group(str(src), mode="w", zarr_format=3)
    attrs = zarr.open_group(str(many_chunks.path), mode="r").attrs.asdict()
    root.attrs.update({**attrs, schema.WORLD_SIZE_KEY: 2})
    for rank in range(2):
        root.create_group(schema.rank_group(rank))
        shutil.copytree(many_chunks.path / "batch", src / schema.rank_group(rank) / "batch")
    dst = tmp_path / "ddp.compact.zarr"
    summary = compact_store(src, dst)
    assert set(summary["shard_steps"]) == {f"{schema.rank_group(r)}/batch" for r in range(2)}
    a, b = analysis.open_store(src), analysis.open_store(dst)
    b.attrs.pop(COMPACTED_KEY)
    xr.testing.assert_identical(b.load(), a.load())
    assert analysis.open_store(dst).sketch.chunks[0] == (20,)  # one shard per rank block
