"""Shared pytest configuration: makes ``tests/`` importable (``from storefactory import ...``) and shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from storefactory import build_store, random_gradients  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def small_store(tmp_path):
    """A store with both streams, two user groups, labels, a short (padded) step and float32 sketches."""
    rng = np.random.default_rng(7)
    grads = random_gradients(rng, n_steps=5, m=12, sizes=(6, 9, 4), short_step=(3, 9))
    labels = [rng.integers(0, 3, size=len(step[0])) for step in grads]
    groups = [rng.integers(0, 2, size=len(step[0])) for step in grads]
    probe = random_gradients(rng, n_steps=3, m=8, sizes=(6, 9, 4))
    data = build_store(
        tmp_path / "run.zarr",
        grads,
        labels=labels,
        groups=groups,
        group_names=("clean", "corrupted"),
        sketch_dim=64,
        probe=probe,
        extra_steps=2,
    )
    return data
