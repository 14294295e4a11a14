"""Live TensorBoard scalars from the logger, rec.summary(), and `gradcoh tensorboard` for stored runs, read back with
TensorBoard's own event reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcoh.analysis import m_coherence, open_store
from gradcoh.cli.main import app
from gradcoh.logger import GradientLogger
from tolerance import assert_close
from torch import nn
from typer.testing import CliRunner

# TensorBoard (≈ 1 s of CPU to import) is imported where it is used, not when every xdist worker collects this file.


def scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_summary_writer_and_summary_and_cli_export(tmp_path):
    torch.manual_seed(60)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "live"))
    summaries = []
    with GradientLogger(model, tmp_path / "s.zarr", groups=("a", "b"), summary_writer=writer) as glog:
        step = 0
        for _epoch in range(2):  # a global step counter across epochs
            for _ in range(3):
                x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
                with glog.record(step, index=torch.arange(8) + 8 * step, group=torch.arange(8) % 2) as rec:
                    F.cross_entropy(model(x), y).backward()
                summaries.append(rec.summary())
                model.zero_grad()
                step += 1
    writer.close()
    ds = open_store(tmp_path / "s.zarr")
    exact = m_coherence(ds).values
    by_group = m_coherence(ds, by="group").values
    # rec.summary() and the analysis reduce the same stored float32 sums in float64 (over 3 layers, in their orders);
    # against m = 8, the size of the numerator's terms
    kw = {"n": 2 * 3 * 8, "dtype": "float64", "scale": 8}
    assert_close([s["m_coherence"] for s in summaries], exact, err_msg="summary", **kw)
    assert_close([[s["m_coherence/a"], s["m_coherence/b"]] for s in summaries], by_group, err_msg="by group", **kw)
    assert all(s["n"] == 8 for s in summaries)
    live = scalars(tmp_path / "live", "gradcoh/m_coherence")
    assert_close([live[s] for s in range(6)], exact, n=2, err_msg="live scalars")  # TensorBoard's float32: one rounding
    result = CliRunner().invoke(app, ["tensorboard", str(tmp_path / "s.zarr"), "--logdir", str(tmp_path / "tb"),
                                      "--by", "group"])
    assert result.exit_code == 0, result.output
    exported = scalars(tmp_path / "tb", "gradcoh/batch/m_coherence/b")
    assert_close([exported[s] for s in range(6)], by_group[:, 1], n=2, err_msg="exported scalars")


def test_summary_of_an_unlogged_step_is_empty(tmp_path):
    model = nn.Linear(3, 2)
    with GradientLogger(model, tmp_path / "s.zarr", every=2) as glog:
        with glog.record(1) as rec:
            model(torch.randn(4, 3)).sum().backward()
    assert rec.summary() == {}
    with pytest.raises(RuntimeError, match="after the record block"):
        with GradientLogger(model, tmp_path / "t.zarr") as glog, glog.record(0) as rec:
            rec.summary()


def test_loss_scaler_values_are_unscaled(tmp_path):
    """A GradScaler multiplies the backward loss; rec.unscale(scale) stores the unscaled values."""
    torch.manual_seed(61)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for path, scaled in (("plain.zarr", False), ("scaled.zarr", True)):
        with GradientLogger(model, tmp_path / path, sketch_dim=16, sketch_dtype="float32") as glog:
            with glog.record(0) as rec:
                loss = F.cross_entropy(model(x), y)
                (scaler.scale(loss) if scaled else loss).backward()
                if scaled:
                    rec.unscale(scaler.get_scale())
        model.zero_grad()
    plain, scaled = open_store(tmp_path / "plain.zarr"), open_store(tmp_path / "scaled.zarr")
    # a power-of-two scale is exact in floating point: both runs compute the same numbers but for the scaling and
    # unscaling themselves (a rounding each at most); sketch coordinates against their example's sketch norm
    norms = np.linalg.norm(plain.sketch.values.astype(np.float64), axis=-1, keepdims=True)
    for var in ("sq_norm", "sum_sq_norm", "group_gram", "sketch"):
        assert_close(scaled[var].values, plain[var].values, n=4, scale=norms if var == "sketch" else None,
                     err_msg=var)
