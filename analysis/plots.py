"""Matplotlib figures from already-computed, small results: data in → :class:`~matplotlib.figure.Figure` out.

Figures are built with the object API on an Agg canvas (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import xarray as xr
from gradcoh.logger import schema
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

__all__ = ["plot_coherence", "plot_layer_heatmap", "plot_metrics", "save_figure"]


def _new_figure(width: float = 7.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _m_text(m: xr.DataArray | None) -> str:
    if m is None:
        return ""
    values = np.unique(np.asarray(m.values, dtype=float))
    values = values[np.isfinite(values)]
    if values.size == 0:
        return ""
    lo, hi = int(values.min()), int(values.max())
    return f"m = {lo}" if lo == hi else f"m = {lo}–{hi}"


def _series(data: xr.DataArray | Mapping[str, xr.DataArray]) -> dict[str, xr.DataArray]:
    if isinstance(data, xr.DataArray):
        if "group" in data.dims:
            return {str(g): data.sel(group=g) for g in data["group"].values}
        return {str(data.name or "m-coherence"): data}
    return {str(k): v for k, v in data.items()}


def plot_coherence(data: xr.DataArray | Mapping[str, xr.DataArray], *, title: str | None = None) -> Figure:
    """m-coherence against step on a log y axis: one line per group (``group`` dim) or per mapping entry (stream).

    Args:
        data: A computed ``(step[, group])`` DataArray from :func:`~gradcoh.analysis.m_coherence`, or a mapping of
            names (e.g. streams) to ``(step,)`` DataArrays.
        title: Figure title (the ``m`` of each line is added to its legend entry).

    Returns:
        The figure.

    """
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, series in _series(data).items():
        m = _m_text(series.coords.get("m"))
        ax.plot(series[schema.DIM_STEP].values, series.values, marker=".", label=f"{name} ({m})" if m else name)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="orthogonal limit (1)")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high < 10 * low:  # under one decade there is no major tick to read: label the minor ones
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("training step")
    ax.set_ylabel("m-coherence  ‖Σg‖² / Σ‖g‖²")
    ax.set_title(title or "m-coherence")
    ax.legend(loc="best", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_layer_heatmap(per_layer: xr.DataArray, *, title: str | None = None) -> Figure:
    """Layer × step heatmap of per-layer m-coherence (log colour scale); layers top to bottom in depth order.

    Args:
        per_layer: Computed ``(step, layer)`` DataArray (``m_coherence(ds, per_layer=True)``).
        title: Figure title (``m`` is appended).

    Returns:
        The figure.

    """
    data = per_layer.transpose(schema.DIM_LAYER, schema.DIM_STEP)
    names = [str(n) for n in data[schema.DIM_LAYER].values]
    fig = _new_figure(8.0, max(3.0, 0.35 * len(names) + 1.5))
    ax = fig.add_subplot()
    values = np.ma.masked_invalid(np.asarray(data.values, dtype=float))
    positive = values[values > 0]
    norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size else None
    image = ax.imshow(values, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis")
    steps = data[schema.DIM_STEP].values
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_yticks(range(len(names)), names, fontsize="small")
    ax.set_xlabel("training step")
    ax.set_ylabel("layer (depth order)")
    m = _m_text(per_layer.coords.get("m"))
    ax.set_title(f"{title or 'per-layer m-coherence'}{f' ({m})' if m else ''}")
    fig.colorbar(image, ax=ax, label="m-coherence")
    return fig


def plot_metrics(metrics: xr.Dataset, *, title: str | None = None) -> Figure:
    """Panel of every per-step metric (one subplot per variable over ``step``).

    Args:
        metrics: Computed Dataset over ``step`` (e.g. :func:`~gradcoh.analysis.metrics_summary`).
        title: Figure title (``m`` is appended).

    Returns:
        The figure.

    """
    names = [n for n, v in metrics.data_vars.items() if v.dims == (schema.DIM_STEP,)]
    cols = 3
    rows = max(1, -(-len(names) // cols))
    fig = _new_figure(4.0 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        ax.plot(metrics[schema.DIM_STEP].values, metrics[name].values, marker=".", label=name)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("training step")
        ax.set_ylabel(metrics[name].attrs.get("long_name", name), fontsize="small")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    m = _m_text(metrics.coords.get("m"))
    fig.suptitle(f"{title or 'gradient metrics'}{f' ({m})' if m else ''}")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save a figure; the format follows the file suffix (``.png``, ``.svg``, ``.pdf``)."""
    fig.savefig(path, dpi=120)
