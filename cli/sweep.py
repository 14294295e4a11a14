"""Figures and a summary table for a label-noise sweep: one store per noise level (used by ``gradcoh demo``).

Analysis side only (xarray through :mod:`gradcoh.analysis`, no torch). Command modules import this lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr
from gradcoh import analysis
from gradcoh.analysis import plots

log = logging.getLogger(__name__)

__all__ = ["SweepSummary", "probe_coherence", "summarise", "write_figures"]

STREAM = "probe"


def probe_coherence(stores: Mapping[str, str | Path], *, per_layer: bool = False,
                    by: str | None = None) -> dict[str, xr.DataArray]:
    """Computed probe-stream m-coherence of each run (``{run name: DataArray over step[, layer|group]}``)."""
    lazy = {name: analysis.m_coherence(analysis.open_store(path, stream=STREAM), per_layer=per_layer, by=by)
            for name, path in stores.items()}
    return analysis.compute(lazy)


class SweepSummary:
    """Peak and final probe m-coherence per run, as rows and as a fixed-width text table."""

    COLUMNS = ("run", "m", "initial", "peak", "peak step", "final", "final step", "final loss")

    def __init__(self, rows: list[tuple]) -> None:
        self.rows = rows

    def peak(self, run: str) -> float:
        """Peak probe m-coherence of ``run``."""
        return next(r[3] for r in self.rows if r[0] == run)

    def text(self) -> str:
        """The table as aligned text (one header line, one line per run)."""
        cells = [self.COLUMNS] + [
            (r[0], str(r[1]), f"{r[2]:.3g}", f"{r[3]:.3g}", str(r[4]), f"{r[5]:.3g}", str(r[6]), f"{r[7]:.3g}")
            for r in self.rows
        ]
        widths = [max(len(c[i]) for c in cells) for i in range(len(self.COLUMNS))]
        return "\n".join("  ".join(c[i].rjust(widths[i]) for i in range(len(c))) for c in cells)


def summarise(stores: Mapping[str, str | Path]) -> SweepSummary:
    """Initial, peak (and its step), final probe m-coherence, m and final mean probe loss of each run."""
    rows = []
    for name, coh in probe_coherence(stores).items():
        steps = coh["step"].values
        values = np.asarray(coh.values, dtype=float)
        top = int(np.nanargmax(values))
        loss = analysis.open_store(stores[name], stream=STREAM)["loss"].isel(step=-1)
        rows.append((name, int(coh["m"].values[-1]), values[0], values[top], int(steps[top]), values[-1],
                     int(steps[-1]), float(loss.mean().compute())))
    return SweepSummary(rows)


def write_figures(stores: Mapping[str, str | Path], out_dir: str | Path, *, title: str = "") -> list[Path]:
    """Paper-style PNGs: probe m-coherence per run; per-layer lines per run; clean vs corrupted in noisy runs.

    Args:
        stores: ``{run name: store path}`` in sweep order (e.g. ``{"0% noise": ..., "100% noise": ...}``).
        out_dir: Folder for the figures (created).
        title: Prefix of the figure titles (e.g. ``"MLP on digits"``).

    Returns:
        The written files.

    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    written = [_save(plots.plot_coherence(probe_coherence(stores), title=f"{prefix}probe m-coherence by label noise"),
                     out / "coherence.png")]
    for name, per_layer in probe_coherence(stores, per_layer=True).items():
        lines = {str(layer): per_layer.sel(layer=layer) for layer in per_layer["layer"].values}
        written.append(_save(plots.plot_coherence(lines, title=f"{prefix}per-layer probe m-coherence, {name}"),
                             out / f"layers_{_slug(name)}.png"))
    for name, by_group in probe_coherence(stores, by="group").items():
        if not np.isfinite(np.asarray(by_group.sel(group="corrupted").values, dtype=float)).any():
            continue  # no corrupted example in the probe (0% noise)
        written.append(_save(plots.plot_coherence(by_group, title=f"{prefix}clean vs corrupted, {name}"),
                             out / f"groups_{_slug(name)}.png"))
    return written


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def _save(fig, path: Path) -> Path:
    plots.save_figure(fig, path)
    log.info("wrote %s", path)
    return path
