"""DDP on CPU with gloo: the stored global statistics equal a single process logging the global batch.

Each example's alignment is with the *global* batch gradient (all ranks' examples), as in the single process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gradcoh.analysis import m_coherence, open_store
from launch import start_ranks
from tolerance import PRODUCT, assert_close, chain_length, sum_scale

WORKER = Path(__file__).with_name("ddp_worker.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def _allowed(one):
    """``{variable: (accumulation length, κ, scale)}`` of the DDP-vs-single comparison (tests/tolerance.py).

    Both runs compute every per-example gradient in float32 (in batches of 4 and of 8: other blockings, so each
    carries the model's chain error: twice the chain length) and DDP adds one all-reduce of ``world`` terms. The
    learning rate is 0, so both see the same parameters at every step (otherwise the rounding of two different
    all-reduce orders would be amplified by training, which is no property of the logger). Scales are the sizes of
    the terms: ‖gᵢ‖ from the stored squared norms; a sketch coordinate of gᵢ against ‖sᵢ‖ (Johnson–Lindenstrauss:
    ‖sᵢ‖ ≈ ‖gᵢ‖), whose projection sums every parameter of the layer.
    """
    from ddp_worker import make_model

    model = make_model()
    n = 2 * (chain_length(model, positions=6 * 6) + 2)
    norms = np.sqrt(one.sq_norm.values.astype(np.float64))  # [step, example, layer]
    group = one.group.values
    by_group = np.stack([np.where((group == a)[..., None], norms, 0).sum(1) for a in range(2)], -1)  # [s, l, g]
    ref = np.sqrt(one.ref_sq_norm.values.astype(np.float64))[:, None, :]  # ‖R̄‖ (its terms are not stored)
    sketch = one.sketch.values.astype(np.float64)
    return {
        "sq_norm": (n, PRODUCT, None),
        "sum_sq_norm": (n, PRODUCT, sum_scale(norms, axis=1)),
        "group_gram": (n, PRODUCT, by_group[..., :, None] * by_group[..., None, :]),
        "sketch": (n + sum(p.numel() for p in model.parameters()), 1.0,
                   np.linalg.norm(sketch, axis=-1, keepdims=True)),
        "alignment": (n, PRODUCT, norms * norms.sum(1, keepdims=True)),
        "ref_alignment": (n, PRODUCT, norms * ref),
        "ref_sq_norm": (n, PRODUCT, None),
    }


def test_ddp_global_statistics_equal_single_process(tmp_path, monkeypatch):
    import ddp_worker

    frozen = {"DDP_WORKER_LR": "0"}
    ranks = start_ranks(WORKER, str(tmp_path / "ddp.zarr"), "4", extra_env=frozen)
    # the single-process reference runs here while the ranks run (no third interpreter to start)
    monkeypatch.setenv("DDP_WORKER_LR", "0")
    monkeypatch.setattr(sys, "argv", [str(WORKER), str(tmp_path / "one.zarr"), "4", "single"])
    ddp_worker.main()
    code, err = ranks.wait(timeout=600)
    assert code == 0, err
    for stream in ("batch", "probe"):
        ddp = open_store(tmp_path / "ddp.zarr", stream=stream).load()
        one = open_store(tmp_path / "one.zarr", stream=stream).load()
        assert list(ddp.step.values) == list(one.step.values)
        for var, (n, kappa, scale) in _allowed(one).items():
            assert_close(ddp[var].values, one[var].values, n=n, kappa=kappa, scale=scale, err_msg=f"{stream} {var}")
        np.testing.assert_array_equal(ddp.index.values, one.index.values)
        np.testing.assert_array_equal(ddp.n_examples.values, one.n_examples.values)
        norms = np.sqrt(one.sq_norm.values.astype(np.float64))
        n = _allowed(one)["sum_sq_norm"][0]  # m-coherence: Σ_l num_l / Σ_l den_l, numerators against their terms
        scale = sum_scale(norms, axis=1).sum(-1) / (norms**2).sum((1, 2))
        assert_close(m_coherence(ddp).values, m_coherence(one).values, n=n, kappa=PRODUCT, scale=scale,
                     err_msg=f"{stream} m-coherence")
        group = one.group.values[..., None]
        by_group = np.stack([sum_scale(np.where(group == a, norms, 0), axis=1).sum(-1)
                             / np.where(group == a, norms**2, 0).sum((1, 2)) for a in range(2)], -1)
        assert_close(m_coherence(ddp, by="group").values, m_coherence(one, by="group").values, n=n, kappa=PRODUCT,
                     scale=by_group, err_msg=f"{stream} m-coherence by group")


def test_store_consistent_after_one_rank_is_killed(tmp_path):
    path = tmp_path / "killed.zarr"
    ranks = start_ranks(WORKER, str(path), "40", "slow")
    deadline = time.time() + 240  # a busy machine can take minutes to start two ranks
    while time.time() < deadline:  # wait until both ranks have committed a few steps
        try:
            if open_store(path).sizes["step"] >= 3:
                break
        except Exception:
            pass
        time.sleep(0.2)
    ranks.kill_rank(1)  # (the launcher then kills rank 0: it would block forever in the next all-reduce)
    code, err = ranks.wait(timeout=30)
    assert code != 0 and "rank 1 exited with -9" in err, err
    ds = open_store(path).load()
    steps = list(ds.step.values)
    assert len(steps) >= 3 and steps == list(range(len(steps)))
    assert np.isfinite(ds.sq_norm.values).all()
    assert (ds.index.values >= 0).all()
    assert m_coherence(ds).notnull().all()


def test_append_refuses_a_different_world_size(tmp_path):
    from gradcoh.logger import GradientLogger, StoreError
    from torch import nn

    model = nn.Linear(3, 2)
    with GradientLogger(model, tmp_path / "s.zarr") as glog:
        with glog.record(0):
            model(torch.randn(2, 3)).sum().backward()
    import zarr

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    root.attrs["gradcoh_world_size"] = 2  # as if written by two ranks
    with pytest.raises(StoreError, match="process"):
        GradientLogger(model, tmp_path / "s.zarr", mode="append")
