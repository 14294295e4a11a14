"""``gradcoh metrics STORE``: per-step m-coherence family and sketch-based pairwise metrics."""

from __future__ import annotations

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
    StoreArg,
    StreamOpt,
    WorkersOpt,
)
from gradcoh.cli.output import emit_analysis

__all__ = ["metrics"]


def metrics(
    store: StoreArg,
    stream: StreamOpt = "batch",
    layers: LayersOpt = None,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="Rows per block of pairwise work.")] = 1024,
    fmt: FormatOpt = OutFormat.table,
    out: OutOpt = None,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """m-coherence, α, debiased α, gradient diversity, noise scale and (with sketches) stiffness and confusion."""
    with reported(store):
        from gradcoh import analysis

        analyse = partial(analysis.metrics_summary, layers=layers or None, block_size=block_size)
        emit_analysis(store, stream, analyse, fmt, out, scheduler=scheduler, workers=workers, progress=progress)
