"""Bad input, one row each: a clear one-line message (CLI: no traceback, non-zero exit) or a ValueError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from gradcoh.analysis import open_store
from gradcoh.analysis.io import StoreNotFoundError, StreamNotFoundError
from gradcoh.cli.main import app
from gradcoh.logger import GradientLogger, schema
from reliability_helpers import write_small_store
from typer.testing import CliRunner

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "run.zarr"
    write_small_store(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- stores ------------------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    one_line_error(cli("info", tmp_path / "nope.zarr"), "no such store")
    with pytest.raises(StoreNotFoundError):
        open_store(tmp_path / "nope.zarr")


def test_directory_that_is_not_a_zarr_store(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    one_line_error(cli("coherence", tmp_path / "plain"), "not a zarr store")


def test_zarr_store_that_is_not_gradcohs(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_array("x", shape=(3,), dtype="f4")
    one_line_error(cli("info", tmp_path / "other.zarr"), "not a gradcoh store")
    one_line_error(cli("repair", tmp_path / "other.zarr"), "not a gradcoh store")


def test_newer_format_version(store, tmp_path):
    path = _copy(store, tmp_path / "newer.zarr")
    zarr.open_group(str(path), mode="r+").attrs[schema.FORMAT_KEY] = schema.FORMAT_VERSION + 1
    one_line_error(cli("info", path), "newer gradcoh", "upgrade")


def test_corrupted_chunk_names_variable_and_steps(store, tmp_path):
    path = _copy(store, tmp_path / "corrupt.zarr")
    chunk = next(p for p in (path / "batch" / "sum_sq_norm" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:10])  # what a power loss can leave (zarr never fsyncs)
    result = cli("coherence", path)
    one_line_error(result, "corrupted chunk", "batch/sum_sq_norm steps 0..4")
    result = cli("repair", path, "--check")
    assert result.exit_code == 1 and "batch/sum_sq_norm steps 0..4" in result.stderr


def test_stream_that_does_not_exist(store):
    one_line_error(cli("coherence", store, "--stream", "nope"), "no stream 'nope'", "batch")
    with pytest.raises(StreamNotFoundError, match="streams present: batch"):
        open_store(store, stream="probe")


def test_unknown_cli_option(store):
    result = cli("coherence", store, "--bogus")
    assert result.exit_code == 2 and "No such option" in result.output and "Usage:" in result.output


# --- the logger --------------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _record(tmp_path, n=6, groups=(), **meta):
    model = _model()
    with GradientLogger(model, tmp_path / "r.zarr", mode="overwrite", groups=groups) as glog:
        x, y = torch.randn(n, 4), torch.randint(0, 2, (n,))
        with glog.record(0, **meta):
            F.cross_entropy(model(x), y).backward()
    return tmp_path / "r.zarr"


@pytest.mark.parametrize(
    ("meta", "groups", "message"),
    [
        ({"index": torch.arange(5)}, (), "index has 5 entries but the step has 6 examples"),
        ({"labels": np.zeros(7, dtype=np.int64)}, (), "label has 7 entries"),
        ({"index": torch.arange(6, dtype=torch.float32)}, (), "index must hold integers, got dtype float32"),
        ({"labels": ["a"] * 6}, (), "label must hold integers"),
        ({"group": torch.tensor([0, 1, 2, 0, 1, 0])}, ("a", "b"), r"group values must lie in \[0, 2\)"),
        ({"group": torch.tensor([0, 1, 1])}, ("a", "b"), "group has 3 entries"),
        ({}, ("a", "b"), "must give every example's group"),
    ],
)
def test_bad_record_metadata(tmp_path, meta, groups, message):
    with pytest.raises(ValueError, match=message):
        _record(tmp_path, groups=groups, **meta)


def test_metadata_on_another_device_is_copied(tmp_path):
    import xarray as xr

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        path = _record(tmp_path, index=torch.arange(6, device=device) + 10,
                       labels=torch.tensor([1, 0, 1, 1, 0, 1], device=device))
        ds = xr.open_zarr(path, group="batch", consolidated=False)
        assert ds.index.values[0].tolist() == list(range(10, 16)), device
        assert ds.label.values[0].tolist() == [1, 0, 1, 1, 0, 1], device


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 0}, "every must be an integer >= 1, got 0"),
        ({"every": 1.5}, "every must be an integer >= 1"),
        ({"sketch_dim": -1}, "sketch_dim must be an integer >= 0, got -1"),
        ({"mode": "replace"}, "mode='replace' is not valid"),
        ({"on_error": "ignore"}, "on_error='ignore' is not valid"),
        ({"flush_secs": 0}, "flush_secs must be positive"),
    ],
)
def test_bad_logger_options(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientLogger(_model(), tmp_path / "x.zarr", **kwargs)
    assert not (tmp_path / "x.zarr").exists()


def test_model_without_parameters(tmp_path):
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradientLogger(torch.nn.Sequential(torch.nn.ReLU()), tmp_path / "x.zarr")


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.w


def test_module_without_rule_and_no_fallback(tmp_path):
    model = torch.nn.Sequential(Scale(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"module '0' \(Scale\) has parameters but no layer rule.*fallback=True"):
        GradientLogger(model, tmp_path / "x.zarr", fallback=False)
    assert not os.path.exists(tmp_path / "x.zarr")
