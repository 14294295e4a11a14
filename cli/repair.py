"""``gradcoh repair STORE``: bring a store left by a killed writer back to its committed state."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import StoreArg

__all__ = ["repair"]


def repair(
    store: StoreArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be done.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Also decode every committed chunk and report unreadable ones.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Trim every stream to its committed steps and delete orphaned *.partial files (run with no writer active).

    Exit code 0 when the store is (now) consistent, 1 when --check found corrupted chunks, 2 for bad input.
    """
    with reported():
        from gradcoh.logger.store import StoreError, describe_bad_chunks, repair_store

        try:
            result = repair_store(store, dry_run=dry_run, check=check)
        except StoreError as err:
            raise ValueError(str(err)) from err
    if as_json:
        typer.echo(json.dumps({"store": store, "dry_run": dry_run, **result}, indent=1))
    else:
        prefix = "would " if dry_run else ""
        for action in result["actions"]:
            typer.echo(f"{prefix}{action}")
        if not result["actions"]:
            typer.echo(f"{store}: nothing to repair (every stream ends at its committed step)")
        if check:
            c = result["checked"]
            typer.echo(f"{store}: checked {c['chunks']} chunks of {c['variables']} variables in {c['streams']} "
                       f"stream(s), {c['steps']} committed steps: "
                       f"{len(result['corrupted'])} unreadable")
        if result["corrupted"]:
            typer.echo(f"{store}: {describe_bad_chunks(result['corrupted'])} (cannot be repaired)", err=True)
    if result["corrupted"]:
        raise typer.Exit(code=1)

