"""``gradcoh coherence STORE``: m-coherence per step (per layer / per group or label) as a table or file."""

from __future__ import annotations

import enum
from functools import partial
from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import (
    FormatOpt,
    LayersOpt,
    OutFormat,
    OutOpt,
    ProgressOpt,
    SchedulerOpt,
    StderrOpt,
    StoreArg,
    StreamOpt,
    WorkersOpt,
)
from gradcoh.cli.output import emit_analysis

__all__ = ["coherence"]


class SplitBy(enum.StrEnum):
    """Subsets to split m-coherence by."""

    group = "group"
    label = "label"


class Source(enum.StrEnum):
    """Where numerators come from."""

    exact = "exact"
    sketch = "sketch"


def coherence(
    store: StoreArg,
    stream: StreamOpt = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="One value per layer.")] = False,
    by: Annotated[SplitBy | None, typer.Option("--by", help="Split by logger group or by label.")] = None,
    source: Annotated[Source | None, typer.Option(
        "--source", help="exact or sketch numerators (default: exact for the whole batch and groups, sketch for "
        "labels; --source exact --by label is an error).")] = None,
    layers: LayersOpt = None,
    stderr: StderrOpt = False,
    fmt: FormatOpt = OutFormat.table,
    out: OutOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Compute m-coherence ‖Σg‖²/Σ‖g‖² per step; the column m gives the examples behind each value."""
    with reported(store):
        from gradcoh import analysis

        analyse = partial(
            analysis.m_coherence,
            per_layer=per_layer, by=by.value if by else None, source=source.value if source else None,
            layers=layers or None, stderr=stderr,
        )
        emit_analysis(store, stream, analyse, fmt, out, scheduler=scheduler, workers=workers, progress=progress)
