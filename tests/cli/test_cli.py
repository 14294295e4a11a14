"""The gradcoh CLI with typer's CliRunner: every command and format, and one-line errors for bad input."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import xarray as xr
import zarr
from cli_helpers import assert_one_line_error, invoke
from storefactory import build_store, random_gradients


def test_help_and_version():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("info", "coherence", "metrics", "plot"):
        assert command in result.stdout
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("gradcoh ")


def test_info_text_and_json(small_store):
    result = invoke("info", small_store.path)
    assert result.exit_code == 0, result.output
    assert "stream batch: 5 steps" in result.stdout and "layer1" in result.stdout
    result = invoke("info", small_store.path, "--json")
    doc = json.loads(result.stdout)
    assert doc["streams"]["probe"]["committed_steps"] == 3


def test_coherence_table(small_store):
    result = invoke("coherence", small_store.path, "--stream", "batch")
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert header == ["step", "m", "m_coherence"]
    assert len(result.stdout.splitlines()) == 6


def test_coherence_json_values_match_library(small_store):
    from gradcoh.analysis import m_coherence, open_store

    result = invoke("coherence", small_store.path, "--by", "group", "--per-layer", "--format", "json", "--stream",
                    "batch")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    expected = m_coherence(open_store(small_store.path), by="group", per_layer=True).compute()
    assert doc["dims"] == ["step", "layer", "group"]
    assert len(doc["records"]) == expected.size
    first = doc["records"][0]
    want = expected.sel(step=first["step"], layer=first["layer"], group=first["group"])
    assert first["m_coherence"] == float(want)  # the same float64 computation; JSON writes repr, which round-trips
    assert set(first) == {"step", "layer", "group", "m", "m_coherence"}


def test_coherence_csv_options(small_store, tmp_path):
    out = tmp_path / "c.csv"
    result = invoke(
        "coherence",
        small_store.path,
        "--by",
        "label",
        "--source",
        "sketch",
        "--layers",
        "layer[02]",
        "--stream",
        "batch",
        "--format",
        "csv",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert {r["label"] for r in rows} == {"0", "1", "2"}  # label subsets are named label


def test_coherence_probe_stream(small_store):
    result = invoke("coherence", small_store.path, "--stream", "probe", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 4


def test_coherence_netcdf(small_store, tmp_path):
    out = tmp_path / "c.nc"
    result = invoke("coherence", small_store.path, "--per-layer", "--format", "netcdf", "-o", out)
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out) as back:
        assert back.m_coherence.dims == ("step", "layer")


def test_metrics_all_formats(small_store, tmp_path):
    result = invoke("metrics", small_store.path, "--format", "json", "--block-size", "4")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"m_coherence", "noise_scale", "cos_global", "min_cos"} <= set(doc["records"][0])
    for fmt in ("table", "csv"):
        result = invoke("metrics", small_store.path, "--format", fmt)
        assert result.exit_code == 0 and "cos_within" in result.stdout
    result = invoke("metrics", small_store.path, "--format", "netcdf", "--out", tmp_path / "m.nc")
    assert result.exit_code == 0 and (tmp_path / "m.nc").exists()


def test_json_nan_is_null(tmp_path):
    grads = random_gradients(np.random.default_rng(0), n_steps=2, m=4, sizes=(3,))
    groups = [np.zeros(4, np.int64), np.zeros(4, np.int64)]  # group "b" is always empty -> NaN
    data = build_store(tmp_path / "s.zarr", grads, groups=groups, group_names=("a", "b"))
    result = invoke("coherence", data.path, "--by", "group", "--format", "json")
    doc = json.loads(result.stdout)
    assert any(r["m_coherence"] is None for r in doc["records"])


@pytest.mark.parametrize("kind", ["coherence", "layers", "groups", "metrics"])
def test_plot_kinds(small_store, tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    result = invoke("plot", small_store.path, "-o", out, "--kind", kind)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_plot_svg_single_stream(small_store, tmp_path):
    out = tmp_path / "c.svg"
    assert invoke("plot", small_store.path, "-o", out, "--stream", "probe").exit_code == 0
    assert out.exists()


def test_scheduler_and_workers_options(small_store):
    result = invoke("coherence", small_store.path, "--workers", "1", "--format", "csv", "--progress", "--stream",
                    "batch")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 6


def test_missing_store(tmp_path):
    assert_one_line_error(invoke("coherence", tmp_path / "none.zarr"), "no such store")


def test_not_a_store(tmp_path):
    (tmp_path / "d").mkdir()
    assert_one_line_error(invoke("metrics", tmp_path / "d"), "not a zarr store")
    zarr.open_group(tmp_path / "z.zarr", mode="w", zarr_format=3)
    assert_one_line_error(invoke("info", tmp_path / "z.zarr"), "not a gradcoh store")


def test_wrong_stream(tmp_path):
    grads = random_gradients(np.random.default_rng(0), n_steps=2, m=3, sizes=(2,))
    data = build_store(tmp_path / "s.zarr", grads)
    assert_one_line_error(invoke("coherence", data.path, "--stream", "probe"), "streams present: batch")
    assert_one_line_error(invoke("plot", data.path, "-o", tmp_path / "x.png", "--stream", "nope"), "nope")


def test_bad_option_values(small_store, tmp_path):
    assert_one_line_error(invoke("coherence", small_store.path, "--layers", "zzz*"), "no layer matches")
    assert_one_line_error(invoke("coherence", small_store.path, "--format", "netcdf"), "--out")
    result = invoke("coherence", small_store.path, "--format", "xml")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "Invalid value" in result.stderr


def test_label_split_without_sketches(tmp_path):
    grads = random_gradients(np.random.default_rng(0), n_steps=2, m=3, sizes=(2,))
    data = build_store(tmp_path / "s.zarr", grads)
    assert_one_line_error(invoke("coherence", data.path, "--by", "label"), "no sketches")
