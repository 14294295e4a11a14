"""``gradcoh compact STORE [--out NEW]``: rewrite a finished store with shards and consolidated metadata, verified."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import ProgressOpt, SchedulerOpt, StoreArg, WorkersOpt, want_progress

__all__ = ["compact"]


def _default_out(store: str) -> str:
    base = store.rstrip("/")
    stem = base[: -len(".zarr")] if base.endswith(".zarr") else base
    return f"{stem}.compact.zarr"


def compact(
    store: StoreArg,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="New store path or URL (default: STORE with .compact.zarr).")
    ] = None,
    shard_mb: Annotated[
        float, typer.Option("--shard-mb", min=0.001, help="Target uncompressed MiB per shard of the largest array.")
    ] = 128.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare every value afterwards.")] = True,
    scheduler: SchedulerOpt = None,
    workers: WorkersOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Copy a finished STORE into a sharded, consolidated store (fewer, larger objects) and verify every value.

    The source is left untouched; the summary (shard sizes, object counts) is printed as JSON on stdout.
    """
    with reported():
        from gradcoh import analysis
        from gradcoh.analysis.compact import CompactionError, compact_store

        target = out or _default_out(store)
        with analysis.session(scheduler, workers):
            try:
                summary = compact_store(
                    store,
                    target,
                    shard_bytes=int(shard_mb * 2**20),
                    overwrite=overwrite,
                    verify=verify,
                    progress=want_progress(progress),
                )
            except (CompactionError, FileExistsError) as exc:
                raise ValueError(str(exc)) from exc
        typer.echo(json.dumps(summary, indent=1))
