"""Writing a computed result in the chosen format to stdout or a file."""

from __future__ import annotations

from pathlib import Path

import typer
from gradcoh.cli.options import OutFormat

__all__ = ["emit"]


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
        return
    text = render(result, fmt.value)
    if out:
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
    else:
        typer.echo(text)
