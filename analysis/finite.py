"""Steps whose gradient statistics are not finite (NaN/Inf gradients): analyses report NaN for them, with a warning.

The logger stores non-finite statistics as they are and sets ``finite(step, layer)`` to False. Left alone they would
be silently wrong, not NaN: sums over examples skip NaN (the padding value) and ``x / inf`` is 0. So every analysis
masks its result with :func:`finite_steps` instead.
"""

from __future__ import annotations

import warnings

import dask.array
import numpy as np
import xarray as xr
from gradcoh.logger import schema

__all__ = ["finite_steps", "mask_nonfinite"]


_PROBLEMS = (
    ("have layers whose per-example gradients did not sum to the batch gradient", "stored with on_mismatch='flag'"),
    ("have non-finite gradient statistics", "NaN/Inf"),
)
"""(problem, detail) of the warnings about unusable steps: not reconciled, then not finite."""


def _usable_kernel(finite: np.ndarray, reconciled: np.ndarray | None, *, steps: np.ndarray, gate: bool) -> np.ndarray:
    """``(step,)`` usable steps of whole ``(step,)`` finite/reconciled flags; warns about the others.

    Warns "N of T steps {problem} ({detail}; steps ...); their results are NaN" (at most five step numbers).
    Returns all True with ``gate`` (the caller masks per layer itself and only needs the warning in its graph).
    """
    usable = finite.copy()
    for (problem, detail), flags in zip(_PROBLEMS, (reconciled, finite), strict=True):
        if flags is None or flags.all():
            continue
        if flags is reconciled:
            usable &= flags
        bad = int((~flags).sum())
        shown = ", ".join(str(int(s)) for s in steps[~flags][:5]) + (", ..." if bad > 5 else "")
        warnings.warn(f"{bad} of {flags.size} steps {problem} ({detail}; steps {shown}); their results are NaN",
                      RuntimeWarning, stacklevel=2)
    return np.ones_like(usable) if gate else usable


def _checked_usable(ds: xr.Dataset, finite: xr.DataArray, reconciled: xr.DataArray | None,
                    gate: bool) -> xr.DataArray:
    """:func:`_usable_kernel` over the whole ``step`` axis, as one task of the graph (no data read here)."""
    flags = [finite.all(schema.DIM_LAYER)] + ([] if reconciled is None else [reconciled.all(schema.DIM_LAYER)])
    steps = np.asarray(ds[schema.STEP].values) if schema.STEP in ds.variables else np.arange(finite.sizes[
        schema.DIM_STEP])
    data = [f.data for f in flags]
    if isinstance(data[0], dask.array.Array):
        whole = [dask.array.asarray(d).rechunk(-1) for d in data]
        out = dask.array.map_blocks(lambda f, r=None: _usable_kernel(f, r, steps=steps, gate=gate), *whole,
                                    dtype=bool, meta=np.array((), dtype=bool))
    else:
        out = _usable_kernel(np.asarray(data[0]), np.asarray(data[1]) if len(data) > 1 else None, steps=steps,
                             gate=gate)
    return xr.DataArray(out, dims=(schema.DIM_STEP,))


def finite_steps(ds: xr.Dataset, *, per_layer: bool = False) -> xr.DataArray | None:
    """``(step[, layer])`` boolean: True where every (selected) layer's statistics are finite and reconciled.

    A layer is *reconciled* when its per-example gradients summed to the batch gradient its parameters received
    (the logger's guard; with ``on_mismatch="flag"`` a mismatch is stored instead of raised). Lazy: nothing is read
    here; the check of the whole ``step`` axis is one task of the graph, which warns (``RuntimeWarning``) when the
    result is computed and some step is not usable (on a ``distributed`` cluster the warning goes to the worker's
    log). Uses only the small ``finite``/``reconciled`` variables; None when the store has neither.
    """
    if schema.FINITE not in ds.variables:
        return None
    finite = ds[schema.FINITE].reset_coords(drop=True).astype(bool)
    reconciled = ds[schema.RECONCILED].reset_coords(drop=True).astype(bool) if schema.RECONCILED in ds.variables \
        else None
    if not per_layer:
        return _checked_usable(ds, finite, reconciled, gate=False)
    ok = finite if reconciled is None else finite & reconciled
    return ok & _checked_usable(ds, finite, reconciled, gate=True)


def mask_nonfinite(result: xr.DataArray | xr.Dataset, ds: xr.Dataset, *, per_layer: bool = False):
    """``result`` with NaN at non-finite steps (and layers, when ``per_layer`` and ``result`` has a layer dim)."""
    ok = finite_steps(ds, per_layer=per_layer and schema.DIM_LAYER in result.dims)
    return result if ok is None else result.where(ok)
