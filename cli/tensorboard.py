"""``gradcoh tensorboard STORE --logdir DIR``: a store's m-coherence curves as TensorBoard scalars."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import StoreArg, StreamOpt

__all__ = ["tensorboard"]


class SplitBy(enum.StrEnum):
    """Subsets to split m-coherence by."""

    group = "group"
    label = "label"


def tensorboard(
    store: StoreArg,
    logdir: Annotated[Path, typer.Option("--logdir", help="TensorBoard log directory to write.")],
    stream: StreamOpt = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="One series per layer.")] = False,
    by: Annotated[SplitBy | None, typer.Option("--by", help="One series per logger group or label.")] = None,
) -> None:
    """Export m-coherence per step (whole model, per layer or per subset) as TensorBoard scalars."""
    with reported(store):
        from gradcoh import analysis
        from gradcoh.cli.output import resolve_stream

        stream, note = resolve_stream(store, stream)
        ds = analysis.open_store(store, stream=stream)
        n = analysis.export_tensorboard(ds, logdir, per_layer=per_layer, by=by.value if by else None,
                                        prefix=f"gradcoh/{stream}")
        typer.echo(f"wrote {n} scalars of stream {stream} to {logdir} (tensorboard --logdir {logdir})")
        if note:
            typer.echo(note, err=True)
