"""Computing a command's result on the chosen Dask scheduler, and writing it in the chosen format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from gradcoh.cli.options import OutFormat, want_progress

__all__ = ["emit", "emit_analysis", "resolve_stream"]


def emit(result, fmt: OutFormat, out: str | None) -> None:
    """Print ``result`` (table/csv/json) or write it to ``out`` (NetCDF needs ``out``).

    Raises:
        ValueError: ``--format netcdf`` without ``--out``.

    """
    from gradcoh.analysis.export import render, write_netcdf

    if fmt is OutFormat.netcdf:
        if not out:
            raise ValueError("--format netcdf needs --out FILE.nc")
        write_netcdf(result, out)
        typer.echo(f"wrote {out}", err=True)
        return
    text = render(result, fmt.value)
    if out:
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
        typer.echo(f"wrote {out}", err=True)
    else:
        typer.echo(text)


def resolve_stream(store: str, stream: str | None) -> tuple[str, str]:
    """The stream a command reads, and a note saying which when it was not asked for.

    The rule: the stream asked for, else ``probe`` when the store has one, else ``batch``. The fixed sample of a
    probe stream is what the paper's curves show; the batch stream's m is the training batch size. Commands print
    the note on stderr after their result (an error stays a single line).
    """
    if stream:
        return stream, ""
    from gradcoh import analysis

    streams = analysis.list_streams(analysis.open_root(store))
    chosen = "probe" if "probe" in streams else "batch"
    other = " (--stream batch for the training batches)" if chosen == "probe" and "batch" in streams else ""
    return chosen, f"stream: {chosen}{other}"


def emit_analysis(
    store: str,
    stream: str | None,
    analyse: Callable[[Any], Any],
    fmt: OutFormat,
    out: str | None,
    *,
    scheduler: str | None,
    workers: int | None,
    progress: bool | None,
) -> None:
    """Compute ``analyse(open_store(store, stream))`` on the chosen Dask scheduler, then :func:`emit` the result.

    Args:
        store: Store path or URL.
        stream: Stream to open (None: :func:`resolve_stream`).
        analyse: Lazy analysis of the opened Dataset (e.g. a partial of :func:`gradcoh.analysis.m_coherence`).
        fmt: Output format.
        out: Output file, or ``None`` for stdout.
        scheduler: Dask scheduler address (``--scheduler``).
        workers: Local worker processes to start (``--workers``).
        progress: The ``--progress`` tri-state.

    """
    from gradcoh import analysis

    stream, note = resolve_stream(store, stream)
    with analysis.session(scheduler, workers):
        ds = analysis.open_store(store, stream=stream)
        result = analysis.compute(analyse(ds), progress=want_progress(progress))
    if fmt is OutFormat.table and "layer" in result.dims:  # for people: "1 · Linear 64→256"; files keep the names
        from gradcoh.analysis.layers import layer_labels

        labels = layer_labels(ds.attrs.get("gradcoh_layers"))
        result = result.assign_coords(layer=[labels.get(str(x), str(x)) for x in result["layer"].values])
    emit(result, fmt, out)
    if note:
        typer.echo(note, err=True)
