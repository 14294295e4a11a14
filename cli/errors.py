"""The one place where expected errors become a one-line message and a non-zero exit code (no traceback)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import typer
from gradcoh.logger import schema

log = logging.getLogger(__name__)

__all__ = ["EXIT_BAD_INPUT", "reported"]

EXIT_BAD_INPUT = 2


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _corruption(store: str) -> str | None:
    """After an unexpected failure, decode the store's committed chunks; name the damaged ones, if any."""
    try:
        import zarr
        from gradcoh.logger.store import describe_bad_chunks, scan_chunks

        bad = scan_chunks(zarr.open_group(store, mode="r", use_consolidated=False))
    except Exception:
        log.debug("corruption scan failed", exc_info=True)
        return None
    if not bad:
        return None
    return f"{store}: {describe_bad_chunks(bad)}; the files may be truncated (see gradcoh repair --check)"


@contextlib.contextmanager
def reported(store: str | None = None) -> Iterator[None]:
    """Turn bad-input errors (not a store, wrong stream, bad option value, unreadable file) into ``Error: ...``.

    ``FormatError`` is a ``ValueError``, so it is covered too. With ``store``, any other failure triggers a scan of
    the store's committed chunks, and unreadable chunks are reported by variable and steps. Anything else is a bug
    and keeps its traceback.

    Raises:
        typer.Exit: With code 2 after printing the message to stderr.

    """
    try:
        yield
    except (schema.GradcohError, ValueError, OSError, KeyError) as exc:
        log.debug("command failed", exc_info=True)
        typer.echo(f"Error: {_one_line(exc)}", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT) from None
    except Exception:
        # A decompression error (a truncated chunk after a power loss) names neither the variable nor the step.
        message = _corruption(store) if store else None
        if message is None:
            raise
        log.debug("command failed", exc_info=True)
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(code=EXIT_BAD_INPUT) from None
