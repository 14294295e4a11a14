"""Pairwise comparison metrics (stiffness, gradient confusion, mean cosine), estimated from sketches.

These are the O(m²) metrics that Chatterjee & Zielinski ("Making Coherence Out of Nothing At All: Measuring the
Evolution of Gradient Alignment") compare m-coherence with. They need every pairwise inner product, so they are
computed from the stored sketches (layer sketches concatenated over the selected layers): every value here is an
**estimate**. The sketches are seeded TensorSketch projections of width k, one per parameter, summed per layer
(:mod:`gradcoh.logger.sketch`); they are unbiased for inner products, and a cosine is typically off by about
1/sqrt(k) (standard deviation; more when a few rows or columns of a gradient dominate), so signs of near-orthogonal
pairs are noisy. Cosines use sketch norms in both numerator and denominator, so they stay in [−1, 1]. Pairs are
i ≠ j only (the diagonal is excluded, as in the papers).

The m×m matrix of one step is walked in ``block_size × block_size`` blocks (:mod:`gradcoh.analysis.kernels`), so
memory per task is one step's sketch (stored dtype) plus one block; m in the tens of thousands is fine. Work is one
Dask task per step; if the store's zarr chunks hold many steps, ``open_store(path, chunks={"step": 1})`` keeps each
task from holding a whole multi-step chunk. Quantiles come from a
``bins``-bin histogram of cosines on [−1, 1]: each is exact to within one bin width (2 / bins).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import xarray as xr
from gradcoh.analysis import kernels
from gradcoh.analysis.coherence import Layers
from gradcoh.analysis.finite import mask_nonfinite
from gradcoh.analysis.layers import select_layers
from gradcoh.analysis.subsets import distinct_values
from gradcoh.logger import schema

__all__ = [
    "class_stiffness",
    "confusion_from_pairs",
    "gradient_confusion",
    "mean_pairwise_cosine",
    "pair_statistics",
    "stiffness",
    "stiffness_from_pairs",
]

STAT_DIM = "stat"
BIN_DIM = "bin"
CORE = [schema.DIM_EXAMPLE, schema.DIM_LAYER, schema.DIM_PROJ]
_PER_STEP = {schema.DIM_STEP: 1, **{d: -1 for d in CORE}}
"""One task per step: its whole sketch (in the stored dtype) is one chunk; blocks are cast to float64 one by one."""


def _sketch(ds: xr.Dataset) -> xr.DataArray:
    if schema.SKETCH not in ds:
        raise ValueError("pairwise metrics need sketches; this store was written with sketch_dim=0")
    sk = ds[schema.SKETCH].reset_coords(drop=True)
    return sk.chunk(_PER_STEP) if sk.chunks is not None else sk


def _per_example(da: xr.DataArray) -> xr.DataArray:
    da = da.reset_coords(drop=True)
    return da.chunk({schema.DIM_STEP: 1, schema.DIM_EXAMPLE: -1}) if da.chunks is not None else da


def _labels(ds: xr.Dataset, by: str | xr.DataArray) -> xr.DataArray:
    if isinstance(by, xr.DataArray):
        return by
    if by in (schema.LABEL, schema.GROUP, schema.TRUE_LABEL):
        return ds[by]
    raise ValueError(f"by must be 'label', 'true_label', 'group' or a (step, example) DataArray, got {by!r}")


def pair_statistics(
    ds: xr.Dataset,
    *,
    by: str | xr.DataArray = "label",
    layers: Layers = None,
    block_size: int = 1024,
    bins: int = 2000,
) -> xr.Dataset:
    """Raw pair sums per step: counts, cosine and sign sums (all / within / between ``by``) and a cosine histogram.

    Args:
        ds: A store Dataset with sketches.
        by: What "same class" means for within/between: ``"label"`` (default), ``"true_label"``, ``"group"`` or an
            integer ``(step, example)`` DataArray; values < 0 count only towards the global statistics.
        layers: Layer name pattern(s).
        block_size: Rows per block of the m×m matrix.
        bins: Histogram bins on [−1, 1].

    Returns:
        Dataset over ``step`` with ``stats`` (``stat`` = :data:`~gradcoh.analysis.kernels.PAIR_STATS`) and ``hist``
        (``bin``), plus coordinate ``m``.

    """
    if block_size < 1 or bins < 2:
        raise ValueError("block_size must be ≥ 1 and bins ≥ 2")
    ds = select_layers(ds, layers)
    n_stats = kernels.HIST_START + bins
    raw = xr.apply_ufunc(
        kernels.pairwise_stats,
        _sketch(ds),
        _per_example(_labels(ds, by)),
        _per_example(ds[schema.INDEX] >= 0),
        input_core_dims=[CORE, [schema.DIM_EXAMPLE], [schema.DIM_EXAMPLE]],
        output_core_dims=[[STAT_DIM]],
        kwargs={"block_size": block_size, "bins": bins},
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {STAT_DIM: n_stats}},
    )
    stats = raw.isel({STAT_DIM: slice(0, kernels.HIST_START)}).assign_coords({STAT_DIM: list(kernels.PAIR_STATS)})
    hist = raw.isel({STAT_DIM: slice(kernels.HIST_START, None)}).rename({STAT_DIM: BIN_DIM})
    centers = -1.0 + (np.arange(bins) + 0.5) * (2.0 / bins)
    out = xr.Dataset({"stats": stats, "hist": hist.assign_coords({BIN_DIM: centers})})
    out = mask_nonfinite(out, ds)  # (NaN/Inf sketches would count as spurious pairs)
    return out.assign_coords(m=(schema.DIM_STEP, ds[schema.N_EXAMPLES].data))


def _mean(stats: xr.DataArray, total: str, count: str) -> xr.DataArray:
    return xr.apply_ufunc(
        kernels.safe_ratio,
        stats.sel({STAT_DIM: total}, drop=True),
        stats.sel({STAT_DIM: count}, drop=True),
        dask="parallelized",
        output_dtypes=[np.float64],
    )


def stiffness(
    ds: xr.Dataset,
    *,
    by: str | xr.DataArray = "label",
    layers: Layers = None,
    block_size: int = 1024,
) -> xr.Dataset:
    """Stiffness of Fort et al. (2019) per step, estimated from sketches.

    ``cos_*`` are means of cos(g_i, g_j) and ``sign_*`` means of sign(g_i · g_j) over pairs i < j: all pairs
    (``global``), pairs with the same ``by`` value (``within``) and with different values (``between``).

    Args:
        ds: A store Dataset with sketches.
        by: Class definition for within/between (see :func:`pair_statistics`).
        layers: Layer name pattern(s).
        block_size: Rows per block of the m×m matrix.

    Returns:
        Dataset over ``step`` with ``cos_global, cos_within, cos_between, sign_global, sign_within, sign_between``
        and coordinate ``m``.

    """
    return stiffness_from_pairs(pair_statistics(ds, by=by, layers=layers, block_size=block_size, bins=2))


def stiffness_from_pairs(pairs: xr.Dataset) -> xr.Dataset:
    """The stiffness Dataset of :func:`stiffness` from :func:`pair_statistics` output (no recomputation)."""
    stats = pairs["stats"]
    out = xr.Dataset()
    for kind, tag in (("cos", "cos"), ("sign", "sign")):
        for part, src in (("global", "all"), ("within", "within"), ("between", "between")):
            out[f"{kind}_{part}"] = _mean(stats, f"{tag}_{src}", f"n_{src}")
    out.attrs = {"estimate": "from sketches", "pairs": "i < j"}
    return out.assign_coords(m=stats["m"])


def mean_pairwise_cosine(ds: xr.Dataset, *, layers: Layers = None, block_size: int = 1024) -> xr.DataArray:
    """Mean cos(g_i, g_j) over pairs i < j per step (sketch estimate); ``stiffness(ds).cos_global``."""
    out = stiffness(ds, layers=layers, block_size=block_size)["cos_global"]
    out.name = "mean_pairwise_cosine"
    return out


def gradient_confusion(ds: xr.Dataset, *, quantiles: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5),
                       layers: Layers = None, block_size: int = 1024, bins: int = 2000) -> xr.Dataset:
    """Gradient confusion (Sankararaman et al. 2019) per step: the minimum and low quantiles of pairwise cosines.

    Args:
        ds: A store Dataset with sketches.
        quantiles: Levels of the cosine distribution to report.
        layers: Layer name pattern(s).
        block_size: Rows per block of the m×m matrix.
        bins: Histogram bins; quantiles are exact to 2 / bins (the minimum is exact for the sketches).

    Returns:
        Dataset over ``step``: ``min_cos``, ``frac_negative`` (share of pairs with negative cosine) and
        ``cos_quantile`` (``step, quantile``), coordinate ``m``.

    """
    pairs = pair_statistics(ds, layers=layers, block_size=block_size, bins=bins)
    return confusion_from_pairs(pairs, quantiles)


def confusion_from_pairs(pairs: xr.Dataset, quantiles: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5)) -> xr.Dataset:
    """The Dataset of :func:`gradient_confusion` from :func:`pair_statistics` output (no recomputation)."""
    if any(not 0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1], got {quantiles}")
    raw, stats = pairs, pairs["stats"]
    bins = raw.sizes[BIN_DIM]
    qs = xr.apply_ufunc(
        kernels.histogram_quantiles,
        raw["hist"],
        input_core_dims=[[BIN_DIM]],
        output_core_dims=[["quantile"]],
        kwargs={"quantiles": np.asarray(quantiles, dtype=np.float64)},
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"quantile": len(quantiles)}},
    ).assign_coords(quantile=list(quantiles))
    out = xr.Dataset(
        {
            "min_cos": stats.sel({STAT_DIM: "min_cos"}, drop=True),
            "frac_negative": _mean(stats, "n_negative", "n_all"),
            "cos_quantile": qs,
        }
    )
    out.attrs = {"estimate": "from sketches", "quantile_resolution": 2.0 / bins}
    return out


def class_stiffness(
    ds: xr.Dataset,
    *,
    kind: str = "cos",
    by: str | xr.DataArray = "label",
    layers: Layers = None,
    block_size: int = 1024,
) -> xr.DataArray:
    """Class stiffness matrix C[a, b] = mean over pairs X_i ∈ a, X_j ∈ b, i ≠ j, of cos (or sign) (Fort et al.).

    Args:
        ds: A store Dataset with sketches.
        kind: ``"cos"`` or ``"sign"``.
        by: Class definition (``"label"`` default; see :func:`pair_statistics`).
        layers: Layer name pattern(s).
        block_size: Rows per block of the m×m matrix.

    Returns:
        DataArray ``(step, class_i, class_j)`` (symmetric; NaN where a class pair has no pair that step), with
        coordinate ``n_pairs``.

    """
    if kind not in ("cos", "sign"):
        raise ValueError(f"kind must be 'cos' or 'sign', got {kind!r}")
    ds = select_layers(ds, layers)
    labels = _labels(ds, by)
    classes = distinct_values(labels)
    codes = xr.apply_ufunc(partial(np.searchsorted, classes), labels, dask="parallelized", output_dtypes=[np.int64])
    codes = codes.where(labels >= 0, -1)
    sums = xr.apply_ufunc(
        kernels.class_pair_sums,
        _sketch(ds),
        _per_example(codes),
        _per_example(ds[schema.INDEX] >= 0),
        input_core_dims=[CORE, [schema.DIM_EXAMPLE], [schema.DIM_EXAMPLE]],
        output_core_dims=[["class_i", "class_j", "part"]],
        kwargs={"n_classes": len(classes), "block_size": block_size},
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={
            "output_sizes": {"class_i": len(classes), "class_j": len(classes), "part": len(kernels.ClassPart)}
        },
    )
    count = sums.isel(part=kernels.ClassPart.n)
    named = sums.assign_coords(stat=("part", list(kernels.CLASS_PARTS))).swap_dims(part=STAT_DIM)
    out = _mean(named, kind, kernels.ClassPart.n.name)
    out = out.assign_coords(class_i=classes, class_j=classes, n_pairs=count.drop_vars("part", errors="ignore"))
    out = out.assign_coords(m=(schema.DIM_STEP, ds[schema.N_EXAMPLES].data))
    out.name = f"class_stiffness_{kind}"
    out.attrs = {"estimate": "from sketches", "long_name": f"mean {kind} over pairs of classes (i ≠ j)"}
    return out
