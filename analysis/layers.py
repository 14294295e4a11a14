"""Layer selection by name pattern and the per-layer weights of the global m-coherence.

Layers keep the order of the ``layer`` coordinate, which is depth (forward) order as written by the logger.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import xarray as xr
from gradcoh.logger import schema

__all__ = ["layer_weights", "match_layers", "select_layers"]


def _matches(name: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def match_layers(names: Sequence[str], patterns: str | Sequence[str]) -> list[str]:
    r"""Layer names matching any pattern, in the order of ``names`` (depth order).

    A pattern matches a name if it matches as a shell glob (``"features.*"``) or, failing that, as a full regular
    expression (``r"blocks\.[0-3]\..*"``).

    Args:
        names: All layer names, in depth order.
        patterns: One pattern or several.

    Returns:
        The matching names.

    Raises:
        ValueError: No layer matches.

    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen = [n for n in names if any(_matches(n, p) for p in pats)]
    if not chosen:
        raise ValueError(f"no layer matches {pats!r}; layers are: {', '.join(names)}")
    return chosen


def select_layers(ds: xr.Dataset, layers: str | Sequence[str] | None) -> xr.Dataset:
    """Restrict a store Dataset to the layers matching ``layers`` (``None``: all layers)."""
    if layers is None:
        return ds
    names = [str(n) for n in ds[schema.LAYER].values]  # static coordinate, a few names
    return ds.sel({schema.DIM_LAYER: match_layers(names, layers)})


def layer_weights(ds: xr.Dataset, *, layers: str | Sequence[str] | None = None) -> xr.DataArray:
    """Weights w_l = Σ_i‖g_{i,l}‖² / Σ_{i,l}‖g_{i,l}‖² over ``(step, layer)``.

    With them the network m-coherence is the weighted average Σ_l w_l · mcoh_l, because both numerator and
    denominator are sums over layers.

    Args:
        ds: A store Dataset (see :func:`~gradcoh.analysis.open_store`).
        layers: Layer pattern(s); weights are normalised over the selected layers.

    Returns:
        DataArray ``(step, layer)``, summing to 1 over ``layer``, with coordinate ``m``.

    """
    ds = select_layers(ds, layers)
    den = ds[schema.SQ_NORM].sum(schema.DIM_EXAMPLE).reset_coords(drop=True)
    weights = den / den.sum(schema.DIM_LAYER).where(lambda d: d > 0)
    weights = weights.assign_coords(m=(schema.DIM_STEP, ds[schema.N_EXAMPLES].data))
    weights.name = "layer_weight"
    weights.attrs = {"long_name": "share of Σ_i‖g_i‖² held by the layer"}
    return weights
