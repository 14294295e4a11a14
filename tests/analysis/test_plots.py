"""Figures: labelled (stream, m, layer types), no empty legend entries, readable log ticks, saved as PNG/SVG."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from gradcoh.analysis import m_coherence, metrics_summary, open_store, plots, sweep
from gradcoh.analysis.plots import (
    ALL_EXAMPLES,
    ORTHOGONAL_LABEL,
    PANELS_NOTE,
    NothingToPlotError,
    layer_label,
    layer_labels,
    plot_coherence,
    plot_layer_heatmap,
    plot_metrics,
    plot_streams,
    save_figure,
)
from storefactory import build_store, random_gradients


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def footnote(fig):
    return fig._supxlabel.get_text().replace("\n", " ")  # (Figure.get_supxlabel needs matplotlib 3.10)


def tick_labels(ax):
    ax.figure.canvas.draw()
    return [t.get_text() for t in ax.get_yticklabels() if t.get_text()]


def test_coherence_lines_per_group(small_store, tmp_path):
    ds = open_store(small_store.path)
    fig = plot_coherence(m_coherence(ds, by="group").compute(), title="by group", stream="batch")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel()
    assert fig.get_suptitle() == "by group"
    assert ax.get_title().startswith("batch stream")
    labels = legend_texts(ax)
    # random groups differ in size, so each line carries its own m and the title says so
    assert any(lab.startswith("clean (m = ") for lab in labels) and any("corrupted" in lab for lab in labels)
    assert ax.get_title() == "batch stream, m = 9–12 (the logged batch size); each line's own m in the legend"
    assert ORTHOGONAL_LABEL in labels
    assert "below 1" in footnote(fig)
    save_figure(fig, tmp_path / "c.png")
    save_figure(fig, tmp_path / "c.svg")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:500]


def test_all_nan_series_get_no_legend_entry(tmp_path):
    grads = random_gradients(np.random.default_rng(0), n_steps=3, m=5, sizes=(4,))
    groups = [np.zeros(5, np.int64)] * 3  # group "corrupted" is always empty -> all NaN
    data = build_store(tmp_path / "s.zarr", grads, groups=groups, group_names=("clean", "corrupted"))
    by_group = m_coherence(open_store(data.path), by="group").compute()
    assert np.isnan(by_group.sel(group="corrupted")).all()
    fig = plot_coherence(by_group, stream="batch")
    ax = fig.axes[0]
    assert legend_texts(ax) == ["clean", ORTHOGONAL_LABEL]  # m once, in the title
    assert len(ax.get_lines()) == 2  # clean + the line at 1
    assert "batch stream, m = 5 (the logged batch size)" in ax.get_title()


def test_nothing_to_plot_raises(small_store):
    ds = open_store(small_store.path)
    empty = ds.isel(step=slice(0, 0))
    with pytest.raises(NothingToPlotError, match="no committed steps"):
        plot_coherence(m_coherence(empty).compute())
    with pytest.raises(NothingToPlotError, match="no committed steps"):
        plot_layer_heatmap(m_coherence(empty, per_layer=True).compute())
    with pytest.raises(NothingToPlotError, match="no committed steps"):
        plot_metrics(metrics_summary(empty).compute())
    nan = m_coherence(ds).compute() * np.nan
    with pytest.raises(NothingToPlotError, match="NaN"):
        plot_coherence(nan)
    with pytest.raises(NothingToPlotError):
        plot_streams({"batch": nan})
    assert issubclass(NothingToPlotError, ValueError)  # the CLI reports it as a one-line error


@pytest.mark.parametrize(
    ("entry", "label"),
    [
        ({"name": "1", "type": "Linear", "shapes": [[256, 64], [256]], "size": 16640}, "1 · Linear 64→256"),
        ({"name": "conv", "type": "Conv2d", "shapes": [[32, 16, 3, 3], [32]]}, "conv · Conv2d 3×3 16→32"),
        ({"name": "c1", "type": "Conv1d", "shapes": [[8, 4, 5]]}, "c1 · Conv1d k=5 4→8"),
        ({"name": "emb", "type": "Embedding", "shapes": [[1000, 64]]}, "emb · Embedding 1000×64"),
        ({"name": "ln", "type": "LayerNorm", "shapes": [[512], [512]], "size": 1024}, "ln · LayerNorm 1.02k params"),
        ({"name": "x", "type": "Linear", "shapes": [[6]], "size": 6}, "x · Linear 6 params"),
        ({"name": "bare"}, "bare"),
    ],
)
def test_layer_label(entry, label):
    assert layer_label(entry) == label


def test_layer_labels_from_store(small_store):
    table = open_store(small_store.path).attrs["gradcoh_layers"]
    labels = layer_labels(table)
    assert list(labels) == small_store.layer_names
    assert all("Linear" in text for text in labels.values())
    assert layer_labels(None) == {}


def test_per_layer_lines_show_types_and_m_once(small_store):
    ds = open_store(small_store.path, stream="probe")
    per_layer = m_coherence(ds, per_layer=True).compute()
    lines = {str(n): per_layer.sel(layer=n) for n in per_layer.layer.values}
    fig = plot_coherence(lines, title="layers", stream="probe", labels=layer_labels(ds.attrs["gradcoh_layers"]))
    ax = fig.axes[0]
    entries = [t for t in legend_texts(ax) if t != ORTHOGONAL_LABEL]
    assert len(entries) == len(small_store.layer_names)
    assert all(" · Linear" in t and "m =" not in t for t in entries)
    assert ax.get_title() == "probe stream, m = 8 (the probe size)"


def test_stream_panels(small_store):
    streams = {s: m_coherence(open_store(small_store.path, stream=s)).compute() for s in ("batch", "probe")}
    fig = plot_streams(streams, title="run")
    assert len(fig.axes) == 2  # never two streams of different m on one axis
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("batch stream, m = 9–12") and titles[1].startswith("probe stream, m = 8")
    assert all(legend_texts(ax)[0] == ALL_EXAMPLES for ax in fig.axes)
    assert PANELS_NOTE in footnote(fig)
    # on one axis (plot_coherence), lines of different m each say theirs
    ax = plot_coherence(streams).axes[0]
    assert legend_texts(ax)[:2] == ["batch (m = 9–12)", "probe (m = 8)"]
    assert ax.get_title() == "m given per line (m-coherence grows with m)"
    # an empty stream is left out, the other still drawn
    fig = plot_streams({"batch": streams["batch"], "probe": streams["probe"].isel(step=slice(0, 0))})
    assert len(fig.axes) == 1


@pytest.mark.parametrize(("lo", "hi"), [(0.85, 1.05), (0.45, 2.05), (1.05, 1.7), (1.3, 3.1), (1.0, 12.0),
                                        (0.9, 95.0), (1e-3, 1e3), (0.999, 1.001)])
def test_log_ticks_readable_on_every_range(lo, hi):
    steps = np.arange(10)
    values = np.geomspace(lo, hi, 10)
    data = xr.DataArray(values, dims="step", coords={"step": steps, "m": ("step", np.full(10, 16))})
    ax = plot_coherence(data).axes[0]
    shown = tick_labels(ax)
    assert 4 <= len(shown) <= 12, shown
    assert len(set(shown)) == len(shown)
    low, high = ax.get_ylim()
    assert all(low <= float(t) <= high for t in shown)


def test_layer_heatmap_depth_order_and_labels(small_store, tmp_path):
    ds = open_store(small_store.path)
    per = m_coherence(ds, per_layer=True).compute()
    fig = plot_layer_heatmap(per)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == small_store.layer_names
    assert "m = 9–12" in ax.get_title()
    fig = plot_layer_heatmap(per, title="layers", stream="batch", labels=layer_labels(ds.attrs["gradcoh_layers"]))
    ax, bar = fig.axes
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert [r.split(" · ")[0] for r in rows] == small_store.layer_names and all("Linear" in r for r in rows)
    assert ax.get_title().startswith("batch stream, m = 9–12")
    assert len(tick_labels(bar)) >= 3
    save_figure(fig, tmp_path / "h.png")


def test_metrics_panel(small_store, tmp_path):
    metrics = metrics_summary(open_store(small_store.path)).compute()
    fig = plot_metrics(metrics, stream="batch")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(metrics.data_vars)
    assert "batch stream, m = " in fig.get_suptitle()
    save_figure(fig, tmp_path / "m.png")


def test_sweep_figures_label_layers_and_stream(small_store, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.__setitem__(path.name, fig))
    written = sweep.write_figures({"a": small_store.path, "b noise": small_store.path}, tmp_path, title="toy")
    assert [p.name for p in written] == ["coherence.png", "layers_a.png", "layers_b_noise.png"]  # no corrupted probe
    for fig in drawn.values():
        ax = fig.axes[0]
        assert ax.get_title() == "probe stream, m = 8 (the probe size)"
        assert fig.get_suptitle().startswith("toy: ")
    entries = legend_texts(drawn["layers_a.png"].axes[0])
    assert all("Linear" in e for e in entries if e != ORTHOGONAL_LABEL)


def test_single_step_figures():
    coords = {"step": [5], "layer": ["a", "b"], "m": ("step", [4])}
    fig = plot_layer_heatmap(xr.DataArray([[1.5, 2.0]], dims=("step", "layer"), coords=coords))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["5"]
    line = xr.DataArray([1.5], dims="step", coords={"step": [5], "m": ("step", [4])})
    assert legend_texts(plot_coherence(line).axes[0]) == [ALL_EXAMPLES, ORTHOGONAL_LABEL]
