"""The one place where expected errors become a one-line message and a non-zero exit code (no traceback)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import typer

log = logging.getLogger(__name__)

__all__ = ["EXIT_BAD_INPUT", "reported"]

EXIT_BAD_INPUT = 2


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn bad-input errors (not a store, wrong stream, bad option value, unreadable file) into ``Error: ...``.

    ``FormatError`` is a ``ValueError``, so it is covered too. Anything else is a bug and keeps its traceback.

    Raises:
        typer.Exit: With code 2 after printing the message to stderr.

    """
    try:
        yield
    except (ValueError, OSError, KeyError) as exc:
        log.debug("command failed", exc_info=True)
        typer.echo(f"Error: {_one_line(exc)}", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT) from None
