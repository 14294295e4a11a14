"""``gradcoh demo --out DIR``: a CPU-only, offline label-noise sweep (MLP on digits) with figures and a summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import ProgressOpt, want_progress

if TYPE_CHECKING:
    from gradcoh.analysis.sweep import SweepRow, SweepSummary

__all__ = ["demo"]

log = logging.getLogger(__name__)

NOISE_LEVELS = (0.0, 0.5, 1.0)
"""Label-noise fractions of the sweep: real labels, half re-drawn, all re-drawn."""

COLUMNS = ("run", "m (probe size)", "initial", "peak", "peak step", "final", "final step", "final loss")
"""Header of the summary table (one column per :class:`~gradcoh.analysis.sweep.SweepRow` field)."""

CAPTION = (
    "Probe-stream m-coherence ‖Σg‖²/Σ‖g‖², m = the probe size (the same examples at every probe step).",
    "1 = orthogonal gradients; above 1: aligned on average; below 1: partly cancelling.",
    "initial / peak / final: first probe step / largest value (at peak step) / last probe step;",
    "final loss: mean probe loss at the last probe step.",
)
"""Lines above the summary table: what its values are and what m is."""


def _cells(row: SweepRow) -> tuple[str, ...]:
    return (row.run, str(row.m), f"{row.initial:.3g}", f"{row.peak:.3g}", str(row.peak_step), f"{row.final:.3g}",
            str(row.final_step), f"{row.final_loss:.3g}")


def summary_table(summary: SweepSummary) -> str:
    """The sweep summary as text: the caption (:data:`CAPTION`), a blank line, the header, one line per run."""
    lines = [COLUMNS, *(_cells(row) for row in summary.rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    table = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines]
    return "\n".join([*CAPTION, "", *table])


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the stores, figures and summary.txt.")],
    steps: Annotated[int, typer.Option("--steps", min=1, hidden=True)] = 1000,
    probe_size: Annotated[int, typer.Option("--probe-size", min=1, hidden=True)] = 512,
    probe_every: Annotated[int, typer.Option("--probe-every", min=1, hidden=True)] = 25,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of data order, noise and initialisation.")] = 0,
    progress: ProgressOpt = None,
) -> None:
    """Train an MLP on scikit-learn's digits with 0%, 50% and 100% label noise (CPU, offline, ~1 minute).

    Writes one store per noise level, PNG figures (probe m-coherence per noise level, per layer, clean vs corrupted)
    and summary.txt (initial / peak / final probe-stream m-coherence per run, with m = the probe size). Existing
    demo stores in DIR are replaced.
    """
    with reported():
        from gradcoh.analysis import sweep
        from gradcoh.logger.experiment import ExperimentConfig, run_experiment

        out.mkdir(parents=True, exist_ok=True)
        stores: dict[str, Path] = {}
        start = time.perf_counter()
        for noise in NOISE_LEVELS:
            name = f"{100 * noise:.0f}% noise"
            config = ExperimentConfig(
                out=str(out / f"noise_{100 * noise:03.0f}.zarr"), dataset="digits", model="mlp", label_noise=noise,
                steps=steps, batch_size=64, lr=0.02, momentum=0.9, probe_size=min(probe_size, 1500),
                probe_every=probe_every, log_every=10, seed=seed, device="cpu", threads=1, overwrite=True,
                progress=want_progress(progress),
            )
            stores[name] = run_experiment(config)
        figures = sweep.write_figures(stores, out, title="MLP on digits")
        summary = summary_table(sweep.summarise(stores))
        (out / "summary.txt").write_text(summary + "\n")
    typer.echo(summary)
    typer.echo(f"\n{len(stores)} stores, {len(figures)} figures and summary.txt in {out} "
               f"({time.perf_counter() - start:.0f} s)")
    for path in [*stores.values(), *figures]:
        typer.echo(f"  {path}")
