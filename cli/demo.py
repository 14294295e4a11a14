"""``gradcoh demo --out DIR``: a CPU-only, offline label-noise sweep (MLP on digits) with figures and a summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import ProgressOpt, want_progress

__all__ = ["demo"]

log = logging.getLogger(__name__)

NOISE_LEVELS = (0.0, 0.5, 1.0)
"""Label-noise fractions of the sweep: real labels, half re-drawn, all re-drawn."""


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
    and summary.txt (initial / peak / final probe m-coherence and m per run). Existing demo stores in DIR are
    replaced.
    """
    with reported():
        from gradcoh.cli import sweep
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
        summary = sweep.summarise(stores).text()
        (out / "summary.txt").write_text(summary + "\n")
    typer.echo(summary)
    typer.echo(f"\n{len(stores)} stores, {len(figures)} figures and summary.txt in {out} "
               f"({time.perf_counter() - start:.0f} s)")
    for path in [*stores.values(), *figures]:
        typer.echo(f"  {path}")
