"""``gradcoh plot STORE -o FILE.png``: coherence, per-layer heatmap, per-group lines or a metrics panel."""

from __future__ import annotations

import enum
from pathlib import PurePath
from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import ProgressOpt, SchedulerOpt, StoreArg, WorkersOpt, want_progress

__all__ = ["plot"]


class Kind(enum.StrEnum):
    """Figure kinds."""

    coherence = "coherence"
    layers = "layers"
    groups = "groups"
    metrics = "metrics"
    alignment = "alignment"


class SplitBy(enum.StrEnum):
    """Subsets to split m-coherence by (one line each)."""

    group = "group"
    label = "label"


TITLES = {
    Kind.coherence: "m-coherence",
    Kind.layers: "per-layer m-coherence",
    Kind.groups: "m-coherence by group",
    Kind.metrics: "gradient metrics",
    Kind.alignment: "per-example alignment",
}


def _open_streams(store: str, stream: str | None):
    """``{stream: Dataset}`` of the streams to draw, each with at least one committed step.

    ``stream`` given: that stream (an error if it is missing or empty). Otherwise every stream of the store that
    holds a committed step.

    Raises:
        NothingToPlotError: No stream to draw holds a committed step.

    """
    from gradcoh import analysis
    from gradcoh.analysis.plots import NothingToPlotError

    names = [stream] if stream else analysis.list_streams(analysis.open_root(store))
    datasets = {}
    for name in names:
        try:
            datasets[name] = analysis.open_store(store, stream=name)
        except analysis.StreamNotFoundError:
            if stream:
                raise
    found = {name: ds for name, ds in datasets.items() if ds.sizes.get("step", 0)}
    if not found:
        which = f"stream {stream!r}" if stream else f"any stream ({', '.join(names) or 'the store has none'})"
        raise NothingToPlotError(f"{store}: no committed steps in {which}; nothing to plot")
    return found


def _split_figure(store: str, stream: str | None, by: SplitBy, progress: bool, bands: dict):
    """m-coherence with one line per logger group or per label (batch stream unless ``stream``)."""
    from gradcoh import analysis
    from gradcoh.analysis import plots
    from gradcoh.logger import schema

    name, ds = next(iter(_open_streams(store, stream or schema.STREAM_BATCH).items()))
    where = PurePath(store).name or store
    if by is SplitBy.group and [str(g) for g in ds[schema.GROUP_I].values] == [schema.DEFAULT_GROUP]:
        title = f"m-coherence: {where} (logged without groups: one line, all examples)"
    else:
        title = f"m-coherence by {by.value}: {where}"
    data = analysis.compute(analysis.m_coherence(ds, by=by.value, **bands), progress=progress)
    return plots.plot_coherence(data, title=title, stream=name)


def _figure(store: str, kind: Kind, stream: str | None, progress: bool, sketch: bool = False,
            by: SplitBy | None = None):
    from gradcoh import analysis
    from gradcoh.analysis import plots
    from gradcoh.logger import schema

    title = f"{TITLES[kind]}: {PurePath(store).name or store}"
    bands = {"source": "sketch", "stderr": True} if sketch else {}
    if kind is Kind.groups or (kind is Kind.coherence and by is not None):
        return _split_figure(store, stream, by or SplitBy.group, progress, bands)
    if by is not None:
        raise ValueError(f"--by splits the coherence and groups figures, not --kind {kind.value}")
    if kind is Kind.coherence:
        lazy = {name: analysis.m_coherence(ds, **bands) for name, ds in _open_streams(store, stream).items()}
        return plots.plot_streams(analysis.compute(lazy, progress=progress), title=title)
    name, ds = next(iter(_open_streams(store, stream or schema.STREAM_BATCH).items()))
    if kind is Kind.layers:
        data = analysis.compute(analysis.m_coherence(ds, per_layer=True), progress=progress)
        labels = plots.layer_labels(ds.attrs.get(schema.LAYERS_KEY))
        return plots.plot_layer_heatmap(data, title=title, stream=name, labels=labels)
    if kind is Kind.alignment:
        groups = [str(g) for g in ds[schema.GROUP_I].values]
        return plots.plot_alignment(analysis.compute(_alignments(ds), progress=progress), groups=groups,
                                    title=title, stream=name)
    data = analysis.compute(analysis.metrics_summary(ds), progress=progress)
    return plots.plot_metrics(data, title=title, stream=name)


def _alignments(ds):
    """``{panel: lazy cosine alignment (step, example)}``: with the batch gradient, and the reference if stored."""
    from gradcoh import analysis
    from gradcoh.logger import schema

    out = {}
    if schema.ALIGNMENT in ds.variables or schema.REF_ALIGNMENT not in ds.variables:
        out["with the batch gradient G"] = analysis.example_alignment(ds, per_layer=False)
    if schema.REF_ALIGNMENT in ds.variables:
        out["with the reference gradient R"] = analysis.example_alignment(ds, per_layer=False, reference=True)
    return out


def plot(
    store: StoreArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Figure file (.png, .svg, .pdf).")],
    kind: Annotated[Kind, typer.Option("--kind", help="What to draw.")] = Kind.coherence,
    stream: Annotated[
        str | None,
        typer.Option("--stream", help="Stream (default: coherence draws one panel per stream, the others batch)."),
    ] = None,
    by: Annotated[SplitBy | None, typer.Option(
        "--by", help="coherence/groups: one line per logger group or per label (labels: sketch estimates).")] = None,
    stderr: Annotated[bool, typer.Option(
        "--stderr", help="coherence/groups: sketch-based values with a shaded 95% band (±1.96 jackknife SE).")] = False,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Draw a figure from a store and save it to FILE.

    Titles name the stream and m (examples per value); streams of different m get separate panels. A store, or
    stream, without committed steps is an error.
    """
    with reported(store):
        from gradcoh import analysis
        from gradcoh.analysis import plots

        with analysis.session(scheduler, workers):
            fig = _figure(store, kind, stream, want_progress(progress), sketch=stderr, by=by)
        plots.save_figure(fig, out)
        typer.echo(f"wrote {out}", err=True)
