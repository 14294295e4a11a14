"""One Dataset of per-step metrics: the m-coherence family (exact) plus sketch-based pairwise metrics if present."""

from __future__ import annotations

import xarray as xr
from gradcoh.analysis import jackknife
from gradcoh.analysis.coherence import Layers, coherence_family
from gradcoh.analysis.pairwise import _checked_pairs, confusion_from_pairs, stiffness_from_pairs
from gradcoh.logger import schema

__all__ = ["metrics_summary"]


def metrics_summary(ds: xr.Dataset, *, layers: Layers = None, block_size: int = 1024,
                    stderr: bool = False) -> xr.Dataset:
    """Per-step metrics table: the exact m-coherence family plus sketch-based pairwise metrics.

    Exact: m-coherence, α, debiased α, gradient diversity, noise scale. When the store has sketches: the
    stiffness means and gradient-confusion statistics (estimates; see :mod:`gradcoh.analysis.pairwise`). Classes
    for the within/between stiffness are the labels; a store without labels warns
    (:class:`~gradcoh.analysis.io.MissingMetadataWarning`) and has NaN there.

    Args:
        ds: A store Dataset.
        layers: Layer name pattern(s).
        block_size: Rows per block for the pairwise metrics.
        stderr: Add ``<name>_stderr`` for every variable: 0 for the exact ones, the jackknife standard error for
            the sketch estimates (:mod:`gradcoh.analysis.jackknife`; the pairwise work runs G + 1 = 33 times).

    Returns:
        Dataset over ``step`` with coordinate ``m``; pairwise variables only if ``sketch`` is present.

    """
    out = coherence_family(ds, layers=layers)
    if schema.SKETCH in ds:
        pairs = _checked_pairs(ds, by=schema.LABEL, layers=layers, block_size=block_size, bins=2000,
                               needed_by="metrics_summary (within/between-label stiffness)", replicate=stderr)
        stiff = stiffness_from_pairs(pairs).drop_vars("m")
        conf = confusion_from_pairs(pairs, quantiles=(0.05, 0.5))
        out = out.merge(stiff)
        out["min_cos"] = conf["min_cos"]
        out["frac_negative"] = conf["frac_negative"]
        out["cos_q05"] = conf["cos_quantile"].sel(quantile=0.05, drop=True)
        out["cos_median"] = conf["cos_quantile"].sel(quantile=0.5, drop=True)
    out.attrs = {"pairwise": "sketch estimates" if schema.SKETCH in ds else "absent (no sketches)"}
    return jackknife.with_stderr(out) if stderr else out
