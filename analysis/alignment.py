"""Per-example alignment: which examples pull with the batch gradient, which against, and which against a reference.

With ``G = Σ_j g_j`` the batch gradient, ``‖G‖² = Σ_i g_i · G``: each example's ``a_i = g_i · G`` is its exact share
of the m-coherence numerator (Chatterjee & Zielinski's coherence, §2), stored by ``GradientLogger(alignment=True)``
as ``alignment(step, example, layer)``. With a reference set's mean gradient ``R``, ``g_i · R`` is the first-order
term of In-Run Data Shapley (Wang et al., ICLR 2025, §4), stored as ``ref_alignment``. Both add over layers, so the
network value of an example is the sum over (selected) layers; cosines use the matching norms
(``‖g_i‖² = Σ_l sq_norm``, ``‖G‖² = Σ_l sum_sq_norm``, ``‖R‖² = Σ_l ref_sq_norm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import xarray as xr
from gradcoh.analysis.finite import mask_nonfinite
from gradcoh.analysis.io import valid_examples
from gradcoh.analysis.kernels import safe_ratio
from gradcoh.analysis.layers import select_layers
from gradcoh.logger import schema

__all__ = ["example_alignment", "rank_examples"]

Normalize = Literal["cosine", "share"] | None
NORMALIZE = ("cosine", "share", None)


def _require(ds: xr.Dataset, reference: bool) -> str:
    name = schema.REF_ALIGNMENT if reference else schema.ALIGNMENT
    if name not in ds.variables:
        how = "reference=(inputs, targets, loss_fn)" if reference else "alignment=True"
        raise ValueError(f"this store has no {name!r}; log with GradientLogger(..., {how}) to store it")
    return name


def _ratio(num: xr.DataArray, den: xr.DataArray) -> xr.DataArray:
    return xr.apply_ufunc(safe_ratio, num, den, dask="parallelized", output_dtypes=[np.float64])


def example_alignment(ds: xr.Dataset, *, normalize: Normalize = "cosine", reference: bool = False,
                      per_layer: bool = True, layers: str | Sequence[str] | None = None) -> xr.DataArray:
    """Each example's alignment with the batch gradient (or the reference gradient), per step and layer.

    Args:
        ds: A store Dataset (:func:`~gradcoh.analysis.open_store`) logged with ``alignment=True`` (or a reference).
        normalize: ``"cosine"``: ``g_i·G / (‖g_i‖ ‖G‖)`` in [−1, 1]; ``"share"``: ``g_i·G / Σ_j g_j·G``, the
            example's share of ``‖G‖²`` (sums to 1 over the step's examples; with ``reference=True`` the divisor is
            ``|Σ_j g_j·R|``, which keeps each example's sign); ``None``: the raw inner product.
        reference: Use ``R``, the reference set's mean gradient, instead of the batch gradient ``G``.
        per_layer: Keep the ``layer`` dimension; False gives the network value (inner products and squared norms
            summed over the selected layers).
        layers: Layer name pattern(s) (glob or regex).

    Returns:
        DataArray ``(step, example[, layer])`` with the store's per-example coordinates (``index``, ``label``,
        ``group``, ...); NaN at padding, and at steps (layers) whose statistics were not finite or not reconciled.

    Raises:
        ValueError: Bad ``normalize``, or the store lacks the variable (the message names the logger argument).

    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be 'cosine', 'share' or None, got {normalize!r}")
    name = _require(ds, reference)
    ds = select_layers(ds, layers)
    dot = ds[name].where(valid_examples(ds))
    sq = ds[schema.SQ_NORM].reset_coords(drop=True)
    target = (ds[schema.REF_SQ_NORM] if reference else ds[schema.SUM_SQ_NORM]).reset_coords(drop=True)
    if not per_layer:
        dot = dot.sum(schema.DIM_LAYER, skipna=False)
        sq, target = sq.sum(schema.DIM_LAYER), target.sum(schema.DIM_LAYER)
    if normalize == "cosine":
        values = _ratio(dot, np.sqrt(sq * target))
    elif normalize == "share":
        total = abs(dot.sum(schema.DIM_EXAMPLE))  # ‖G‖², or |G·R| (G·R may be negative: keep the signs)
        values = dot / total.where(total != 0)
    else:
        values = dot
    values = mask_nonfinite(values, ds, per_layer=per_layer)
    values.name = f"{'ref_' if reference else ''}alignment"
    against = "the reference gradient R" if reference else "the batch gradient G"
    values.attrs = {"long_name": f"alignment of each example with {against}", "normalize": str(normalize)}
    return values


def _last(values: np.ndarray, inverse: np.ndarray, size: int) -> np.ndarray:
    """The last value of each index (in step order) of a flat array."""
    out = np.full(size, -1, dtype=np.int64)
    out[inverse] = values  # later assignments win: fancy assignment keeps the last occurrence
    return out


def rank_examples(ds: xr.Dataset, *, normalize: Normalize = "cosine", reference: bool = False,
                  layers: str | Sequence[str] | None = None) -> xr.Dataset:
    """Per dataset example, its network alignment aggregated over the steps where it was seen, most negative first.

    Args:
        ds: A store Dataset logged with ``alignment=True`` (or a reference) and ``record(index=...)``.
        normalize: As in :func:`example_alignment` (default: cosines, comparable across steps).
        reference: Rank by the alignment with the reference gradient.
        layers: Layer name pattern(s); the network value sums the selected layers.

    Returns:
        Dataset over ``index`` (dataset index, sorted by ``mean_alignment`` ascending) with ``mean_alignment``,
        ``negative_fraction`` (share of its steps with alignment < 0), ``seen`` (the steps it was logged in where its
        alignment is defined: steps not finite or not reconciled, and zero gradients under ``"cosine"``, are left
        out), ``mean_loss`` (over the same steps; NaN when
        losses were not recorded), and the last ``label``, ``true_label`` and ``group`` seen (−1 if unknown).
        ``.to_dataframe()`` gives the pandas table.

    Raises:
        ValueError: The store has no alignment, or no dataset indices (pass ``index=`` to ``record``).

    """
    values = example_alignment(ds, normalize=normalize, reference=reference, per_layer=False, layers=layers)
    index = ds[schema.INDEX].reset_coords(drop=True).where(valid_examples(ds), -1)
    loss = ds[schema.LOSS].reset_coords(drop=True) if schema.LOSS in ds.variables else xr.full_like(values, np.nan)
    meta = [ds[k].reset_coords(drop=True) for k in (schema.LABEL, schema.TRUE_LABEL, schema.GROUP)]
    a, idx, lo, *rest = (np.asarray(v.values).reshape(-1) for v in xr.align(values, index, loss, *meta))
    keep = (idx >= 0) & np.isfinite(a)
    if not (idx >= 0).any():
        raise ValueError("rank_examples needs dataset indices; pass index= to GradientLogger.record() when logging")
    ids, inverse = np.unique(idx[keep], return_inverse=True)
    seen = np.bincount(inverse, minlength=ids.size)
    mean = np.bincount(inverse, a[keep], ids.size) / seen
    negative = np.bincount(inverse, (a[keep] < 0).astype(float), ids.size) / seen
    loss_ok = np.isfinite(lo[keep])
    loss_n = np.bincount(inverse[loss_ok], minlength=ids.size)
    mean_loss = safe_ratio(np.bincount(inverse[loss_ok], lo[keep][loss_ok].astype(float), ids.size), loss_n)
    order = np.argsort(mean, kind="stable")
    out = xr.Dataset(
        {"mean_alignment": ("index", mean[order]), "negative_fraction": ("index", negative[order]),
         "seen": ("index", seen[order]), "mean_loss": ("index", mean_loss[order])}
        | {k: ("index", _last(v[keep], inverse, ids.size)[order])
           for k, v in zip((schema.LABEL, schema.TRUE_LABEL, schema.GROUP), rest, strict=True)},
        coords={"index": ids[order]},
    )
    if schema.GROUP_I in ds.coords:
        out = out.assign_coords(group_name=("index", _group_names(ds, out[schema.GROUP].values)))
    out.attrs = {"normalize": str(normalize), "against": "reference" if reference else "batch"}
    return out


def _group_names(ds: xr.Dataset, positions: np.ndarray) -> np.ndarray:
    names = np.array([str(g) for g in ds[schema.GROUP_I].values] + [""], dtype=object)
    return names[np.where(positions >= 0, positions, len(names) - 1)].astype(str)
