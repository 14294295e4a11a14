"""``gradcoh metrics STORE``: per-step m-coherence family and sketch-based pairwise metrics."""

from __future__ import annotations

from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import (
    FormatOpt,
    OutFormat,
    OutOpt,
    ProgressOpt,
    SchedulerOpt,
    StoreArg,
    StreamOpt,
    WorkersOpt,
    want_progress,
)
from gradcoh.cli.output import emit

__all__ = ["metrics"]


def metrics(
    store: StoreArg,
    stream: StreamOpt = "batch",
    layers: Annotated[
        list[str] | None, typer.Option("--layers", help="Layer name pattern (glob or regex); repeatable.")
    ] = None,
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

        with analysis.session(scheduler, workers):
            ds = analysis.open_store(store, stream=stream)
            lazy = analysis.metrics_summary(ds, layers=layers or None, block_size=block_size)
            result = analysis.compute(lazy, progress=want_progress(progress))
        emit(result, fmt, out)
