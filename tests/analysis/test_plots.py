"""Figures: built from computed data, labelled, log-scaled where promised, saved as PNG/SVG."""

from __future__ import annotations

from gradcoh.analysis import m_coherence, metrics_summary, open_store
from gradcoh.analysis.plots import plot_coherence, plot_layer_heatmap, plot_metrics, save_figure


def test_coherence_lines_per_group_and_stream(small_store, tmp_path):
    ds = open_store(small_store.path)
    fig = plot_coherence(m_coherence(ds, by="group").compute(), title="by group")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(lab.startswith("clean (m = ") for lab in labels) and any("corrupted" in lab for lab in labels)
    streams = {s: m_coherence(open_store(small_store.path, stream=s)).compute() for s in ("batch", "probe")}
    fig = plot_coherence(streams)
    assert len(fig.axes[0].get_legend().get_texts()) == 3  # two streams + the orthogonal limit
    save_figure(fig, tmp_path / "c.png")
    save_figure(fig, tmp_path / "c.svg")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:500]


def test_layer_heatmap_depth_order(small_store, tmp_path):
    per = m_coherence(open_store(small_store.path), per_layer=True).compute()
    fig = plot_layer_heatmap(per)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == small_store.layer_names
    assert "m = 9–12" in ax.get_title()
    save_figure(fig, tmp_path / "h.png")


def test_metrics_panel(small_store, tmp_path):
    metrics = metrics_summary(open_store(small_store.path)).compute()
    fig = plot_metrics(metrics)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(metrics.data_vars)
    assert "m = " in fig.get_suptitle()
    save_figure(fig, tmp_path / "m.png")
