"""Reading while a writer process appends: every ``open_store`` shows a consistent committed prefix."""

from __future__ import annotations

import time

import numpy as np
import xarray as xr
import zarr
from gradcoh.analysis import open_store
from gradcoh.analysis.io import StreamNotFoundError
from gradcoh.logger import schema
from reliability_helpers import COMPARED, N_STEPS, assert_prefix


def test_reader_sees_committed_prefix_while_writer_appends(forkserver, reference, tmp_path):
    ref, _ = reference
    path = tmp_path / "live.zarr"
    pid = forkserver.start(path, 0, N_STEPS, flush_secs=0.01, sleep=0.004)
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ds = open_store(path)
        except (StreamNotFoundError, schema.FormatError):  # not created yet
            time.sleep(0.02)
            continue
        n = ds.sizes[schema.DIM_STEP]
        got = {k: ds[k].values for k in COMPARED}  # the data, read after the commit marker
        np.testing.assert_array_equal(got[schema.STEP], np.arange(n))
        for k in COMPARED:
            np.testing.assert_array_equal(got[k], ref[k][:n], err_msg=f"{k} at {n} committed steps")
        seen.append(n)
        if n == N_STEPS:
            break
    assert forkserver.wait(pid) == 0
    assert seen == sorted(seen) and seen[-1] == N_STEPS
    assert len({n for n in seen if 0 < n < N_STEPS}) >= 3, seen  # really read while it grew
    assert assert_prefix(path, ref, "final") == N_STEPS


def test_plain_xarray_after_a_crash_shows_the_uncommitted_tail(forkserver, reference, tmp_path):
    """What the README documents: ``xr.open_zarr`` ignores ``committed_steps``; rows beyond it hold fill values."""
    path = tmp_path / "crashed.zarr"
    assert forkserver.wait(forkserver.start(path, 0, 20)) == 0
    batch = zarr.open_group(str(path), mode="r+")[schema.STREAM_BATCH]
    for name in (v for v in schema.VARIABLES if v in batch):  # a writer killed after resizing, before the data
        arr = batch[name]
        arr.resize((25, *arr.shape[1:]))
    raw = xr.open_zarr(str(path), group=schema.STREAM_BATCH, consolidated=False)
    assert raw.sizes["step"] == 25 and raw.attrs[schema.COMMITTED_KEY] == 20
    assert np.isnan(raw.sq_norm.values[20:]).all() and (raw.index.values[20:] == -1).all()
    assert (raw.step.values[20:] == -1).all() and not raw.finite.values[20:].any()
    assert open_store(path).sizes["step"] == 20
