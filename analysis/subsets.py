"""Which examples form which subset (group, label, user mask) and the per-subset sums m-coherence needs.

Subset numerators ‖Σ_{i∈S} g_i‖² are exact for the logger's groups (``group_gram``) and come from sketches for any
other subset: a linear sketch commutes with sums, so Σ_{i∈S} s_i is the sketch of Σ_{i∈S} g_i and only its squared
norm carries the Johnson–Lindenstrauss error. Denominators Σ_{i∈S}‖g_i‖² are always exact (``sq_norm``).
"""

from __future__ import annotations

import dask.array
import numpy as np
import xarray as xr
from gradcoh.analysis import jackknife, kernels
from gradcoh.analysis.io import valid_examples, warn_missing_metadata
from gradcoh.logger import schema

__all__ = [
    "SUBSET_DIM",
    "distinct_values",
    "group_gram_diagonal",
    "group_names",
    "known_values",
    "membership",
    "require_sketches",
    "sketch_numerator",
    "stored_group_sums",
    "subset_denominator",
    "total_denominator",
]

SUBSET_DIM = "group"
"""Name of the subset dimension of every split result."""


def distinct_values(values: xr.DataArray) -> np.ndarray:
    """Sorted distinct non-negative values of an integer DataArray (computes only the unique values)."""
    data = values.data
    uniq = dask.array.unique(data).compute() if isinstance(data, dask.array.Array) else np.unique(data)
    return uniq[uniq >= 0]


def group_names(ds: xr.Dataset) -> np.ndarray:
    """The logger's group names (``group_i``) as a fixed-width string array."""
    return np.array([str(n) for n in ds[schema.GROUP_I].values])


def known_values(ds: xr.Dataset, values: xr.DataArray) -> xr.DataArray:
    """``values`` (per example) with −1 at padding positions (:func:`~gradcoh.analysis.io.valid_examples`)."""
    return values.reset_coords(drop=True).where(valid_examples(ds), -1)


def _onehot(codes: xr.DataArray, values: np.ndarray, ds: xr.Dataset) -> xr.DataArray:
    levels = xr.DataArray(values, dims=SUBSET_DIM, coords={SUBSET_DIM: values})
    return (codes.reset_coords(drop=True) == levels) & valid_examples(ds)


def _label_subsets(ds: xr.Dataset) -> xr.DataArray:
    """One subset per distinct label ≥ 0 of a real example; warns when the store holds no label at all."""
    labels = known_values(ds, ds[schema.LABEL])
    values = distinct_values(labels)
    if not values.size and ds.sizes.get(schema.DIM_STEP, 0) and ds.sizes.get(schema.DIM_EXAMPLE, 0):
        warn_missing_metadata(ds, schema.LABEL, "by='label'", "the result has no label subsets (it is empty)")
    return _onehot(labels, values, ds)


def _from_mask(ds: xr.Dataset, mask: xr.DataArray) -> xr.DataArray:
    wanted = {schema.DIM_STEP, schema.DIM_EXAMPLE}
    if set(mask.dims) != wanted:
        raise ValueError(f"a subset mask must have dims {sorted(wanted)}, got {mask.dims}")
    if mask.dtype == bool:
        name = mask.name if mask.name is not None else "selected"
        return (mask.reset_coords(drop=True) & valid_examples(ds)).expand_dims({SUBSET_DIM: [str(name)]}, axis=-1)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"a subset mask must be bool or integer, got {mask.dtype}")
    return _onehot(mask, distinct_values(known_values(ds, mask)), ds)


def membership(ds: xr.Dataset, by: str | xr.DataArray) -> xr.DataArray:
    """Boolean ``(step, example, group)`` membership of each example in each subset (padding excluded).

    Padding is decided by position (:func:`~gradcoh.analysis.io.valid_examples`), never by the metadata: an example
    logged without ``index=``/``labels=`` still belongs to its group; a label or group of −1 only means "unknown"
    (the example is in no label or group subset). ``by="label"`` on a store without labels warns
    (:class:`~gradcoh.analysis.io.MissingMetadataWarning`, naming ``labels=``) and returns no subset.

    Args:
        ds: A store Dataset.
        by: ``"group"`` (the logger's groups, named by ``group_i``), ``"label"`` (one subset per distinct label
            ≥ 0), a boolean ``(step, example)`` DataArray (one subset, named after the array) or an integer one
            (one subset per distinct value ≥ 0).

    Returns:
        Lazy boolean DataArray with a ``group`` coordinate naming the subsets.

    Raises:
        ValueError: ``by`` is not one of the above.

    """
    if isinstance(by, xr.DataArray):
        return _from_mask(ds, by)
    if by == "group":
        names = group_names(ds)
        member = _onehot(ds[schema.GROUP], np.arange(len(names)), ds)
        return member.assign_coords({SUBSET_DIM: names})
    if by == "label":
        return _label_subsets(ds)
    raise ValueError(f"by must be None, 'group', 'label' or a (step, example) DataArray, got {by!r}")


def subset_denominator(ds: xr.Dataset, member: xr.DataArray) -> xr.DataArray:
    """Exact Σ_{i∈S}‖g_{i,l}‖² over ``(step, layer, group)``."""
    sq = ds[schema.SQ_NORM].reset_coords(drop=True).fillna(0.0)
    return xr.dot(sq, member.astype(np.float64), dim=schema.DIM_EXAMPLE)


def total_denominator(ds: xr.Dataset) -> xr.DataArray:
    """Exact Σ_i‖g_{i,l}‖² over ``(step, layer)``: stored ``sq_norm_total`` (format 3), else summed ``sq_norm``."""
    if schema.SQ_NORM_TOTAL in ds.variables:
        return ds[schema.SQ_NORM_TOTAL].reset_coords(drop=True)
    return ds[schema.SQ_NORM].reset_coords(drop=True).sum(schema.DIM_EXAMPLE)


def stored_group_sums(ds: xr.Dataset) -> tuple[xr.DataArray, xr.DataArray] | None:
    """The logger's groups' stored denominators ``(step, layer, group)`` and sizes ``(step, group)``, or None.

    ``group_sq_norm`` and ``group_count`` (format 3) hold what :func:`subset_denominator` and
    ``membership(ds, "group").sum("example")`` compute; older stores lack them (None).
    """
    if schema.GROUP_SQ_NORM not in ds.variables or schema.GROUP_COUNT not in ds.variables:
        return None
    names = {SUBSET_DIM: group_names(ds)}
    den = ds[schema.GROUP_SQ_NORM].reset_coords(drop=True).rename({schema.DIM_GROUP_I: SUBSET_DIM})
    count = ds[schema.GROUP_COUNT].reset_coords(drop=True).rename({schema.DIM_GROUP_I: SUBSET_DIM})
    return den.assign_coords(names), count.assign_coords(names)


def require_sketches(ds: xr.Dataset) -> None:
    """Raise unless ``ds`` has sketches (needed by ``source="sketch"``, ``by="label"`` and mask subsets).

    Raises:
        ValueError: The store was written with ``sketch_dim=0``; the message says how to log sketches.

    """
    if schema.SKETCH not in ds:
        raise ValueError(
            "this store has no sketches (written with sketch_dim=0): source='sketch', by='label' and mask subsets "
            "need a GradientLogger created with sketch_dim=k > 0; use source='exact' or by='group'"
        )


def sketch_numerator(ds: xr.Dataset, member: xr.DataArray | None, *, replicate: bool = False) -> xr.DataArray:
    """Estimated ‖Σ_{i∈S} g_{i,l}‖² from sketches over ``(step, layer[, group])`` (``None``: all examples).

    With ``replicate``, a ``replicate`` dimension holds the jackknife copies (:mod:`gradcoh.analysis.jackknife`).
    """
    require_sketches(ds)
    sk = ds[schema.SKETCH].reset_coords(drop=True)
    if member is None and not replicate:  # one fused pass per chunk (the common, read-bound case)
        return xr.apply_ufunc(
            kernels.sum_sq_of_sum, sk, input_core_dims=[[schema.DIM_EXAMPLE, schema.DIM_PROJ]],
            dask="parallelized", output_dtypes=[np.float64], dask_gufunc_kwargs={"allow_rechunk": True},
        )
    if member is None:
        sums = sk.astype(np.float64).fillna(0.0).sum(schema.DIM_EXAMPLE)
    else:
        sums = xr.dot(sk.astype(np.float64).fillna(0.0), member.astype(np.float64), dim=schema.DIM_EXAMPLE)
    if replicate:
        return jackknife.replicate_sq_norms(sums)
    return (sums * sums).sum(schema.DIM_PROJ)


def group_gram_diagonal(ds: xr.Dataset) -> xr.DataArray:
    """Exact ‖Σ_{i∈a} g_{i,l}‖² per logger group a, from the diagonal of ``group_gram``: ``(step, layer, group)``."""
    names = group_names(ds)
    pos = xr.DataArray(np.arange(len(names)), dims=SUBSET_DIM)
    diag = ds[schema.GROUP_GRAM].isel({schema.DIM_GROUP_I: pos, schema.DIM_GROUP_J: pos})
    return diag.reset_coords(drop=True).assign_coords({SUBSET_DIM: names})
