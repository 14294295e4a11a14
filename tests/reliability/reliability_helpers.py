"""Shared helpers of the reliability tests (the reference-run comparison)."""

from __future__ import annotations

import numpy as np
from gradcoh.analysis import open_store
from gradcoh.analysis.io import StreamNotFoundError
from gradcoh.logger import schema

N_STEPS = 300
SLEEP = 0.004
COMPARED = (schema.STEP, schema.N_EXAMPLES, schema.SQ_NORM, schema.SUM_SQ_NORM, schema.GROUP_GRAM, schema.SKETCH,
            schema.INDEX, schema.LABEL, schema.GROUP, schema.LOSS, schema.FINITE)


def values(ds, stop=None):
    return {k: np.asarray(ds[k].values[:stop]) for k in COMPARED}


def assert_prefix(store, ref, where):
    """The committed steps are 0..n-1 and hold exactly the reference run's values; returns n."""
    if not (store / "zarr.json").exists():  # killed while creating the store: nothing but temp files
        assert all(p.name.endswith(".partial") for p in store.rglob("*") if p.is_file()), where
        return 0
    try:
        ds = open_store(store)
    except StreamNotFoundError:
        return 0  # killed before the first commit created the stream
    n = ds.sizes[schema.DIM_STEP]
    np.testing.assert_array_equal(ds[schema.STEP].values, np.arange(n), err_msg=f"{where}: steps not a gap-free prefix")
    got = values(ds)
    for k in COMPARED:
        np.testing.assert_array_equal(got[k], ref[k][:n], err_msg=f"{where}: {k} differs from the reference run")
    return n


def write_small_store(path):
    """Five logged steps of a tiny MLP with k=4 sketches (the store the bad-input and repair tests damage)."""
    import torch
    import torch.nn.functional as F
    from gradcoh.logger import GradientLogger

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    with GradientLogger(model, path, sketch_dim=4) as glog:
        for s in range(5):
            x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
            with glog.record(s, index=torch.arange(6), labels=y):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()
    return path
