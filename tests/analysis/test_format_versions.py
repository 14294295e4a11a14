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
