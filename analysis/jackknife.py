"""Standard errors of sketch estimates: a delete-a-group jackknife over the sketch's Fourier coordinates.

Every sketch estimate is a function of inner products ⟨s_a, s_b⟩ of (sums of) sketches. The orthonormal real DFT
``z = Q s`` keeps every inner product (``Q`` is orthogonal) and splits each one into ``k`` per-coordinate terms
that behave like independent replicates: for a CountSketch the frequency components are uncorrelated sums over
all entries, and for a TensorSketch each frequency is its own product ``FFT(CS u) ⊙ FFT(CS v)`` (Pham & Pagh 2013,
§3). The jackknife (Efron & Stein 1981; delete-a-group, Kott 2001) splits the ``k`` coordinates into
:data:`GROUPS` groups, recomputes the estimate with each group left out (the rest rescaled by
``k / (k − |group|)`` so that squared norms stay unbiased; ratios and cosines do not change under the rescaling),
and reports ``SE = sqrt((G − 1)/G · Σ_g (θ_g − θ̄)²)``. It sees whatever variance the projection has (TensorSketch
excess included) without a formula per layer type; the tests check its coverage over repeated seeds.

Replicates travel as an extra dimension :data:`REPLICATE_DIM` of size ``G + 1`` (0: all coordinates, the estimate
itself; 1…G: one group left out) through the ordinary analysis code, and :func:`split` turns it into the value and
its standard error at the end.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from gradcoh.logger import schema

__all__ = ["GROUPS", "REPLICATE_DIM", "replicate_sq_norms", "replicates", "split", "with_stderr"]

GROUPS = 32
"""Coordinate groups of the jackknife (G): the standard error has about G − 1 degrees of freedom."""

REPLICATE_DIM = "replicate"


def real_dft(x: np.ndarray) -> np.ndarray:
    """Orthonormal real Fourier coordinates of the last axis: ``[Re F0, √2 Re F1, √2 Im F1, …(, Re F_{k/2})]``.

    Inner products along the last axis are unchanged (Parseval); the two coordinates of a frequency sit side by
    side, so contiguous groups keep frequencies whole.
    """
    k = x.shape[-1]
    f = np.fft.rfft(np.asarray(x, dtype=np.float64), axis=-1, norm="ortho")
    out = np.empty((*x.shape[:-1], k))
    out[..., 0] = f[..., 0].real
    pairs = (k - 1) // 2
    out[..., 1 : 2 * pairs + 1 : 2] = np.sqrt(2.0) * f[..., 1 : pairs + 1].real
    out[..., 2 : 2 * pairs + 2 : 2] = np.sqrt(2.0) * f[..., 1 : pairs + 1].imag
    if k % 2 == 0 and k > 1:
        out[..., k - 1] = f[..., k // 2].real
    return out


def _group_masks(k: int, groups: int) -> np.ndarray:
    """``[G + 1, k]`` weights: row 0 all ones, row g zero on group g and ``sqrt(k / (k − |g|))`` elsewhere."""
    groups = min(groups, k)
    masks = np.ones((groups + 1, k))
    for g, idx in enumerate(np.array_split(np.arange(k), groups), start=1):
        masks[g] = np.sqrt(k / (k - len(idx)))
        masks[g, idx] = 0.0
    return masks


def _replicates_np(x: np.ndarray, groups: int) -> np.ndarray:
    """``[..., G + 1, k]`` leave-one-group-out copies of the real-DFT coordinates of ``x`` ``[..., k]``."""
    z = real_dft(np.nan_to_num(x))  # NaN rows are padding: zero, as in every sum over examples
    return z[..., None, :] * _group_masks(x.shape[-1], groups)


def _sq_norm_replicates_np(x: np.ndarray, groups: int) -> np.ndarray:
    """``[..., G + 1]`` squared norms of the leave-one-group-out copies of ``x`` ``[..., k]`` (no copies made)."""
    z2 = real_dft(np.nan_to_num(x)) ** 2
    masks = _group_masks(x.shape[-1], groups)
    return z2 @ (masks**2).T


def _along_proj(kernel, da: xr.DataArray, out_dims: list[str], groups: int | None) -> xr.DataArray:
    """``kernel(values [..., k], groups)`` over the ``proj`` dimension of ``da``, lazily, chunk by chunk."""
    groups = groups or GROUPS
    k = da.sizes[schema.DIM_PROJ]
    return xr.apply_ufunc(
        kernel, da, input_core_dims=[[schema.DIM_PROJ]], output_core_dims=[out_dims], kwargs={"groups": groups},
        dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {REPLICATE_DIM: min(groups, k) + 1}, "allow_rechunk": True},
    )


def replicates(sketch: xr.DataArray, groups: int | None = None) -> xr.DataArray:
    """Sketch coordinates with a ``replicate`` dimension (0: all; g: group g left out), lazily, chunk by chunk.

    Args:
        sketch: Any DataArray with the ``proj`` dimension (e.g. the stored ``sketch`` or sums of it).
        groups: Jackknife groups G (default :data:`GROUPS`).

    Returns:
        float64 DataArray with ``replicate`` (size G + 1) before ``proj``.
    """
    return _along_proj(_replicates_np, sketch, [REPLICATE_DIM, schema.DIM_PROJ], groups)


def replicate_sq_norms(vectors: xr.DataArray, groups: int | None = None) -> xr.DataArray:
    """Squared norms over ``proj`` of ``vectors`` and of their leave-one-group-out copies: ``replicate`` dim."""
    return _along_proj(_sq_norm_replicates_np, vectors, [REPLICATE_DIM], groups)


def split(values: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """``(estimate, standard error)`` from values with a ``replicate`` dimension (the jackknife formula)."""
    estimate = values.isel({REPLICATE_DIM: 0}, drop=True)
    loo = values.isel({REPLICATE_DIM: slice(1, None)})
    g = loo.sizes[REPLICATE_DIM]
    spread = ((loo - loo.mean(REPLICATE_DIM)) ** 2).sum(REPLICATE_DIM, skipna=False)
    return estimate, np.sqrt((g - 1) / g * spread)


def with_stderr(values: xr.DataArray | xr.Dataset) -> xr.Dataset:
    """A Dataset with each variable ``v`` of ``values`` (replicated) and its standard error ``v_stderr``."""
    ds = values.to_dataset() if isinstance(values, xr.DataArray) else values
    out = xr.Dataset(attrs=ds.attrs)
    for name, var in ds.data_vars.items():
        if REPLICATE_DIM not in var.dims:
            out[name] = var
            out[f"{name}_stderr"] = xr.zeros_like(var, dtype=np.float64).assign_attrs(note="exact value")
            continue
        est, se = split(var)
        out[name] = est.assign_attrs(var.attrs)
        out[f"{name}_stderr"] = se.assign_attrs(long_name=f"jackknife standard error of {name}")
    return out
