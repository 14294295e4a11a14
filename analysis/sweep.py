"""Label-noise sweeps: one store per noise level, compared through their probe streams (used by ``gradcoh demo``).

The probe stream measures the same fixed sample of training examples throughout a run, so its m-coherence is
comparable across steps and runs. :func:`summarise` reduces each run to one :class:`SweepRow`;
:func:`write_figures` draws the probe m-coherence per run, per layer and, in noisy runs, clean against corrupted
examples.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import xarray as xr
from gradcoh.analysis import plots
from gradcoh.analysis.cluster import compute
from gradcoh.analysis.coherence import m_coherence
from gradcoh.analysis.io import open_store
from gradcoh.logger import schema

log = logging.getLogger(__name__)

__all__ = ["SweepRow", "SweepSummary", "probe_coherence", "summarise", "write_figures"]

STREAM = schema.STREAM_PROBE
Stores = Mapping[str, str | Path]
"""``{run name: store path}`` in sweep order (e.g. ``{"0% noise": ..., "100% noise": ...}``)."""


class SweepRow(NamedTuple):
    """One run of a sweep: its probe m-coherence at the start, at its peak and at the end.

    Attributes:
        run: Run name (the key in the sweep's ``stores``).
        m: Probe examples behind the final value.
        initial: m-coherence at the first probe step.
        peak: Largest m-coherence (NaN steps ignored).
        peak_step: Training step of ``peak``.
        final: m-coherence at the last probe step.
        final_step: Training step of ``final``.
        final_loss: Mean probe loss at the last probe step.

    """

    run: str
    m: int
    initial: float
    peak: float
    peak_step: int
    final: float
    final_step: int
    final_loss: float


@dataclass(frozen=True)
class SweepSummary:
    """The runs of a sweep.

    Attributes:
        rows: One :class:`SweepRow` per run, in sweep order.

    """

    rows: list[SweepRow]

    def peak(self, run: str) -> float:
        """Peak probe m-coherence of ``run``."""
        return next(row.peak for row in self.rows if row.run == run)


def probe_coherence(stores: Stores, *, per_layer: bool = False, by: str | None = None) -> dict[str, xr.DataArray]:
    """Computed probe-stream m-coherence of each run (``{run name: DataArray over step[, layer|group]}``)."""
    lazy = {name: m_coherence(open_store(path, stream=STREAM), per_layer=per_layer, by=by)
            for name, path in stores.items()}
    return compute(lazy)


def _row(name: str, coh: xr.DataArray, store: str | Path) -> SweepRow:
    steps = coh[schema.DIM_STEP].values
    values = np.asarray(coh.values, dtype=float)
    top = int(np.nanargmax(values))
    loss = open_store(store, stream=STREAM)[schema.LOSS].isel({schema.DIM_STEP: -1})
    return SweepRow(
        run=name,
        m=int(coh["m"].values[-1]),
        initial=float(values[0]),
        peak=float(values[top]),
        peak_step=int(steps[top]),
        final=float(values[-1]),
        final_step=int(steps[-1]),
        final_loss=float(loss.mean().compute()),
    )


def summarise(stores: Stores) -> SweepSummary:
    """Initial, peak (and its step), final probe m-coherence, m and final mean probe loss of each run."""
    return SweepSummary([_row(name, coh, stores[name]) for name, coh in probe_coherence(stores).items()])


def _layer_labels(store: str | Path) -> dict[str, str]:
    return plots.layer_labels(open_store(store, stream=STREAM).attrs.get(schema.LAYERS_KEY))


def write_figures(stores: Stores, out_dir: str | Path, *, title: str = "") -> list[Path]:
    """Paper-style PNGs: probe m-coherence per run; per-layer lines per run; clean vs corrupted in noisy runs.

    Every title names the probe stream and m (the probe size); layers are labelled by name, type and shape.

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
    figure = plots.plot_coherence(probe_coherence(stores), title=f"{prefix}m-coherence by label noise", stream=STREAM)
    written = [_save(figure, out / "coherence.png")]
    for name, per_layer in probe_coherence(stores, per_layer=True).items():
        lines = {str(layer): per_layer.sel({schema.DIM_LAYER: layer}) for layer in per_layer[schema.DIM_LAYER].values}
        figure = plots.plot_coherence(lines, title=f"{prefix}per-layer m-coherence, {name}", stream=STREAM,
                                      labels=_layer_labels(stores[name]))
        written.append(_save(figure, out / f"layers_{_slug(name)}.png"))
    for name, by_group in probe_coherence(stores, by="group").items():
        present = [str(g) for g in by_group["group"].values
                   if np.isfinite(np.asarray(by_group.sel(group=g).values, dtype=float)).any()]
        if "corrupted" not in present:
            continue  # no corrupted example in the probe (0% noise)
        what = (f"{' vs '.join(present)} probe examples" if len(present) > 1
                else f"every probe example is {present[0]}")  # (100% noise: no clean line to draw)
        figure = plots.plot_coherence(by_group, title=f"{prefix}{what}, {name}", stream=STREAM)
        written.append(_save(figure, out / f"groups_{_slug(name)}.png"))
    return written


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def _save(fig, path: Path) -> Path:
    plots.save_figure(fig, path)
    log.info("wrote %s", path)
    return path
