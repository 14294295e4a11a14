"""``gradcoh plot`` figures (one panel per stream, layer types, empty stores) and the demo's summary caption."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from cli_helpers import assert_one_line_error, invoke
from gradcoh.analysis import plots
from gradcoh.analysis.sweep import SweepRow, SweepSummary
from gradcoh.cli.demo import summary_table
from gradcoh.logger import schema
from storefactory import build_store, random_gradients


@pytest.fixture
def drawn(monkeypatch):
    """The figures ``gradcoh plot`` saves, by file name (nothing is written)."""
    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.__setitem__(str(path), fig))
    return figures


def test_default_plot_has_one_panel_per_stream(small_store, tmp_path, drawn):
    out = tmp_path / "c.png"
    result = invoke("plot", small_store.path, "-o", out)
    assert result.exit_code == 0, result.output
    fig = drawn[str(out)]
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2
    assert titles[0].startswith("batch stream, m = 9–12") and titles[1].startswith("probe stream, m = 8")
    assert "run.zarr" in fig.get_suptitle()


@pytest.mark.filterwarnings("ignore::gradcoh.analysis.MissingMetadataWarning")  # the probe stream has no labels
@pytest.mark.parametrize("kind", ["coherence", "layers", "groups", "metrics"])
@pytest.mark.parametrize("stream", ["batch", "probe"])
def test_every_kind_names_stream_and_m(small_store, tmp_path, drawn, kind, stream):
    out = tmp_path / f"{kind}.png"
    result = invoke("plot", small_store.path, "-o", out, "--kind", kind, "--stream", stream)
    assert result.exit_code == 0, result.output
    fig = drawn[str(out)]
    text = " ".join([fig.get_suptitle(), *(ax.get_title() for ax in fig.axes)])
    assert f"{stream} stream" in text and "m = " in text


def test_layers_heatmap_rows_name_the_module_type(small_store, tmp_path, drawn):
    out = tmp_path / "l.png"
    assert invoke("plot", small_store.path, "-o", out, "--kind", "layers").exit_code == 0
    rows = [t.get_text() for t in drawn[str(out)].axes[0].get_yticklabels()]
    assert rows == [f"{name} · Linear {size} params" for name, size in zip(small_store.layer_names, (6, 9, 4),
                                                                              strict=True)]


def test_plot_store_without_steps_is_an_error(tmp_path):
    grads = random_gradients(np.random.default_rng(0), n_steps=2, m=3, sizes=(2,))
    data = build_store(tmp_path / "none.zarr", grads, include_batch=False)  # a logger that never logged a step
    for kind in ("coherence", "layers", "metrics"):
        result = invoke("plot", data.path, "-o", tmp_path / "x.png", "--kind", kind)
        assert_one_line_error(result)
    assert_one_line_error(invoke("plot", data.path, "-o", tmp_path / "x.png"), "no committed steps")
    assert not (tmp_path / "x.png").exists()


def test_plot_stream_with_zero_committed_steps_is_an_error(tmp_path):
    grads = random_gradients(np.random.default_rng(0), n_steps=2, m=3, sizes=(2,))
    data = build_store(tmp_path / "s.zarr", grads)
    zarr.open_group(data.path, mode="r+")[schema.STREAM_BATCH].attrs[schema.COMMITTED_KEY] = 0
    for args in ((), ("--kind", "layers"), ("--stream", "batch"), ("--kind", "groups")):
        result = invoke("plot", data.path, "-o", tmp_path / "x.png", *args)
        assert_one_line_error(result, "no committed steps")
    assert not (tmp_path / "x.png").exists()


def test_demo_summary_says_probe_stream_and_m():
    row = SweepRow(run="0% noise", m=512, initial=5.5, peak=11.9, peak_step=50, final=3.3, final_step=199,
                   final_loss=0.05)
    text = summary_table(SweepSummary([row]))
    caption, table = text.split("\n\n")
    assert "Probe-stream m-coherence" in caption and "m = the probe size" in caption and "below 1" in caption
    header, line = table.splitlines()
    assert "m (probe size)" in header and line.split()[:3] == ["0%", "noise", "512"]


def _legend(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_plot_by_group_and_by_label(small_store, tmp_path, drawn):
    """``--by`` splits the coherence figure like ``coherence --by`` and ``tensorboard --by``."""
    out = tmp_path / "g.png"
    result = invoke("plot", small_store.path, "-o", out, "--by", "group")
    assert result.exit_code == 0, result.output
    fig = drawn[str(out)]
    assert fig.get_suptitle().startswith("m-coherence by group") and "batch stream" in fig.axes[0].get_title()
    assert {"clean", "corrupted"} <= {t.split(" (")[0] for t in _legend(fig)}
    out = tmp_path / "l.png"
    assert invoke("plot", small_store.path, "-o", out, "--by", "label", "--stream", "batch").exit_code == 0
    fig = drawn[str(out)]
    assert fig.get_suptitle().startswith("m-coherence by label")
    assert {"label 0", "label 1", "label 2"} <= {t.split(" (")[0] for t in _legend(fig)}
    assert_one_line_error(invoke("plot", small_store.path, "-o", tmp_path / "x.png", "--kind", "layers", "--by",
                                 "group"), "--by")


def test_groups_plot_of_a_store_without_groups_says_so(tmp_path, drawn):
    grads = random_gradients(np.random.default_rng(0), n_steps=3, m=4, sizes=(3,))
    data = build_store(tmp_path / "plain.zarr", grads)
    out = tmp_path / "g.png"
    assert invoke("plot", data.path, "-o", out, "--kind", "groups").exit_code == 0
    fig = drawn[str(out)]
    assert "without groups" in fig.get_suptitle() and "by group" not in fig.get_suptitle()
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
    assert all(float(t).is_integer() for t in ticks)  # steps are integers
