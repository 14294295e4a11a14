"""Fixtures for the scale tests: a rich store, the synthetic-store script, and quick local Dask clusters."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from storefactory import build_store, random_gradients  # noqa: E402


@pytest.fixture(scope="module")
def rich_store(tmp_path_factory):
    """Two groups, labels, a short (padded) step, a crashed tail, float32 sketches, both streams."""
    rng = np.random.default_rng(11)
    grads = random_gradients(rng, n_steps=6, m=20, sizes=(6, 9, 4), short_step=(2, 13))
    labels = [rng.integers(0, 3, size=len(step[0])) for step in grads]
    groups = [rng.integers(0, 2, size=len(step[0])) for step in grads]
    probe = random_gradients(rng, n_steps=3, m=8, sizes=(6, 9, 4))
    return build_store(
        tmp_path_factory.mktemp("rich") / "run.zarr",
        grads,
        labels=labels,
        groups=groups,
        group_names=("clean", "corrupted"),
        sketch_dim=32,
        probe=probe,
        extra_steps=2,
    )


@pytest.fixture(scope="module")
def thread_cluster():
    """Two in-process workers on TCP loopback (so the scheduler address works like a remote one)."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster
