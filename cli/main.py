"""The ``gradcoh`` command: builds the typer app and registers the commands (it computes nothing itself).

Command modules import only typer and the standard library at import time; the analysis (and, for training
commands, torch) is imported inside each command, so ``gradcoh --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer
from gradcoh.cli import coherence, compact, demo, examples, info, metrics, plot, repair, tensorboard, train

app = typer.Typer(
    name="gradcoh",
    help="Per-example gradient coherence: log during training, analyse offline.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
)

# --- the single place where commands are registered (add train / demo here) ---------------------------------
COMMANDS = (
    ("info", info.info),
    ("coherence", coherence.coherence),
    ("metrics", metrics.metrics),
    ("examples", examples.examples),
    ("plot", plot.plot),
    ("train", train.train),
    ("demo", demo.demo),
    ("compact", compact.compact),
    ("repair", repair.repair),
    ("tensorboard", tensorboard.tensorboard),
)
for _name, _command in COMMANDS:
    app.command(name=_name)(_command)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"gradcoh {version('gradcoh')}")
        except PackageNotFoundError:
            typer.echo("gradcoh (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Per-example gradient coherence: log during training, analyse offline."""


if __name__ == "__main__":
    app()
