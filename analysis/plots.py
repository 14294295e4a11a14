"""Matplotlib figures from already-computed, small results: data in → :class:`~matplotlib.figure.Figure` out.

Figures are built with the object API on an Agg canvas (no pyplot, no global state, no display needed).

Every figure says what it shows without the code next to it: the figure title names the stream and ``m`` (the
examples behind each value; m-coherence grows with m), layers are shown by name, module type and shape
(:func:`layer_labels`), a footnote says how to read values above and below 1, and log axes carry enough labelled
ticks to read values on any range. Streams of different ``m`` are drawn in separate panels
(:func:`plot_streams`). Empty input raises :class:`NothingToPlotError` instead of producing an empty figure.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from gradcoh.analysis.layers import layer_label, layer_labels
from gradcoh.logger import schema
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullLocator

__all__ = [
    "NothingToPlotError",
    "layer_label",
    "layer_labels",
    "plot_alignment",
    "plot_coherence",
    "plot_layer_heatmap",
    "plot_metrics",
    "plot_streams",
    "save_figure",
]

ORTHOGONAL_LABEL = "1 (orthogonal gradients)"
"""Legend entry of the dotted line at m-coherence 1."""

READING_NOTE = ("m-coherence = ‖Σg‖²/Σ‖g‖² over m per-example gradients: 1 if orthogonal, m if identical; "
                "below 1 they partly cancel (negatively aligned on average).")
"""Footnote of every m-coherence figure."""

PANELS_NOTE = "m differs between panels and m-coherence grows with m: compare their trends, not their levels."
"""Extra footnote of :func:`plot_streams` when the panels differ in m."""

ALL_EXAMPLES = "all examples"
"""Legend entry of a single m-coherence series (no groups)."""

_STREAM_M = {schema.STREAM_BATCH: "the logged batch size", schema.STREAM_PROBE: "the probe size"}
_Series = Mapping[str, xr.DataArray]


class NothingToPlotError(ValueError):
    """The data has no steps, or no finite value: there is nothing to draw (instead of an empty figure)."""


# --- text ------------------------------------------------------------------------------------------------------


BAND_LABEL = "95% band (±1.96 jackknife SE of the sketch estimate)"


def _m_range(m: xr.DataArray | None) -> tuple[int, int] | None:
    if m is None:
        return None
    values = np.asarray(m.values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return None
    return int(values.min()), int(values.max())


def _m_text(m: xr.DataArray | tuple[int, int] | None) -> str:
    span = m if isinstance(m, tuple) or m is None else _m_range(m)
    if span is None:
        return ""
    lo, hi = span
    return f"m = {lo}" if lo == hi else f"m = {lo}–{hi}"


def _stream_text(stream: str | None, span: tuple[int, int] | None, *, per_line: bool = False) -> str:
    """``"probe stream, m = 512 (the probe size)"``.

    ``per_line``: the lines differ in m, which the legend gives per line; ``span`` is then the m of the whole
    stream (all groups together) when known.
    """
    where = f"{stream} stream" if stream else ""
    what = ""
    if span is not None:
        meaning = _STREAM_M.get(stream or "")
        what = f"{_m_text(span)} ({meaning})" if meaning else _m_text(span)
    if per_line:
        what = f"{what}; each line's own m in the legend" if what else "m given per line (m-coherence grows with m)"
    return ", ".join(part for part in (where, what) if part)


def _titles(fig: Figure, ax: Axes | None, title: str, subtitle: str) -> None:
    fig.suptitle(title)
    if ax is not None and subtitle:
        ax.set_title(subtitle, fontsize="medium")


def _footnote(fig: Figure, *notes: str) -> None:
    width = min(int(15 * fig.get_figwidth()), 140)  # characters of the small font per line
    fig.supxlabel("\n".join(textwrap.fill(note, width) for note in notes), fontsize="small", color="dimgrey")


# --- axes ------------------------------------------------------------------------------------------------------


def _tick_labels(ticks: Sequence[float]) -> list[str]:
    """Plain numbers with just enough digits to tell the ticks apart (``0.9995``, ``1``, ``1.0005``)."""
    labels: list[str] = []
    for digits in range(3, 13):
        labels = [f"{t:.{digits}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            break
    return labels


_MANTISSAS = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0), (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0))
"""Round tick values per decade, coarse to fine (the last is about evenly spaced on a log axis)."""


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over ``[lo, hi]``: at least four labels wherever possible, at most about eight.

    The coarsest of decades, 1-2-5, 1-2-3-5 or a fine round series that gives four labels. On a range too small for
    any of them (a log axis from 0.85 to 1.05 has only 0.9 and 1) round, evenly spaced values, as on a linear axis.
    """
    if not (lo > 0 and hi > lo and math.isfinite(lo) and math.isfinite(hi)):
        return []
    exponents = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in _MANTISSAS:
        ticks = [v for e in exponents for m in mantissas if lo <= (v := float(f"{m * 10.0**e:.12g}")) <= hi]
        if len(ticks) >= 4:
            return ticks[:: math.ceil(len(ticks) / 8)]
    ticks: list[float] = []
    for bins in (6, 9, 12):
        ticks = [float(t) for t in MaxNLocator(nbins=bins, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
                 if lo <= t <= hi and t > 0]
        if len(ticks) >= 4:
            break
    return ticks


def _step_axis(ax: Axes) -> None:
    """Label the x axis as training steps, with integer ticks only (no step 2.5)."""
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _readable_log_axis(ax: Axes) -> None:
    """Fixed, plainly labelled ticks on a log y axis (no unlabelled stretch, whatever the range)."""
    lo, hi = ax.get_ylim()
    ticks = _log_ticks(lo, hi)
    if len(ticks) < 2:
        return
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FixedFormatter(_tick_labels(ticks)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(lo, hi)


def _drawable(data: xr.DataArray | _Series) -> dict[str, xr.DataArray]:
    """The series to draw: one per group or mapping entry, all-NaN ones left out (they would be empty legend rows).

    Raises:
        NothingToPlotError: No step, or no finite value in any series.

    """
    if isinstance(data, xr.Dataset):  # m_coherence(..., stderr=True): the error travels as a coordinate
        data = data["m_coherence"].assign_coords(stderr=data["m_coherence_stderr"])
    if isinstance(data, xr.DataArray):
        dim = _subset_dim(data)
        if dim == "label":
            series = {f"label {v}": data.sel(label=v) for v in data["label"].values}
        elif dim and [str(g) for g in data[dim].values] == [schema.DEFAULT_GROUP]:  # a store without groups
            series = {ALL_EXAMPLES: data.isel({dim: 0})}
        elif dim:
            series = {str(g): data.sel({dim: g}) for g in data[dim].values}
        else:
            series = {ALL_EXAMPLES: data}
    else:
        series = {str(k): v for k, v in data.items()}
    if not any(s.sizes.get(schema.DIM_STEP, 0) for s in series.values()):
        raise NothingToPlotError("nothing to plot: no committed steps")
    finite = {k: s for k, s in series.items() if np.isfinite(np.asarray(s.values, dtype=float)).any()}
    if not finite:
        raise NothingToPlotError("nothing to plot: every m-coherence value is NaN")
    return finite


def _subset_dim(data: xr.DataArray) -> str | None:
    """The subset dimension of a split result (``group``, or ``label`` for ``by="label"``), or None."""
    return next((d for d in ("group", "label") if d in data.dims), None)


def _shared_m(series: _Series, data: xr.DataArray | _Series) -> tuple[tuple[int, int] | None, bool]:
    """The m of the title and whether the lines differ in m (then each gives its own in the legend).

    Lines of equal m share it; groups of different sizes give the m of all groups together; other lines of
    different m give none.
    """
    spans = {_m_range(s.coords.get("m")) for s in series.values()}
    spans.discard(None)
    if len(spans) <= 1:
        return (spans.pop() if spans else None), False
    m = data.coords.get("m") if isinstance(data, xr.DataArray) else None
    dim = _subset_dim(m) if m is not None else None
    if dim:
        return _m_range(m.sum(dim)), True
    return None, True


def _coherence_axes(ax: Axes, series: _Series, labels: Mapping[str, str], per_line: bool) -> None:
    """Lines of m-coherence against step on a log axis, the dotted line at 1 and a legend."""
    for name, line in series.items():
        label = labels.get(name, name)
        if per_line and (m := _m_text(line.coords.get("m"))):
            label = f"{label} ({m})"
        steps, values = line[schema.DIM_STEP].values, np.asarray(line.values, dtype=float)
        drawn = ax.plot(steps, values, marker=".", markersize=4, label=label)[0]
        if "stderr" in line.coords:  # a 95% band, kept above zero on the log axis
            half = 1.96 * np.asarray(line.coords["stderr"].values, dtype=float)
            first = not any(c.get_label() == BAND_LABEL for c in ax.collections)
            ax.fill_between(steps, np.maximum(values - half, values / 20), values + half,
                            color=drawn.get_color(), alpha=0.2, linewidth=0, label=BAND_LABEL if first else None)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label=ORTHOGONAL_LABEL)
    ax.set_yscale("log")
    _readable_log_axis(ax)
    _step_axis(ax)
    ax.set_ylabel("m-coherence (log scale)")
    # many lines go beside the axes; bands (which fill the axes) put the legend under them, never over the data
    if len(series) > 8:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    elif ax.collections:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize="small")
    else:
        ax.legend(loc="best", fontsize="small")
    ax.grid(True, alpha=0.3)


# --- figures ---------------------------------------------------------------------------------------------------


def _new_figure(width: float = 7.0, height: float = 4.6) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_coherence(
    data: xr.DataArray | _Series,
    *,
    title: str | None = None,
    stream: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """m-coherence against step on a log y axis: one line per group (``group`` dim) or per mapping entry.

    ``m`` is stated once, under the title, when every line has the same; lines of different ``m`` (e.g. groups of
    different sizes) carry their own in the legend. Series without a finite value are not drawn (no empty legend
    entries). For streams of different ``m`` use :func:`plot_streams` (one panel each).

    Args:
        data: A computed ``(step[, group])`` DataArray from :func:`~gradcoh.analysis.m_coherence` (a Dataset from
            ``m_coherence(..., stderr=True)`` adds a shaded ±1.96 SE band per line), or a mapping of names (runs,
            layers) to ``(step,)`` DataArrays.
        title: Figure title.
        stream: Stream the data comes from (``"batch"``, ``"probe"``), named under the title with ``m``.
        labels: Legend text per line name (e.g. :func:`layer_labels` for per-layer lines); others keep their name.

    Returns:
        The figure.

    Raises:
        NothingToPlotError: No step or no finite value.

    """
    series = _drawable(data)
    span, per_line = _shared_m(series, data)
    fig = _new_figure()
    ax = fig.add_subplot()
    _coherence_axes(ax, series, labels or {}, per_line)
    _titles(fig, ax, title or "m-coherence", _stream_text(stream, span, per_line=per_line))
    _footnote(fig, READING_NOTE)
    return fig


def plot_streams(
    data: Mapping[str, xr.DataArray | _Series],
    *,
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """One panel per stream, each titled with its stream and ``m``: streams of different m never share an axis.

    Args:
        data: ``{stream: computed m-coherence}`` (a ``(step[, group])`` DataArray or a mapping of lines, as for
            :func:`plot_coherence`), in panel order.
        title: Figure title.
        labels: Legend text per line name.

    Returns:
        The figure (panels stacked, sharing the step axis).

    Raises:
        NothingToPlotError: No stream has a step with a finite value.

    """
    panels: dict[str, dict[str, xr.DataArray]] = {}
    for stream, values in data.items():
        try:
            panels[stream] = _drawable(values)
        except NothingToPlotError:
            continue
    if not panels:
        raise NothingToPlotError(f"nothing to plot: no finite m-coherence in stream(s) {', '.join(data) or 'none'}")
    fig = _new_figure(7.0, 1.2 + 2.9 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    spans = set()
    for ax, (stream, series) in zip(axes, panels.items(), strict=True):
        span, per_line = _shared_m(series, data[stream])
        spans.add(span)
        _coherence_axes(ax, series, labels or {}, per_line)
        ax.set_title(_stream_text(stream, span, per_line=per_line), fontsize="medium")
    for ax in axes[:-1]:
        ax.set_xlabel("")
    fig.suptitle(title or "m-coherence")
    _footnote(fig, READING_NOTE, *([PANELS_NOTE] if len(spans) > 1 else []))
    return fig


def _heatmap_colorbar(fig: Figure, ax: Axes, image: Any, lo: float, hi: float) -> None:
    bar = fig.colorbar(image, ax=ax, label="m-coherence (log scale)")
    ticks = _log_ticks(lo, hi)
    if len(ticks) >= 2:
        bar.set_ticks(ticks, labels=_tick_labels(ticks))
    bar.minorticks_off()
    if lo < 1.0 < hi:
        bar.ax.axhline(1.0, color="white", linewidth=2)


def plot_layer_heatmap(
    per_layer: xr.DataArray,
    *,
    title: str | None = None,
    stream: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Layer × step heatmap of per-layer m-coherence (log colour scale); layers top to bottom in depth order.

    Args:
        per_layer: Computed ``(step, layer)`` DataArray (``m_coherence(ds, per_layer=True)``).
        title: Figure title.
        stream: Stream the data comes from, named under the title with ``m``.
        labels: Row label per layer name (:func:`layer_labels` of the store's layer table); others keep their name.

    Returns:
        The figure.

    Raises:
        NothingToPlotError: No step or no finite positive value.

    """
    data = per_layer.transpose(schema.DIM_LAYER, schema.DIM_STEP)
    if not data.sizes[schema.DIM_STEP]:
        raise NothingToPlotError("nothing to plot: no committed steps")
    names = [str(n) for n in data[schema.DIM_LAYER].values]
    values = np.ma.masked_invalid(np.asarray(data.values, dtype=float))
    positive = values[values > 0].compressed()
    if not positive.size:
        raise NothingToPlotError("nothing to plot: no finite positive m-coherence")
    fig = _new_figure(8.0, max(3.4, 0.35 * len(names) + 2.2))
    ax = fig.add_subplot()
    lo, hi = float(positive.min()), float(positive.max())
    image = ax.imshow(values, aspect="auto", interpolation="nearest", norm=LogNorm(vmin=lo, vmax=hi), cmap="viridis")
    steps = data[schema.DIM_STEP].values
    positions = MaxNLocator(nbins=9, integer=True).tick_values(0, len(steps) - 1)
    ticks = sorted({int(t) for t in positions if 0 <= t < len(steps) and float(t).is_integer()}) or [0]
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_yticks(range(len(names)), [(labels or {}).get(n, n) for n in names], fontsize="small")
    ax.set_xlabel("training step")  # (the ticks above are the stored steps)
    ax.set_ylabel("layer (depth order)")
    _heatmap_colorbar(fig, ax, image, lo, hi)
    _titles(fig, ax, title or "per-layer m-coherence", _stream_text(stream, _m_range(per_layer.coords.get("m"))))
    _footnote(fig, READING_NOTE + (" White line on the colour bar: 1." if lo < 1.0 < hi else ""))
    return fig


METRIC_TITLES = {
    "m_coherence": "m-coherence ‖Σg‖²/Σ‖g‖²",
    "alpha": "α = m-coherence / m",
    "debiased_alpha": "mean pairwise alignment (m-coh − 1)/(m − 1)",
    "gradient_diversity": "gradient diversity = 1 / m-coherence",
    "noise_scale": "gradient noise scale B_simple",
    "cos_global": "mean cosine, all pairs (stiffness)",
    "cos_within": "mean cosine, same-label pairs",
    "cos_between": "mean cosine, different-label pairs",
    "sign_global": "mean cosine sign, all pairs",
    "sign_within": "mean cosine sign, same-label pairs",
    "sign_between": "mean cosine sign, different-label pairs",
    "min_cos": "smallest pairwise cosine (confusion)",
    "frac_negative": "fraction of pairs with cosine < 0",
    "cos_q05": "5% quantile of pairwise cosines",
    "cos_median": "median pairwise cosine",
}
"""Panel titles of :func:`plot_metrics` (the column name follows in brackets, as in ``gradcoh metrics``)."""


def plot_metrics(metrics: xr.Dataset, *, title: str | None = None, stream: str | None = None) -> Figure:
    """Panel of every per-step metric (one subplot per variable over ``step``).

    Args:
        metrics: Computed Dataset over ``step`` (e.g. :func:`~gradcoh.analysis.metrics_summary`).
        title: Figure title.
        stream: Stream the metrics come from, named under the title with ``m``.

    Returns:
        The figure.

    Raises:
        NothingToPlotError: No step.

    """
    if not metrics.sizes.get(schema.DIM_STEP, 0):
        raise NothingToPlotError("nothing to plot: no committed steps")
    names = [n for n, v in metrics.data_vars.items() if v.dims == (schema.DIM_STEP,)]
    cols = 3
    rows = max(1, -(-len(names) // cols))
    fig = _new_figure(4.0 * cols, 2.6 * rows + 1.0)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        ax.plot(metrics[schema.DIM_STEP].values, metrics[name].values, marker=".", markersize=4, label=name)
        if name == "m_coherence":
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{METRIC_TITLES.get(name, name)}\n({name})", fontsize="medium")
        _step_axis(ax)
        ax.set_ylabel(metrics[name].attrs.get("long_name", name), fontsize="small")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    subtitle = _stream_text(stream, _m_range(metrics.coords.get("m")))
    fig.suptitle(f"{title or 'gradient metrics'}\n{subtitle}" if subtitle else title or "gradient metrics")
    _footnote(fig, READING_NOTE + " Dotted line in the m_coherence panel: 1.")
    return fig


ALIGNMENT_BINS = 60
"""At most this many step windows per alignment panel (the examples of a window are pooled)."""


_ALIGNMENT_AXIS = {"cosine": "cosine of g_i with the gradient", "share": "share of the gradient's ‖·‖²"}


def _windows(steps: np.ndarray) -> list[np.ndarray]:
    """Positions of consecutive steps pooled into at most :data:`ALIGNMENT_BINS` windows."""
    return [w for w in np.array_split(np.arange(steps.size), min(ALIGNMENT_BINS, steps.size)) if w.size]


def _group_rows(values: xr.DataArray, groups: Sequence[str]) -> dict[str, np.ndarray]:
    """``{group name: (step, example) mask}`` from the ``group`` coordinate (one entry without several groups)."""
    if schema.GROUP not in values.coords or len(groups) < 2:
        return {ALL_EXAMPLES: np.ones(values.shape, dtype=bool)}
    group = np.asarray(values[schema.GROUP].values)
    return {str(name): group == g for g, name in enumerate(groups)}


def plot_alignment(data: Mapping[str, xr.DataArray], *, groups: Sequence[str] = (), title: str | None = None,
                   stream: str | None = None) -> Figure:
    """Distribution of each example's alignment over training, per group (e.g. clean vs corrupted).

    One panel per entry of ``data`` (e.g. the batch gradient and the reference gradient); in each, per group, the
    median over the examples of each window of steps and the band between the 25% and 75% quantiles.

    Args:
        data: ``{panel title: computed (step, example) DataArray}`` from
            :func:`~gradcoh.analysis.example_alignment` with ``per_layer=False`` (keeps the ``group`` coordinate).
        groups: The store's group names (``group_i``), positions of the ``group`` coordinate.
        title: Figure title.
        stream: Stream the values come from.

    Returns:
        The figure.

    Raises:
        NothingToPlotError: No step.

    """
    if not data or not all(v.sizes.get(schema.DIM_STEP, 0) for v in data.values()):
        raise NothingToPlotError("nothing to plot: no committed steps")
    fig = _new_figure(6.0 * len(data), 4.6)
    axes = fig.subplots(1, len(data), squeeze=False).ravel()
    for ax, (name, values) in zip(axes, data.items(), strict=True):
        steps = values[schema.DIM_STEP].values
        windows = _windows(steps)
        x = [steps[w].mean() for w in windows]
        for group, rows in _group_rows(values, groups).items():
            pooled = [np.asarray(values.values)[w][rows[w]] for w in windows]
            qs = np.array([np.nanquantile(p, (0.25, 0.5, 0.75)) if np.isfinite(p).any() else [np.nan] * 3
                           for p in pooled])
            (line,) = ax.plot(x, qs[:, 1], label=f"{group}: median")
            ax.fill_between(x, qs[:, 0], qs[:, 2], color=line.get_color(), alpha=0.2, label=f"{group}: 25–75%")
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize="medium")
        _step_axis(ax)
        ax.set_ylabel(_ALIGNMENT_AXIS.get(values.attrs.get("normalize", ""), "g_i · gradient"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    subtitle = _stream_text(stream, None)
    fig.suptitle(f"{title or 'per-example alignment'}\n{subtitle}" if subtitle else title or "per-example alignment")
    _footnote(fig, "Each example's alignment with the gradient named above each panel: > 0 pulls with it, < 0 "
                   f"against it. The examples of each of up to {ALIGNMENT_BINS} windows of consecutive steps are "
                   "pooled.")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save a figure; the format follows the file suffix (``.png``, ``.svg``, ``.pdf``)."""
    fig.savefig(path, dpi=120)
