"""Layer selection by name pattern, the per-layer weights of the global m-coherence, and human layer labels.

Layers keep the order of the ``layer`` coordinate, which is depth (forward) order as written by the logger.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import xarray as xr
from gradcoh.logger import schema

__all__ = ["layer_label", "layer_labels", "layer_weights", "match_layers", "select_layers"]


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


# --- layer names -----------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _shape_text(kind: str, shapes: Sequence[Sequence[int]], size: int) -> str:
    weight = [int(d) for d in shapes[0]] if shapes else []
    if kind == "Linear" and len(weight) == 2:
        return f"{weight[1]}→{weight[0]}"
    if kind.startswith("Conv") and len(weight) >= 3:
        kernel = "×".join(str(d) for d in weight[2:])
        return f"{kernel if len(weight) > 3 else f'k={kernel}'} {weight[1]}→{weight[0]}"
    if kind == "Embedding" and len(weight) == 2:
        return f"{weight[0]}×{weight[1]}"
    return f"{_count(size)} params"


def layer_label(entry: Mapping[str, Any]) -> str:
    """A human name for one layer: qualified name, module type and shape, e.g. ``"1 · Linear 64→256"``.

    Linear layers show ``in→out`` of their weight, convolutions ``kernel in→out`` (``"Conv2d 3×3 16→32"``),
    embeddings ``rows×dim``; any other type shows its parameter count (``"LayerNorm 512 params"``).

    Args:
        entry: One entry of the store's layer table (root attribute ``gradcoh_layers``: ``name, type, shapes,
            size, ...``).

    Returns:
        The label; just the name when the entry has no type.

    """
    name = str(entry.get("name", ""))
    kind = str(entry.get("type") or "")
    if not kind:
        return name
    shapes = entry.get("shapes") or []
    size = entry.get("size")
    if size is None:
        size = sum(math.prod(int(d) for d in shape) for shape in shapes)
    text = f"{kind} {_shape_text(kind, shapes, int(size))}"
    return f"{name} · {text}" if name else text


def layer_labels(layers: Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    """``{layer name: label}`` for a store's layer table (see :func:`layer_label`).

    Args:
        layers: The root attribute ``gradcoh_layers`` (``open_store(path).attrs["gradcoh_layers"]``); ``None`` or
            empty for a store without one.

    Returns:
        The labels, by layer name (empty without a table: plots then show the bare names).

    """
    return {str(entry.get("name", "")): layer_label(entry) for entry in layers or []}
