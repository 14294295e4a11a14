"""Stores of format 1 (before `reconciled` and per-parameter sketches) still open and analyse; newer ones are refused
with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from gradcoh import analysis
from gradcoh.logger import GradientLogger, schema
from torch import nn


def test_format_1_store_reads_and_analyses(tmp_path):
    torch.manual_seed(80)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    path = tmp_path / "old.zarr"
    with GradientLogger(model, path, groups=("a", "b")) as glog:
        for step in range(2):
            x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
            with glog.record(step, group=torch.arange(6) % 2):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()
    new = analysis.m_coherence(analysis.open_store(path), by="group").values
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    root.attrs[schema.FORMAT_KEY] = 1  # what an older gradcoh wrote: no `reconciled` variable
    del root[schema.STREAM_BATCH][schema.RECONCILED]
    ds = analysis.open_store(path)
    assert schema.RECONCILED not in ds.variables
    np.testing.assert_allclose(analysis.m_coherence(ds, by="group").values, new)
    root.attrs[schema.FORMAT_KEY] = schema.FORMAT_VERSION + 1
    with pytest.raises(schema.FormatError, match="newer gradcoh"):
        analysis.open_store(path)


def test_format_3_store_reads_says_checks_unknown_and_appends_guard_checked(tmp_path):
    """A format-3 store (no ``guard_checked``) reads; its guard coverage is unknown; an append adds the variable,
    False at the old steps (never a claimed check) and the guard's own flags at the new ones."""
    torch.manual_seed(81)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    path = tmp_path / "v3.zarr"

    def log(steps, mode):
        with GradientLogger(model, path, mode=mode, handle_sigterm=False, guard_every=2) as glog:
            for step in steps:
                with glog.record(step):
                    F.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
                model.zero_grad()

    log(range(3), "overwrite")
    fresh = analysis.guard_coverage(analysis.open_store(path))
    assert fresh == {"layer_steps": 6, "checked": 4, "flagged": 0}  # step 0 both layers, then one a step
    root = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    root.attrs[schema.FORMAT_KEY] = 3  # what gradcoh wrote before guard_checked
    del root[schema.STREAM_BATCH][schema.GUARD_CHECKED]
    ds = analysis.open_store(path)
    assert schema.GUARD_CHECKED not in ds.variables
    assert analysis.guard_coverage(ds) == {"layer_steps": 6, "checked": None, "flagged": 0}
    assert analysis.describe_store(path)["streams"][schema.STREAM_BATCH]["guard"]["checked"] is None
    log(range(3, 5), "append")
    checked = analysis.open_store(path)[schema.GUARD_CHECKED].values
    assert checked.shape == (5, 2) and not checked[:3].any()  # the old steps: not known to be checked
    assert checked[3].all() and checked[4].sum() == 1  # a new run's first step checks every layer, then one
