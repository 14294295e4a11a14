"""Results computed together with dask.compute (as scripts and the cluster helpers do) equal .compute()."""

from __future__ import annotations

import dask
import gradcoh.analysis as ga
import numpy as np
import pytest


@pytest.mark.parametrize("fn", [ga.m_coherence, ga.alpha, ga.debiased_alpha, ga.gradient_diversity])
@pytest.mark.parametrize("by", [None, "group"])
def test_dask_compute_of_results(small_store, fn, by):
    ds = ga.open_store(small_store.path)
    (together,) = dask.compute(fn(ds, by=by))
    np.testing.assert_allclose(together.values, fn(ds, by=by).compute().values)
