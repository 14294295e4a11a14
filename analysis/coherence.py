"""m-coherence and the quantities that are functions of it (Dataset → DataArray).

For m examples with per-example gradients g_i, m-coherence = ‖Σ_i g_i‖² / Σ_i‖g_i‖² (Chatterjee & Zielinski,
"Making Coherence Out of Nothing At All: Measuring the Evolution of Gradient Alignment", the sample version of their
coherence α): 1 for mutually orthogonal gradients, m for identical ones. Numerators and denominators are sums over
layers, so the network value is Σ_l numerator_l / Σ_l denominator_l (never an average of per-layer ratios).

:func:`m_coherence` is the one implementation of the ratio (with the ``finite``/``reconciled`` masking of
:mod:`gradcoh.analysis.finite`); every other function here, and :func:`~gradcoh.analysis.metrics_summary`, derives
its values from its result.

All functions are plain, lazy xarray reductions: they work unchanged on NumPy- and Dask-backed Datasets and on any
active Dask scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import dask.array
import numpy as np
import xarray as xr
from gradcoh.analysis import jackknife, kernels
from gradcoh.analysis.finite import mask_nonfinite
from gradcoh.analysis.layers import select_layers
from gradcoh.analysis.subsets import (
    SUBSET_DIM,
    group_gram_diagonal,
    membership,
    require_sketches,
    sketch_numerator,
    stored_group_sums,
    subset_denominator,
    total_denominator,
)
from gradcoh.logger import schema

__all__ = [
    "alpha",
    "coherence_family",
    "coherence_parts",
    "debiased_alpha",
    "gradient_diversity",
    "m_coherence",
    "noise_scale",
]

Source = Literal["exact", "sketch"] | None
By = str | xr.DataArray | None
LABEL_DIM = "label"
"""The subset dimension of a ``by="label"`` result (one entry per label value; ``group`` for groups and masks)."""
Layers = str | Sequence[str] | None


def _check_source(source: str | None) -> None:
    if source not in (None, "exact", "sketch"):
        raise ValueError(f"source must be None, 'exact' or 'sketch', got {source!r}")


def _subset_source(by: str | xr.DataArray, source: str | None) -> str:
    """The numerator source of a subset split: exact only for the logger's groups (``group_gram``).

    Raises:
        ValueError: ``source="exact"`` asked for a subset the store holds no exact sums for (labels, masks).

    """
    has_exact = isinstance(by, str) and by == "group"
    if source == "exact" and not has_exact:
        what = f"by={by!r}" if isinstance(by, str) else "a mask subset"
        raise ValueError(
            f"m-coherence {what} has no exact value: the logger stores exact subset sums only for its groups "
            "(group_gram). Pass source='sketch' for the sketch estimate (relative sd about sqrt(2/k)), or log the "
            "subsets as groups (GradientLogger(groups=...), record(group=...)) and use by='group'"
        )
    if source is None:
        return "exact" if has_exact else "sketch"
    return source


def _whole_batch_parts(ds: xr.Dataset, source: str, replicate: bool) -> xr.Dataset:
    den = total_denominator(ds)
    if source != "sketch":
        num = ds[schema.SUM_SQ_NORM].reset_coords(drop=True)
    else:
        num = sketch_numerator(ds, None, replicate=replicate)
    m = ds[schema.N_EXAMPLES].reset_coords(drop=True)  # lazy: read when the result is computed
    return xr.Dataset({"numerator": num, "denominator": den, "m": m})


def _subset_parts(ds: xr.Dataset, by: str | xr.DataArray, source: str | None,
                  replicate: bool) -> tuple[xr.Dataset, str]:
    groups = isinstance(by, str) and by == "group"
    exact = _subset_source(by, source) == "exact"
    if not exact:
        require_sketches(ds)  # before membership, which may warn about missing labels
    stored = stored_group_sums(ds) if groups else None  # format 3: no per-example array read for exact values
    member = None if exact and stored is not None else membership(ds, by)
    den, m = stored if stored is not None else (subset_denominator(ds, member), member.sum(schema.DIM_EXAMPLE))
    num = group_gram_diagonal(ds) if exact else sketch_numerator(ds, member, replicate=replicate)
    return xr.Dataset({"numerator": num, "denominator": den, "m": m}), ("exact" if exact else "sketch")


def coherence_parts(ds: xr.Dataset, *, by: By = None, source: Source = None, layers: Layers = None,
                    replicate: bool = False) -> xr.Dataset:
    """Per-layer numerators ‖Σ g‖², denominators Σ‖g‖² and sizes m, the ingredients of every coherence result.

    Args:
        ds: A store Dataset (:func:`~gradcoh.analysis.open_store`).
        by: ``None``, ``"group"``, ``"label"`` or a ``(step, example)`` bool/int DataArray (see
            :func:`~gradcoh.analysis.subsets.membership`).
        source: ``"exact"``, ``"sketch"`` or ``None`` (exact where the store has exact sums: the whole batch and the
            logger's groups; the sketch estimate for labels and masks). ``"exact"`` with labels or a mask raises.
        layers: Layer name pattern(s) (glob or regex).
        replicate: Sketch numerators get a ``replicate`` dimension of jackknife copies
            (:mod:`gradcoh.analysis.jackknife`); exact numerators have none.

    Returns:
        Dataset with ``numerator`` and ``denominator`` ``(step, layer[, group])`` and ``m`` ``(step[, group])``;
        attribute ``numerator_source`` says which numerator was used.

    Raises:
        ValueError: Bad ``source``/``by``/``layers``, ``source="exact"`` for a subset without exact sums (labels,
            masks), or sketches needed but absent.

    """
    _check_source(source)
    ds = select_layers(ds, layers)
    if by is None:
        parts, used = _whole_batch_parts(ds, source, replicate), source or "exact"
    else:
        parts, used = _subset_parts(ds, by, source, replicate)
    parts.attrs["numerator_source"] = used
    return parts


def _unfused(m: xr.DataArray) -> xr.DataArray:
    """``m`` in a graph layer that Dask's blockwise fusion keeps.

    A lazy coordinate that is also an input of its DataArray's data (α = m-coherence / m) is fused into the data by
    ``dask.compute``'s optimisation and then missing ("Missing dependency", dask 2026.8); an index take is not
    a blockwise layer, so it stays.
    """
    if not isinstance(m.data, dask.array.Array):
        return m
    return m.copy(data=m.data[np.arange(m.shape[0])] if m.ndim == 1 else m.data[np.arange(m.shape[0]), ...])


def _finish(values: xr.DataArray, m: xr.DataArray, name: str, long_name: str, used: str) -> xr.DataArray:
    values = values.assign_coords(m=m)
    values.name = name
    values.attrs = {"long_name": long_name, "numerator_source": used}
    return values


def _ratio(num: xr.DataArray, den: xr.DataArray) -> xr.DataArray:
    return xr.apply_ufunc(kernels.safe_ratio, num, den, dask="parallelized", output_dtypes=[np.float64])


def m_coherence(
    ds: xr.Dataset,
    *,
    per_layer: bool = False,
    by: By = None,
    source: Source = None,
    layers: Layers = None,
    stderr: bool = False,
) -> xr.DataArray | xr.Dataset:
    """m-coherence ‖Σ_i g_i‖² / Σ_i‖g_i‖² per step (and layer, and subset).

    Exact values use ``sum_sq_norm`` (or the ``group_gram`` diagonal for ``by="group"``) over the exact
    ``Σ sq_norm``. Sketch values replace the numerator by ‖Σ_i s_i‖² of the sketches (unbiased, with relative
    standard deviation about sqrt(2/k) for sketch width k); the denominator stays exact.

    Args:
        ds: A store Dataset.
        per_layer: Keep the ``layer`` dimension instead of the network total Σ_l num_l / Σ_l den_l.
        by: ``None`` (all examples), ``"group"``, ``"label"`` (needs sketches, and labels: a store logged without
            ``labels=`` warns with :class:`~gradcoh.analysis.io.MissingMetadataWarning` and gives no subset), or a
            ``(step, example)`` DataArray: boolean (one subset, named after the array) or integer (one subset per
            distinct value ≥ 0). Padding is excluded by position (:func:`~gradcoh.analysis.io.valid_examples`).
        source: ``"exact"``, ``"sketch"`` or ``None`` (the default: exact for the whole batch and the logger's
            groups, the sketch estimate for labels and masks, the only numerator the store has for them; the
            result's ``numerator_source`` attribute says which). ``source="exact"`` with ``by="label"`` or a mask
            raises ``ValueError``: it is never answered with an estimate.
        layers: Layer name pattern(s) (glob or regex); the total is over the selected layers.
        stderr: Return a Dataset with ``m_coherence`` and ``m_coherence_stderr``, the jackknife standard error of
            sketch values (:mod:`gradcoh.analysis.jackknife`; 0 for exact values).

    Returns:
        DataArray over ``step`` (+ ``layer`` if ``per_layer``, + ``label`` for ``by="label"``, whose values are the
        labels, or ``group`` for groups and masks), with coordinate ``m`` (the
        examples behind each value); NaN where there is no example, and NaN (with a ``RuntimeWarning``) at steps
        whose gradients were not finite or not reconciled (``finite``/``reconciled`` False; per layer with
        ``per_layer``). A Dataset with ``stderr=True``.

    Examples:
        >>> coh = m_coherence(ds, per_layer=True)  # doctest: +SKIP
        >>> coh.dims  # doctest: +SKIP
        ('step', 'layer')

    """
    coh = _m_coherence(ds, per_layer=per_layer, by=by, source=source, layers=layers, replicate=stderr)
    return jackknife.with_stderr(coh) if stderr else coh


def _m_coherence(ds: xr.Dataset, *, per_layer: bool = False, by: By = None, source: Source = None,
                 layers: Layers = None, replicate: bool = False) -> xr.DataArray:
    """:func:`m_coherence`, with a ``replicate`` dimension for sketch values when ``replicate``."""
    parts = coherence_parts(ds, by=by, source=source, layers=layers, replicate=replicate)
    num, den = parts["numerator"], parts["denominator"]
    if not per_layer:
        num, den = num.sum(schema.DIM_LAYER), den.sum(schema.DIM_LAYER)
    dims = [d for d in (jackknife.REPLICATE_DIM, schema.DIM_STEP, schema.DIM_LAYER, SUBSET_DIM) if d in num.dims]
    values = _ratio(num, den).transpose(*dims)
    values = mask_nonfinite(values, select_layers(ds, layers), per_layer=per_layer)
    values = _finish(values, _unfused(parts["m"]), "m_coherence", "m-coherence ‖Σg‖²/Σ‖g‖²",
                     parts.attrs["numerator_source"])
    return values.rename({SUBSET_DIM: LABEL_DIM}) if isinstance(by, str) and by == "label" else values


def _alpha_of(coh: xr.DataArray) -> xr.DataArray:
    return coh / coh["m"].where(coh["m"] > 0)


def _debiased_alpha_of(coh: xr.DataArray) -> xr.DataArray:
    return (coh - 1.0) / (coh["m"] - 1).where(coh["m"] > 1)


def _gradient_diversity_of(coh: xr.DataArray) -> xr.DataArray:
    return xr.apply_ufunc(kernels.safe_ratio, 1.0, coh, dask="parallelized", output_dtypes=[np.float64])


def _noise_scale_of(coh: xr.DataArray) -> xr.DataArray:
    return xr.apply_ufunc(kernels.safe_ratio, coh["m"], coh, dask="parallelized", output_dtypes=[np.float64]) - 1.0


_DERIVED: dict[str, tuple[Callable[[xr.DataArray], xr.DataArray], str]] = {
    "alpha": (_alpha_of, "α_m = m-coherence / m"),
    "debiased_alpha": (_debiased_alpha_of, "(m-coherence − 1)/(m − 1)"),
    "gradient_diversity": (_gradient_diversity_of, "Σ‖g‖²/‖Σg‖²"),
    "noise_scale": (_noise_scale_of, "B_simple = tr Σ / ‖ḡ‖²"),
}
"""The functions of m-coherence (and m): name → (function of the m-coherence DataArray, long name)."""


def _derive(coh: xr.DataArray, name: str) -> xr.DataArray:
    function, long_name = _DERIVED[name]
    return _finish(function(coh), coh["m"], name, long_name, coh.attrs["numerator_source"])


def _derived(ds: xr.Dataset, name: str, stderr: bool, kwargs: dict) -> xr.DataArray | xr.Dataset:
    values = _derive(_m_coherence(ds, replicate=stderr, **kwargs), name)
    return jackknife.with_stderr(values) if stderr else values


def alpha(ds: xr.Dataset, *, stderr: bool = False, **kwargs) -> xr.DataArray | xr.Dataset:
    """Sample coherence α_m = m-coherence / m (Chatterjee & Zielinski's α of the sample).

    Same arguments as :func:`m_coherence`.
    """
    return _derived(ds, "alpha", stderr, kwargs)


def debiased_alpha(ds: xr.Dataset, *, stderr: bool = False, **kwargs) -> xr.DataArray | xr.Dataset:
    """Population coherence estimate (m-coherence − 1)/(m − 1), comparable across m.

    Not from the paper: for an i.i.d. sample, E‖Σ_i g_i‖² = m E‖g‖² + m(m − 1)‖μ‖², so m-coherence ≈ 1 + (m − 1) α_pop
    with α_pop = ‖μ‖²/E‖g‖². A ratio of unbiased estimators (consistent, not exactly unbiased). NaN for m ≤ 1. Same
    arguments as :func:`m_coherence`.
    """
    return _derived(ds, "debiased_alpha", stderr, kwargs)


def gradient_diversity(ds: xr.Dataset, *, stderr: bool = False, **kwargs) -> xr.DataArray | xr.Dataset:
    """Gradient diversity Σ_i‖g_i‖² / ‖Σ_i g_i‖² of Yin et al. (2018) = 1 / m-coherence.

    Chatterjee & Zielinski note the connection in their abstract. Same arguments as :func:`m_coherence`.
    """
    return _derived(ds, "gradient_diversity", stderr, kwargs)


def noise_scale(ds: xr.Dataset, *, stderr: bool = False, **kwargs) -> xr.DataArray | xr.Dataset:
    """Simple gradient noise scale B_simple = tr Σ / ‖ḡ‖² (McCandlish et al.), exact from the same sums.

    With the population-normalised sample covariance Σ = (1/m) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ, tr Σ = Σ_i‖g_i‖²/m − ‖ḡ‖², so
    α_m = 1 / (1 + B_simple) and B_simple = m / m-coherence − 1. Same arguments as :func:`m_coherence`.
    """
    return _derived(ds, "noise_scale", stderr, kwargs)


def coherence_family(ds: xr.Dataset, *, stderr: bool = False, **kwargs) -> xr.Dataset:
    """m-coherence and every quantity derived from it, from one :func:`m_coherence` graph.

    Args:
        ds: A store Dataset.
        stderr: Add ``<name>_stderr`` for every variable (jackknife of sketch values, 0 for exact ones).
        **kwargs: As for :func:`m_coherence`.

    Returns:
        Dataset with ``m_coherence``, ``alpha``, ``debiased_alpha``, ``gradient_diversity`` and ``noise_scale``
        (each with a ``long_name``), coordinate ``m``.

    """
    coh = _m_coherence(ds, replicate=stderr, **kwargs)
    out = xr.Dataset({"m_coherence": coh, **{name: _derive(coh, name) for name in _DERIVED}})
    return jackknife.with_stderr(out) if stderr else out
