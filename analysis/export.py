"""Turning small, computed results into tables: text, CSV, JSON and NetCDF (result → file or string)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["FORMATS", "render", "to_frame", "write_netcdf"]

Format = Literal["table", "csv", "json", "netcdf"]
FORMATS = ("table", "csv", "json", "netcdf")


def _plain_strings(obj: xr.DataArray | xr.Dataset) -> xr.DataArray | xr.Dataset:
    """Replace NumPy ``StringDType`` coordinates (as read from zarr) by fixed-width strings."""
    fixes = {
        name: (coord.dims, np.array([str(v) for v in coord.values.ravel()]).reshape(coord.shape))
        for name, coord in obj.coords.items()
        if coord.dtype.kind == "T"
    }
    return obj.assign_coords(fixes) if fixes else obj


def to_frame(obj: xr.DataArray | xr.Dataset) -> pd.DataFrame:
    """Long-form table: one row per combination of dimensions, one column per dimension, coordinate and value."""
    obj = _plain_strings(obj)
    if isinstance(obj, xr.DataArray):
        obj = obj.to_dataset(name=obj.name or "value")
    return obj.to_dataframe().reset_index()


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(attrs, default=str, allow_nan=False)) if attrs else {}


def render(obj: xr.DataArray | xr.Dataset, fmt: Format) -> str:
    """A computed result as text: an aligned ``table``, ``csv`` or ``json`` (NaN → null; valid JSON).

    Args:
        obj: Computed (NumPy-backed) result.
        fmt: ``"table"``, ``"csv"`` or ``"json"``.

    Returns:
        The text.

    Raises:
        ValueError: Unknown format, or ``netcdf`` (binary: use :func:`write_netcdf`).

    """
    frame = to_frame(obj)
    if fmt == "table":
        return frame.to_string(index=False)
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        records = [{k: _json_value(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
        name = obj.name if isinstance(obj, xr.DataArray) else None
        doc = {"name": name, "dims": list(obj.dims), "attrs": _json_attrs(dict(obj.attrs)), "records": records}
        return json.dumps(doc, allow_nan=False, indent=1)
    raise ValueError(f"format {fmt!r} is not a text format; choose one of table, csv, json")


def write_netcdf(obj: xr.DataArray | xr.Dataset, path: str | os.PathLike) -> None:
    """Write a computed result to NetCDF (attributes that are not numbers or strings are stored as JSON text)."""
    obj = _plain_strings(obj).copy()
    obj.attrs = {k: v if isinstance(v, int | float | str) else json.dumps(v, default=str) for k, v in obj.attrs.items()}
    if isinstance(obj, xr.Dataset):
        for var in obj.variables.values():
            var.attrs = {k: v for k, v in var.attrs.items() if isinstance(v, int | float | str)}
    obj.to_netcdf(path)
