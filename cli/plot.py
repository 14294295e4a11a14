"""``gradcoh plot STORE -o FILE.png``: coherence, per-layer heatmap, per-group lines or a metrics panel."""

from __future__ import annotations

import enum
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


def _figure(store: str, kind: Kind, stream: str | None, progress: bool):
    from gradcoh import analysis
    from gradcoh.analysis import plots

    if kind is Kind.coherence:
        streams = [stream] if stream else analysis.list_streams(analysis.open_root(store))
        lazy = {s: analysis.m_coherence(analysis.open_store(store, stream=s)) for s in streams}
        return plots.plot_coherence(analysis.compute(lazy, progress=progress), title=f"m-coherence: {store}")
    ds = analysis.open_store(store, stream=stream or "batch")
    if kind is Kind.layers:
        data = analysis.compute(analysis.m_coherence(ds, per_layer=True), progress=progress)
        return plots.plot_layer_heatmap(data, title="per-layer m-coherence")
    if kind is Kind.groups:
        data = analysis.compute(analysis.m_coherence(ds, by="group"), progress=progress)
        return plots.plot_coherence(data, title="m-coherence by group")
    data = analysis.compute(analysis.metrics_summary(ds), progress=progress)
    return plots.plot_metrics(data, title="gradient metrics")


def plot(
    store: StoreArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Figure file (.png, .svg, .pdf).")],
    kind: Annotated[Kind, typer.Option("--kind", help="What to draw.")] = Kind.coherence,
    stream: Annotated[
        str | None, typer.Option("--stream", help="Stream (default: all streams for coherence, else batch).")
    ] = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Draw a figure from a store and save it to FILE."""
    with reported(store):
        from gradcoh import analysis
        from gradcoh.analysis import plots

        with analysis.session(scheduler, workers):
            fig = _figure(store, kind, stream, want_progress(progress))
        plots.save_figure(fig, out)
        typer.echo(f"wrote {out}", err=True)
