"""Option declarations shared by several commands (``Annotated`` types), and small parsing helpers."""

from __future__ import annotations

import enum
import sys
from typing import Annotated

import typer

__all__ = [
    "FormatOpt",
    "LayersOpt",
    "OutFormat",
    "OutOpt",
    "ProgressOpt",
    "SchedulerOpt",
    "StderrOpt",
    "StoreArg",
    "StreamOpt",
    "WorkersOpt",
    "want_progress",
]


class OutFormat(enum.StrEnum):
    """Output formats of result tables."""

    table = "table"
    csv = "csv"
    json = "json"
    netcdf = "netcdf"


StoreArg = Annotated[str, typer.Argument(help="Store directory or fsspec URL (memory://, file://, s3://).")]
StreamOpt = Annotated[
    str | None,
    typer.Option("--stream", help="Stream to read: batch or probe (default: probe if the store has one, else batch)."),
]
FormatOpt = Annotated[OutFormat, typer.Option("--format", help="Output format.")]
StderrOpt = Annotated[bool, typer.Option(
    "--stderr", help="Add <name>_stderr: the jackknife standard error of each sketch estimate (0 for exact values).")]
LayersOpt = Annotated[
    list[str] | None, typer.Option("--layers", help="Layer name pattern (glob or regex); repeatable.")
]
OutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", envvar="DASK_SCHEDULER_ADDRESS", help="Dask scheduler address (tcp://host:port)."),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=1, help="Start a local Dask cluster with N worker processes.")
]
ProgressOpt = Annotated[
    bool | None, typer.Option("--progress/--no-progress", help="Progress bar on stderr (default: if a terminal).")
]


def want_progress(flag: bool | None) -> bool:
    """Resolve the ``--progress`` tri-state: explicit choice, else show it only on an interactive stderr."""
    return sys.stderr.isatty() if flag is None else flag
