"""Pairwise comparison metrics (stiffness, gradient confusion, mean cosine), estimated from sketches.

These are the O(m²) metrics that Chatterjee & Zielinski ("Making Coherence Out of Nothing At All: Measuring the
Evolution of Gradient Alignment") compare m-coherence with. They need every pairwise inner product, so they are
computed from the stored sketches (layer sketches concatenated over the selected layers): every value here is an
**estimate**. The sketches are seeded projections of width k (CountSketch or block TensorSketch), one per
parameter, summed per layer (:mod:`gradcoh.logger.sketch`); they are unbiased for inner products, and a cosine is
typically off by about 1/sqrt(k) (standard deviation), so signs of near-orthogonal pairs are noisy; ``stderr=True``
gives each estimate its jackknife standard error (:mod:`gradcoh.analysis.jackknife`). Cosines use sketch norms
in both numerator and denominator, so they stay in [−1, 1]. Pairs are i ≠ j only (the diagonal is excluded, as
in the papers).

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
from gradcoh.analysis import jackknife, kernels
from gradcoh.analysis.coherence import Layers
from gradcoh.analysis.finite import mask_nonfinite
from gradcoh.analysis.io import holds_metadata, valid_examples, warn_missing_metadata
from gradcoh.analysis.layers import select_layers
from gradcoh.analysis.subsets import distinct_values, known_values
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


def _require_sketches(ds: xr.Dataset) -> None:
    if schema.SKETCH not in ds:
        raise ValueError(
            "pairwise metrics need sketches, but this store has no sketches (written with sketch_dim=0): "
            "create the GradientLogger with sketch_dim=k > 0 (e.g. 256) to log them"
        )


def _sketch(ds: xr.Dataset, replicate: bool = False) -> xr.DataArray:
    """The stored sketch, one chunk per step; with ``replicate``, its jackknife copies along ``replicate``."""
    _require_sketches(ds)
    sk = ds[schema.SKETCH].reset_coords(drop=True)
    sk = sk.chunk(_PER_STEP) if sk.chunks is not None else sk
    return jackknife.replicates(sk) if replicate else sk


def _like(da: xr.DataArray, sketch: xr.DataArray) -> xr.DataArray:
    """Per-example ``da`` repeated along the sketch's ``replicate`` dimension, if it has one (kernels loop over it)."""
    if jackknife.REPLICATE_DIM not in sketch.dims:
        return da
    return da.expand_dims({jackknife.REPLICATE_DIM: sketch.sizes[jackknife.REPLICATE_DIM]})


def _per_example(da: xr.DataArray) -> xr.DataArray:
    da = da.reset_coords(drop=True)
    return da.chunk({schema.DIM_STEP: 1, schema.DIM_EXAMPLE: -1}) if da.chunks is not None else da


def _labels(ds: xr.Dataset, by: str | xr.DataArray) -> xr.DataArray:
    if isinstance(by, xr.DataArray):
        return by
    if by in (schema.LABEL, schema.GROUP, schema.TRUE_LABEL):
        return ds[by]
    raise ValueError(f"by must be 'label', 'true_label', 'group' or a (step, example) DataArray, got {by!r}")


_WITHIN_BETWEEN = ("no pair counts as within or between classes (cos_within, cos_between, sign_within and "
                   "sign_between are NaN)")


def _checked_pairs(ds: xr.Dataset, *, by: str | xr.DataArray, layers: Layers, block_size: int, bins: int,
                   needed_by: str | None, replicate: bool = False) -> xr.Dataset:
    """:func:`pair_statistics`, warning when ``by`` names labels the store does not hold (unless ``needed_by=None``).

    ``needed_by`` says who asks, for the message (a ``str.format`` template that may use ``{by!r}``). Callers that
    use only the all-pair statistics (cosine mean, confusion) pass ``None``: labels do not matter to them.
    """
    if block_size < 1 or bins < 2:
        raise ValueError("block_size must be ≥ 1 and bins ≥ 2")
    ds = select_layers(ds, layers)
    _require_sketches(ds)
    if needed_by and isinstance(by, str) and by in (schema.LABEL, schema.TRUE_LABEL) and not holds_metadata(ds, by):
        warn_missing_metadata(ds, by, needed_by.format(by=by), _WITHIN_BETWEEN)
    return _pairs(ds, by, block_size, bins, replicate)


def _pairs(ds: xr.Dataset, by: str | xr.DataArray, block_size: int, bins: int, replicate: bool) -> xr.Dataset:
    """:func:`pair_statistics` of ``ds`` (layers already selected), without the check for missing labels."""
    n_stats = kernels.HIST_START + bins
    sketch = _sketch(ds, replicate)
    raw = xr.apply_ufunc(
        kernels.pairwise_stats,
        sketch,
        _like(_per_example(_labels(ds, by)), sketch),
        _like(_per_example(valid_examples(ds)), sketch),
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
            integer ``(step, example)`` DataArray; values < 0 count only towards the global statistics. A store
            without the labels named warns (:class:`~gradcoh.analysis.io.MissingMetadataWarning`). Padding is
            excluded by position (:func:`~gradcoh.analysis.io.valid_examples`), whatever the labels.
        layers: Layer name pattern(s).
        block_size: Rows per block of the m×m matrix.
        bins: Histogram bins on [−1, 1].

    Returns:
        Dataset over ``step`` with ``stats`` (``stat`` = :data:`~gradcoh.analysis.kernels.PAIR_STATS`) and ``hist``
        (``bin``), plus coordinate ``m``.

    """
    return _checked_pairs(ds, by=by, layers=layers, block_size=block_size, bins=bins,
                          needed_by="pair_statistics(by={by!r})")


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
    stderr: bool = False,
) -> xr.Dataset:
    """Stiffness of Fort et al. (2019) per step, estimated from sketches.

    ``cos_*`` are means of cos(g_i, g_j) and ``sign_*`` means of sign(g_i · g_j) over pairs i < j: all pairs
    (``global``), pairs with the same ``by`` value (``within``) and with different values (``between``).

    Args:
        ds: A store Dataset with sketches.
        by: Class definition for within/between (see :func:`pair_statistics`).
        layers: Layer name pattern(s).
        block_size: Rows per block of the m×m matrix.
        stderr: Add ``<name>_stderr`` for every variable: the jackknife standard error of the sketch estimate
            (:mod:`gradcoh.analysis.jackknife`; costs G + 1 = 33 passes over the pairs).

    Returns:
        Dataset over ``step`` with ``cos_global, cos_within, cos_between, sign_global, sign_within, sign_between``
        and coordinate ``m``.

    """
    pairs = _checked_pairs(ds, by=by, layers=layers, block_size=block_size, bins=2,
                           needed_by="stiffness(by={by!r})", replicate=stderr)
    out = stiffness_from_pairs(pairs)
    return jackknife.with_stderr(out) if stderr else out


def stiffness_from_pairs(pairs: xr.Dataset) -> xr.Dataset:
    """The stiffness Dataset of :func:`stiffness` from :func:`pair_statistics` output (no recomputation)."""
    stats = pairs["stats"]
    out = xr.Dataset()
    for kind, tag in (("cos", "cos"), ("sign", "sign")):
        for part, src in (("global", "all"), ("within", "within"), ("between", "between")):
            out[f"{kind}_{part}"] = _mean(stats, f"{tag}_{src}", f"n_{src}")
    out.attrs = {"estimate": "from sketches", "pairs": "i < j"}
    return out.assign_coords(m=stats["m"])


def mean_pairwise_cosine(ds: xr.Dataset, *, layers: Layers = None, block_size: int = 1024,
                         stderr: bool = False) -> xr.DataArray | xr.Dataset:
    """Mean cos(g_i, g_j) over pairs i < j per step (sketch estimate); ``stiffness(ds).cos_global``.

    With ``stderr``, a Dataset with ``mean_pairwise_cosine`` and its jackknife ``mean_pairwise_cosine_stderr``.
    """
    pairs = _checked_pairs(ds, by=schema.LABEL, layers=layers, block_size=block_size, bins=2, needed_by=None,
                           replicate=stderr)
    out = stiffness_from_pairs(pairs)["cos_global"]
    out.name = "mean_pairwise_cosine"
    return jackknife.with_stderr(out) if stderr else out


def gradient_confusion(ds: xr.Dataset, *, quantiles: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5),
                       layers: Layers = None, block_size: int = 1024, bins: int = 2000,
                       stderr: bool = False) -> xr.Dataset:
    """Gradient confusion (Sankararaman et al. 2019) per step: the minimum and low quantiles of pairwise cosines.

    Args:
        ds: A store Dataset with sketches.
        quantiles: Levels of the cosine distribution to report.
        layers: Layer name pattern(s).
        block_size: Rows per block of the m×m matrix.
        bins: Histogram bins; quantiles are exact to 2 / bins (the minimum is exact for the sketches).
        stderr: Add ``<name>_stderr`` (jackknife, :mod:`gradcoh.analysis.jackknife`). The minimum is not a smooth
            function of the sketch, so its standard error is a rough guide; quantiles and ``frac_negative`` are
            better behaved.

    Returns:
        Dataset over ``step``: ``min_cos``, ``frac_negative`` (share of pairs with negative cosine) and
        ``cos_quantile`` (``step, quantile``), coordinate ``m``.

    """
    pairs = _checked_pairs(ds, by=schema.LABEL, layers=layers, block_size=block_size, bins=bins, needed_by=None,
                           replicate=stderr)
    out = confusion_from_pairs(pairs, quantiles)
    return jackknife.with_stderr(out) if stderr else out


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
    stderr: bool = False,
) -> xr.DataArray | xr.Dataset:
    """Class stiffness matrix C[a, b] = mean over pairs X_i ∈ a, X_j ∈ b, i ≠ j, of cos (or sign) (Fort et al.).

    Args:
        ds: A store Dataset with sketches.
        kind: ``"cos"`` or ``"sign"``.
        by: Class definition (``"label"`` default; see :func:`pair_statistics`).
        layers: Layer name pattern(s).
        block_size: Rows per block of the m×m matrix.
        stderr: Return a Dataset with the matrix and its jackknife ``<name>_stderr``.

    Returns:
        DataArray ``(step, class_i, class_j)`` (symmetric; NaN where a class pair has no pair that step), with
        coordinate ``n_pairs``; a Dataset with ``stderr``.

    """
    if kind not in ("cos", "sign"):
        raise ValueError(f"kind must be 'cos' or 'sign', got {kind!r}")
    ds = select_layers(ds, layers)
    _require_sketches(ds)
    labels = known_values(ds, _labels(ds, by))  # −1 (no class) at padding and unknown labels
    classes = distinct_values(labels)
    if not classes.size and isinstance(by, str) and by in (schema.LABEL, schema.TRUE_LABEL):
        warn_missing_metadata(ds, by, f"class_stiffness(by={by!r})", "the class matrix is empty")
    codes = xr.apply_ufunc(partial(np.searchsorted, classes), labels, dask="parallelized", output_dtypes=[np.int64])
    codes = codes.where(labels >= 0, -1)
    sketch = _sketch(ds, stderr)
    sums = xr.apply_ufunc(
        kernels.class_pair_sums,
        sketch,
        _like(_per_example(codes), sketch),
        _like(_per_example(valid_examples(ds)), sketch),
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
    return jackknife.with_stderr(out) if stderr else out
