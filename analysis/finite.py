"""Steps whose gradient statistics are not finite (NaN/Inf gradients): analyses report NaN for them, with a warning.

The logger stores non-finite statistics as they are and sets ``finite(step, layer)`` to False. Left alone they would
be silently wrong, not NaN: sums over examples skip NaN (the padding value) and ``x / inf`` is 0. So every analysis
masks its result with :func:`finite_steps` instead.
"""

from __future__ import annotations

import warnings

import xarray as xr
from gradcoh.logger import schema

__all__ = ["finite_steps", "mask_nonfinite"]


def _warn_unusable(ds: xr.Dataset, usable: xr.DataArray, problem: str, detail: str) -> None:
    """Warn "N of T steps {problem} ({detail}; steps ...); their results are NaN" where ``usable`` (step,) is False.

    At most five step numbers are listed. Nothing happens when every step is usable.
    """
    bad = int((~usable).sum().compute())
    if not bad:
        return
    steps = ds[schema.STEP].values[~usable.values] if schema.STEP in ds.variables else []
    shown = ", ".join(str(int(s)) for s in list(steps)[:5]) + (", ..." if bad > 5 else "")
    warnings.warn(
        f"{bad} of {usable.sizes[schema.DIM_STEP]} steps {problem} ({detail}; steps {shown}); their results are NaN",
        RuntimeWarning,
        stacklevel=4,  # the analysis function that called mask_nonfinite
    )


def finite_steps(ds: xr.Dataset, *, per_layer: bool = False) -> xr.DataArray | None:
    """``(step[, layer])`` boolean: True where every (selected) layer's statistics are finite and reconciled.

    A layer is *reconciled* when its per-example gradients summed to the batch gradient its parameters received
    (the logger's guard; with ``on_mismatch="flag"`` a mismatch is stored instead of raised). Warns
    (``RuntimeWarning``) when some step is not usable. Reads only the small ``finite``/``reconciled`` variables;
    None when the store has neither.
    """
    if schema.FINITE not in ds.variables:
        return None
    finite = ds[schema.FINITE].reset_coords(drop=True).astype(bool)
    ok = finite
    if schema.RECONCILED in ds.variables:
        reconciled = ds[schema.RECONCILED].reset_coords(drop=True).astype(bool)
        _warn_unusable(
            ds,
            reconciled.all(schema.DIM_LAYER),
            "have layers whose per-example gradients did not sum to the batch gradient",
            "stored with on_mismatch='flag'",
        )
        ok = ok & reconciled
    _warn_unusable(ds, finite.all(schema.DIM_LAYER), "have non-finite gradient statistics", "NaN/Inf")
    return ok if per_layer else ok.all(schema.DIM_LAYER)


def mask_nonfinite(result: xr.DataArray | xr.Dataset, ds: xr.Dataset, *, per_layer: bool = False):
    """``result`` with NaN at non-finite steps (and layers, when ``per_layer`` and ``result`` has a layer dim)."""
    ok = finite_steps(ds, per_layer=per_layer and schema.DIM_LAYER in result.dims)
    return result if ok is None else result.where(ok)
