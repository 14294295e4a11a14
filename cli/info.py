"""``gradcoh info STORE``: format, configuration, layers and stream sizes of a store (attributes only)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import StoreArg

__all__ = ["info"]


def _fields(mapping: dict[str, Any]) -> list[str]:
    """``  key  value`` lines, nested mappings flattened as ``key.sub``."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out += [f"  {key}.{line.strip()}" for line in _fields(value)]
        else:
            out.append(f"  {key:<16} {json.dumps(value) if isinstance(value, list | dict) else value}")
    return out


def _guard_line(guard: dict[str, Any]) -> str:
    """The reconciliation guard's coverage of one stream (layer-steps checked and flagged)."""
    checked = ("not recorded (format 3 or older)" if guard["checked"] is None
               else f"{guard['checked']} of {guard['layer_steps']} layer-steps checked")
    flagged = "no reconciled flags (format 1)" if guard["flagged"] is None else f"{guard['flagged']} flagged"
    return (f"reconciliation guard: {checked}, {flagged} (reconciled=True at an unchecked layer-step is no "
            "verdict)")


def _text(summary: dict[str, Any]) -> str:
    lines = [
        f"store:   {summary['path']}",
        f"format:  {summary['format_version']}   model: {summary['model']}",
        "config:",
        *_fields(summary["config"]),
        "sketch:  none" if not summary["sketch"] else "sketch:",
        *_fields(summary["sketch"] or {}),
    ]
    for name, s in summary["streams"].items():
        lines.append(
            f"stream {name}: {s['committed_steps']} steps ({s['first_step']}..{s['last_step']}), "
            f"m {s['m_min']}..{s['m_max']}, groups {', '.join(s['groups'])}, "
            f"sketch {'yes' if s['has_sketch'] else 'no'}"
        )
        lines.append(f"  {_guard_line(s['guard'])}")
    lines.append(f"layers ({len(summary['layers'])}, depth order):")
    lines += [f"  {layer['name']:<40} {layer['type'] or '':<16} {layer['size']}" for layer in summary["layers"]]
    if summary["error"]:
        lines.append(f"logging stopped early: {summary['error']}")
    lines += [f"note: {note}" for note in summary["notes"]]
    return "\n".join(lines)


def info(
    store: StoreArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show what a store holds: format, configuration, layers, streams and their sizes."""
    with reported(store):
        from gradcoh.analysis.io import describe_store

        summary = describe_store(store)
        typer.echo(json.dumps(summary, indent=1, default=str) if as_json else _text(summary))
