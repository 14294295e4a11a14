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


