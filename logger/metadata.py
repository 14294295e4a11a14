"""A logged step's per-example metadata: dataset index, labels, group and true labels, checked at the edge."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MISSING = -1
"""Stored for absent integer metadata (and padding)."""


def as_int_array(key: str, value: Any, n: int) -> np.ndarray | None:
    """``value`` as int64 NumPy ``[n]`` (None stays None); clear errors for other types and lengths."""
    if value is None:
        return None
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{key} must hold integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    if arr.shape[0] != n:
        raise ValueError(f"{key} has {arr.shape[0]} entries but the step has {n} examples")
    return arr


def step_metadata(n: int, group_names: tuple[str, ...], *, index: Any, labels: Any, group: Any,
                  true_labels: Any) -> dict[str, np.ndarray]:
    """``{index, label, true_label, group}`` as int64 ``[n]`` arrays, −1 where not given.

    Raises:
        ValueError: Non-integer values, wrong lengths, groups declared but not given, or out of range.
    """
    meta = {key: as_int_array(key, value, n) for key, value in
            (("index", index), ("label", labels), ("group", group), ("true_label", true_labels))}
    if meta["group"] is None:
        if len(group_names) > 1:
            raise ValueError("groups were declared, so record(..., group=...) must give every example's group")
        meta["group"] = np.zeros(n, dtype=np.int64)
    bad = (meta["group"] < 0) | (meta["group"] >= len(group_names))
    if bad.any():
        raise ValueError(f"group values must lie in [0, {len(group_names)}) for groups {group_names}; got "
                         f"{sorted(set(meta['group'][bad].tolist()))}")
    missing = np.full(n, MISSING, dtype=np.int64)
    return {key: missing if value is None else value for key, value in meta.items()}
