"""One Dataset of per-step metrics: the m-coherence family (exact) plus sketch-based pairwise metrics if present."""

from __future__ import annotations

import xarray as xr
from gradcoh.analysis.coherence import Layers, m_coherence
from gradcoh.analysis.pairwise import confusion_from_pairs, pair_statistics, stiffness_from_pairs
from gradcoh.logger import schema

__all__ = ["metrics_summary"]

_LONG_NAMES = {
    "m_coherence": "‖Σg‖² / Σ‖g‖²",
    "alpha": "m-coherence / m",
    "debiased_alpha": "(m-coherence − 1)/(m − 1)",
    "gradient_diversity": "Σ‖g‖² / ‖Σg‖²",
    "noise_scale": "B_simple = tr Σ / ‖ḡ‖²",
}


def _coherence_family(ds: xr.Dataset, layers: Layers) -> xr.Dataset:
    coh = m_coherence(ds, layers=layers)
    m = coh["m"]
    out = xr.Dataset({"m_coherence": coh.drop_vars("m")})
    out["alpha"] = out.m_coherence / m.where(m > 0)
    out["debiased_alpha"] = (out.m_coherence - 1.0) / (m - 1).where(m > 1)
    out["gradient_diversity"] = 1.0 / out.m_coherence.where(out.m_coherence > 0)
    out["noise_scale"] = m / out.m_coherence.where(out.m_coherence > 0) - 1.0
    for name, long_name in _LONG_NAMES.items():
        out[name].attrs = {"long_name": long_name}
    return out.assign_coords(m=m)


def metrics_summary(ds: xr.Dataset, *, layers: Layers = None, block_size: int = 1024) -> xr.Dataset:
    """Per-step metrics table: the exact m-coherence family plus sketch-based pairwise metrics.

    Exact: m-coherence, α, debiased α, gradient diversity, noise scale. When the store has sketches: the
    stiffness means and gradient-confusion statistics (estimates; see :mod:`gradcoh.analysis.pairwise`).

    Args:
        ds: A store Dataset.
        layers: Layer name pattern(s).
        block_size: Rows per block for the pairwise metrics.

    Returns:
        Dataset over ``step`` with coordinate ``m``; pairwise variables only if ``sketch`` is present.

    """
    out = _coherence_family(ds, layers)
    if schema.SKETCH in ds:
        pairs = pair_statistics(ds, layers=layers, block_size=block_size)
        stiff = stiffness_from_pairs(pairs).drop_vars("m")
        conf = confusion_from_pairs(pairs, quantiles=(0.05, 0.5))
        out = out.merge(stiff)
        out["min_cos"] = conf["min_cos"]
        out["frac_negative"] = conf["frac_negative"]
        out["cos_q05"] = conf["cos_quantile"].sel(quantile=0.05, drop=True)
        out["cos_median"] = conf["cos_quantile"].sel(quantile=0.5, drop=True)
    out.attrs = {"pairwise": "sketch estimates" if schema.SKETCH in ds else "absent (no sketches)"}
    return out
