"""Label-noise splits: how the logger's groups (e.g. clean / corrupted) help each other, exactly from ``group_gram``.

Notation: for groups a, b of a step, g^a = Σ_{i∈a} g_i, G[a, b] = ⟨g^a, g^b⟩ (``group_gram`` summed over the selected
layers), D_a = Σ_{i∈a}‖g_i‖², and g = Σ_a g^a the full (summed) gradient.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from gradcoh.analysis import kernels
from gradcoh.analysis.coherence import Layers
from gradcoh.analysis.finite import mask_nonfinite
from gradcoh.analysis.layers import select_layers
from gradcoh.analysis.subsets import SUBSET_DIM, group_names, membership, subset_denominator
from gradcoh.logger import schema

__all__ = ["cg_fractions", "cross_group_benefit"]


def _gram(ds: xr.Dataset, per_layer: bool) -> xr.DataArray:
    gram = ds[schema.GROUP_GRAM].reset_coords(drop=True)
    return gram if per_layer else gram.sum(schema.DIM_LAYER)


def cross_group_benefit(ds: xr.Dataset, *, per_layer: bool = False, layers: Layers = None) -> xr.DataArray:
    """Cross-group benefit matrix B[a, b] = G[a, b] / D_a over ``(step, group_i, group_j)``.

    Meaning (first order, as in Chatterjee & Zielinski's Taylor argument): a small step −η g^a along group a's
    summed gradient lowers group b's summed loss by η·G[a, b]; if each example of a took its own step −η g_i, group
    a's loss would fall by η·D_a. B[a, b] is the benefit to b in units of a's own self terms, so the diagonal
    B[a, a] = ‖g^a‖² / D_a is exactly the m-coherence of group a, and B[a, b] < 0 means a's step hurts b. The
    matrix is not symmetric: B[a, b]·D_a = B[b, a]·D_b.

    Args:
        ds: A store Dataset.
        per_layer: Keep the ``layer`` dimension.
        layers: Layer name pattern(s).

    Returns:
        DataArray ``(step[, layer], group_i, group_j)`` with coordinates ``m_i`` (examples in group a) and ``m_j``.

    """
    ds = select_layers(ds, layers)
    member = membership(ds, "group")
    den = subset_denominator(ds, member)
    if not per_layer:
        den = den.sum(schema.DIM_LAYER)
    den = den.rename({SUBSET_DIM: schema.DIM_GROUP_I}).drop_vars(SUBSET_DIM, errors="ignore")
    names = group_names(ds)
    gram = _gram(ds, per_layer).assign_coords({schema.DIM_GROUP_I: names, schema.DIM_GROUP_J: names})
    den = den.assign_coords({schema.DIM_GROUP_I: names})
    benefit = xr.apply_ufunc(kernels.safe_ratio, gram, den, dask="parallelized", output_dtypes=[np.float64])
    m = member.sum(schema.DIM_EXAMPLE).drop_vars(SUBSET_DIM)
    benefit = benefit.assign_coords(
        m_i=m.rename({SUBSET_DIM: schema.DIM_GROUP_I}), m_j=m.rename({SUBSET_DIM: schema.DIM_GROUP_J})
    )
    benefit = mask_nonfinite(benefit, ds, per_layer=per_layer)
    benefit.name = "cross_group_benefit"
    benefit.attrs = {"long_name": "⟨g^a, g^b⟩ / Σ_{i∈a}‖g_i‖² (diagonal = m-coherence of a)"}
    return benefit


def cg_fractions(ds: xr.Dataset, *, per_layer: bool = False, layers: Layers = None) -> xr.Dataset:
    """Coherent-Gradients fractions f^a = ⟨g, g^a⟩ / ⟨g, g⟩ of each group (Chatterjee 2020), exact.

    ⟨g, g^a⟩ = Σ_b G[a, b] and ⟨g, g⟩ = Σ_{a,b} G[a, b], so the fractions sum to 1 over groups. A group with
    f^a larger than its share of examples drives the step more than its size suggests.

    Args:
        ds: A store Dataset.
        per_layer: Keep the ``layer`` dimension.
        layers: Layer name pattern(s).

    Returns:
        Dataset over ``(step[, layer], group)``: ``fraction`` f^a, ``inner`` ⟨g, g^a⟩, ``total`` ⟨g, g⟩ (no group
        dim) and coordinate ``m`` (examples per group).

    """
    ds = select_layers(ds, layers)
    gram = _gram(ds, per_layer)
    inner = gram.sum(schema.DIM_GROUP_J).rename({schema.DIM_GROUP_I: SUBSET_DIM})
    inner = inner.assign_coords({SUBSET_DIM: group_names(ds)})
    total = inner.sum(SUBSET_DIM)
    fraction = xr.apply_ufunc(kernels.safe_ratio, inner, total, dask="parallelized", output_dtypes=[np.float64])
    m = membership(ds, "group").sum(schema.DIM_EXAMPLE)
    out = xr.Dataset({"fraction": fraction, "inner": inner, "total": total})
    out = mask_nonfinite(out, ds, per_layer=per_layer).assign_coords(m=m)
    out["fraction"].attrs = {"long_name": "f^a = ⟨g, g^a⟩/⟨g, g⟩"}
    return out
