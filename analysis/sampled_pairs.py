"""Pairwise metrics over long runs: stiffness and sign stiffness on sampled steps and sampled pairs, with their error.

The exact pairwise metrics (:mod:`gradcoh.analysis.pairwise`) cost O(m²·L·k) per step: hours over tens of thousands
of steps. Here each selected step draws ``pairs`` ordered pairs (i, j), i ≠ j, uniformly (with replacement) among
its real examples, and averages their sketch cosines: an unbiased Monte Carlo estimate of the all-pairs mean over
i ≠ j that :func:`~gradcoh.analysis.pairwise.stiffness` computes from the same sketches, at O(pairs·L·k) per step.

Stated error: ``*_stderr`` is the sample standard deviation of the drawn values over sqrt(pairs), the standard error
of the sampling (the estimate is within ±2 of them of the all-pairs value about 95% of the time). It adds to, and
does not include, the sketch's own error of the all-pairs value (a cosine is off by about 1/sqrt(k)). Draws are
seeded by ``(seed, step)``: the same call gives the same numbers, and a step's pairs do not depend on which other
steps are selected.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from gradcoh.analysis.coherence import Layers
from gradcoh.analysis.finite import mask_nonfinite
from gradcoh.analysis.io import valid_examples
from gradcoh.analysis.layers import select_layers
from gradcoh.logger import schema

__all__ = ["SAMPLED_STATS", "sample_steps", "sampled_stiffness"]

SAMPLED_STATS = ("stiffness", "stiffness_stderr", "sign_stiffness", "sign_stiffness_stderr", "n_pairs")
"""Variables of :func:`sampled_stiffness`, in the order of the kernel's output."""

_CORE = [schema.DIM_EXAMPLE, schema.DIM_LAYER, schema.DIM_PROJ]


def _one_step(sketch: np.ndarray, valid: np.ndarray, step: int, pairs: int, seed: int) -> np.ndarray:
    rows = sketch.reshape(sketch.shape[0], -1)[valid.astype(bool)]
    n = rows.shape[0]
    if n < 2:
        return np.array([np.nan, np.nan, np.nan, np.nan, 0.0])
    rng = np.random.default_rng([seed, int(step)])
    i = rng.integers(0, n, size=pairs)
    j = (i + rng.integers(1, n, size=pairs)) % n  # uniform over j ≠ i
    a, b = rows[i].astype(np.float64), rows[j].astype(np.float64)
    norms = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    cos = np.clip(np.divide((a * b).sum(1), norms, out=np.zeros(pairs), where=norms > 0), -1.0, 1.0)
    sign = np.sign(cos)
    scale = 1.0 / np.sqrt(pairs)
    return np.array([cos.mean(), cos.std(ddof=1) * scale, sign.mean(), sign.std(ddof=1) * scale, float(pairs)])


def _kernel(sketch: np.ndarray, valid: np.ndarray, steps: np.ndarray, *, pairs: int, seed: int) -> np.ndarray:
    """``(..., example, layer, proj)`` sketches → ``(..., len(SAMPLED_STATS))``, one sampled estimate per step."""
    out = np.empty((*steps.shape, len(SAMPLED_STATS)))
    for pos in np.ndindex(steps.shape):
        out[pos] = _one_step(sketch[pos], valid[pos], steps[pos], pairs, seed)
    return out


def sample_steps(ds: xr.Dataset, steps: int | None) -> xr.Dataset:
    """``ds`` at ``steps`` evenly spaced steps (first and last included); all steps when ``steps`` is None or more."""
    n = ds.sizes[schema.DIM_STEP]
    if steps is None or steps >= n:
        return ds
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1 or None, got {steps}")
    return ds.isel({schema.DIM_STEP: np.unique(np.linspace(0, n - 1, steps).round().astype(np.int64))})


def sampled_stiffness(ds: xr.Dataset, *, steps: int | None = 200, pairs: int = 20_000, seed: int = 0,
                      layers: Layers = None) -> xr.Dataset:
    """Stiffness (mean pairwise cosine) and sign stiffness on sampled steps and pairs, with standard errors.

    Args:
        ds: A store Dataset with sketches.
        steps: Number of evenly spaced steps analysed (None: every step).
        pairs: Ordered pairs i ≠ j drawn per step (with replacement); the standard error shrinks as 1/sqrt(pairs).
        seed: Seed of the draws (with the step number).
        layers: Layer pattern(s); cosines use the sketches of the selected layers concatenated.

    Returns:
        Dataset over the selected ``step`` with :data:`SAMPLED_STATS` and coordinate ``m``; NaN at steps with fewer
        than two examples or with non-finite statistics (with a ``RuntimeWarning`` when computed).

    Raises:
        ValueError: No sketches in the store, or ``pairs`` < 2.

    """
    if schema.SKETCH not in ds:
        raise ValueError("sampled_stiffness needs sketches: create the GradientLogger with sketch_dim=k > 0")
    if pairs < 2:
        raise ValueError(f"pairs must be ≥ 2 (a standard error needs two draws), got {pairs}")
    ds = sample_steps(select_layers(ds, layers), steps)
    sketch = ds[schema.SKETCH].reset_coords(drop=True)
    step_values = xr.DataArray(np.asarray(ds[schema.STEP].values), dims=schema.DIM_STEP)
    if sketch.chunks is not None:
        step_values = step_values.chunk({schema.DIM_STEP: sketch.chunks[0]})
    raw = xr.apply_ufunc(
        _kernel, sketch, valid_examples(ds), step_values,
        input_core_dims=[_CORE, [schema.DIM_EXAMPLE], []], output_core_dims=[["stat"]],
        kwargs={"pairs": int(pairs), "seed": int(seed)}, dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"stat": len(SAMPLED_STATS)}, "allow_rechunk": True},
    )
    out = xr.Dataset({name: raw.isel(stat=k, drop=True) for k, name in enumerate(SAMPLED_STATS)})
    out = mask_nonfinite(out, ds)
    out.attrs = {"pairs": int(pairs), "seed": int(seed),
                 "error": "*_stderr: Monte Carlo standard error of the sampled pairs (sd / sqrt(pairs)); the "
                          "sketch's own error (~1/sqrt(k) per cosine) is not included"}
    return out.assign_coords(m=ds[schema.N_EXAMPLES].reset_coords(drop=True))
