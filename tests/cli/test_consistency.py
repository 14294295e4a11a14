"""CLI consistency: the default stream (and saying which), column names, the metrics glossary, "wrote PATH",
what repair --check read, a readable info."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcoh import analysis
from gradcoh.cli.main import app
from gradcoh.logger import GradientLogger
from torch import nn
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Batch (m = 8) and probe (m = 16) streams, labels, groups, sketches."""
    path = tmp_path_factory.mktemp("c") / "s.zarr"
    torch.manual_seed(70)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    xp, yp = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with GradientLogger(model, path, sketch_dim=32, groups=("a", "b")) as glog:
        for step in range(3):
            x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
            with glog.record(step, labels=y, group=torch.arange(8) % 2):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()
            glog.probe(step, xp, yp, lambda o, t: F.cross_entropy(o, t, reduction="none"), labels=yp,
                       group=torch.arange(16) % 2)
    return path


def test_default_stream_is_probe_and_said(store):
    result = runner.invoke(app, ["coherence", str(store)])
    assert result.exit_code == 0, result.output
    assert "stream: probe" in result.stderr
    assert re.search(r"^\s+0\s+16\s", result.stdout, re.M)  # m = 16: the probe
    batch = runner.invoke(app, ["coherence", str(store), "--stream", "batch"])
    assert "stream:" not in batch.stderr and re.search(r"^\s+0\s+8\s", batch.stdout, re.M)


def test_by_label_column_is_named_label(store):
    result = runner.invoke(app, ["coherence", str(store), "--stream", "batch", "--by", "label"])
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0].split()
    assert "label" in header and "group" not in header


def test_metrics_glossary_covers_every_column_and_wrote_message(store, tmp_path):
    columns = list(analysis.metrics_summary(analysis.open_store(store)).data_vars)
    help_text = runner.invoke(app, ["metrics", "--help"]).stdout
    assert all(c in help_text for c in columns), [c for c in columns if c not in help_text]
    out = tmp_path / "m.csv"
    result = runner.invoke(app, ["metrics", str(store), "--format", "csv", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stderr and out.read_text().startswith("step")


def test_repair_check_says_what_it_read_and_info_is_readable(store):
    result = runner.invoke(app, ["repair", str(store), "--check"])
    assert result.exit_code == 0, result.output
    counts = re.search(r"checked (\d+) chunks of (\d+) variables in (\d+) stream\(s\), (\d+) committed steps: 0 "
                       r"unreadable", result.stdout)
    assert counts and int(counts.group(3)) == 2 and int(counts.group(4)) == 6
    info = runner.invoke(app, ["info", str(store)]).stdout
    assert re.search(r"^  sketch_dim\s+32$", info, re.M) and np.all([len(line) < 160 for line in info.splitlines()])


def test_per_layer_tables_show_human_layer_names(store, tmp_path):
    """Tables for people name layers as "name · type shape"; files keep the bare names for joins."""
    table = runner.invoke(app, ["coherence", str(store), "--per-layer", "--stream", "batch"]).stdout
    assert "0 · Linear 5→6" in table and "2 · Linear 6→3" in table
    out = tmp_path / "l.csv"
    runner.invoke(app, ["coherence", str(store), "--per-layer", "--stream", "batch", "--format", "csv", "-o", str(out)])
    assert "Linear" not in out.read_text()
