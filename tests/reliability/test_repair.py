"""``gradcoh repair``: trims every stream to its committed steps and deletes orphaned ``*.partial`` files."""

from __future__ import annotations

import json

import zarr
from gradcoh.analysis import open_store
from gradcoh.cli.main import app
from gradcoh.logger import schema
from reliability_helpers import write_small_store
from typer.testing import CliRunner

runner = CliRunner()


def test_repair_dry_run_then_repair(tmp_path):
    path = tmp_path / "run.zarr"
    write_small_store(path)
    batch = zarr.open_group(str(path), mode="r+")[schema.STREAM_BATCH]
    for name in (schema.SQ_NORM, schema.STEP):  # a writer killed after resizing two arrays
        batch[name].resize((9, *batch[name].shape[1:]))
    partial = path / "batch" / "sq_norm" / "c" / "0.1234abcd.partial"
    partial.write_bytes(b"half a chunk")

    result = runner.invoke(app, ["repair", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would trim batch/sq_norm from 9 to 5 steps" in result.stdout and "would delete orphaned" in result.stdout
    assert batch[schema.SQ_NORM].shape[0] == 9 and partial.exists()  # nothing changed

    result = runner.invoke(app, ["repair", str(path), "--json", "--check"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["actions"]) == 3 and report["corrupted"] == []
    batch = zarr.open_group(str(path), mode="r")[schema.STREAM_BATCH]
    assert all(batch[k].shape[0] == 5 for k in schema.VARIABLES if k in batch) and not partial.exists()
    assert open_store(path).step.values.tolist() == [0, 1, 2, 3, 4]
    result = runner.invoke(app, ["repair", str(path)])
    assert result.exit_code == 0 and "nothing to repair" in result.stdout
