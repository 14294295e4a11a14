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

__all__ = ["finite_steps", "guard_counts", "guard_coverage", "mask_nonfinite"]


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


def guard_counts(reconciled: np.ndarray | None, checked: np.ndarray | None) -> dict[str, int | None]:
    """Counts of ``(step, layer)`` flags: layer-steps, checked by the reconciliation guard, flagged.

    ``reconciled`` True is a verdict only where the guard checked the layer at that step (``guard_checked``): its
    schedule checks each layer once every ``guard_every`` logged steps, and a layer it skips is stored not flagged.

    Args:
        reconciled: ``(step, layer)`` ``reconciled`` flags (None: a format-1 store, which has none).
        checked: ``(step, layer)`` ``guard_checked`` flags (None: a store of format 3 or older, which does not say).

    Returns:
        ``layer_steps`` (total), ``checked`` (None when the store does not say), ``flagged`` (``reconciled``
        False: by the guard or the verifier; None without ``reconciled``).
    """
    flags = reconciled if reconciled is not None else checked
    total = 0 if flags is None else int(np.asarray(flags).size)
    return {
        "layer_steps": total,
        "checked": None if checked is None else int(np.count_nonzero(checked)),
        "flagged": None if reconciled is None else int(total - np.count_nonzero(reconciled)),
    }


def guard_coverage(ds: xr.Dataset) -> dict[str, int | None]:
    """How many layer-steps of a stream the reconciliation guard checked, and how many it flagged.

    Reads the small ``reconciled`` and ``guard_checked`` variables (computes them). A layer-step not checked is
    stored ``reconciled`` True without a verdict: a fault present at every step is still caught within
    ``guard_every`` logged steps, a fault at one step in one layer only with probability ``1/guard_every``.

    Args:
        ds: A store Dataset (:func:`~gradcoh.analysis.open_store`; a multi-process store's flags are already over
            every rank).

    Returns:
        As :func:`guard_counts`.
    """
    def values(name: str) -> np.ndarray | None:
        return np.asarray(ds[name].values, dtype=bool) if name in ds.variables else None

    return guard_counts(values(schema.RECONCILED), values(schema.GUARD_CHECKED))
