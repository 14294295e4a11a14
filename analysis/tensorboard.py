"""Export m-coherence curves of a store as TensorBoard scalars (for runs logged without a live writer).

Uses TensorBoard's own event-file writer (no torch): ``pip install gradcoh[tensorboard]``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import xarray as xr

from .coherence import m_coherence

__all__ = ["export_tensorboard"]


def export_tensorboard(ds: xr.Dataset, logdir: str | Path, *, per_layer: bool = False, by: str | None = None,
                       prefix: str = "gradcoh") -> int:
    """Write ``<prefix>/m_coherence`` (and ``/<layer>`` or ``/<group>`` series) for every step of ``ds``.

    Args:
        ds: A store Dataset (``open_store``).
        logdir: TensorBoard log directory (created).
        per_layer: One series per layer.
        by: ``"group"`` or ``"label"``: one series per subset.
        prefix: Tag prefix.

    Returns:
        Number of scalars written (NaN values, e.g. non-finite steps, are skipped).
    """
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("exporting to TensorBoard needs the tensorboard package: pip install 'gradcoh[tensorboard]'"
                          ) from err
    series = _series(ds, per_layer, by, prefix)
    Path(logdir).mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(logdir))
    written = 0
    try:
        for tag, steps, values in series:
            for step, value in zip(steps, values, strict=True):
                if not math.isfinite(value):
                    continue
                summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
                writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
                written += 1
    finally:
        writer.close()
    return written


def _series(ds: xr.Dataset, per_layer: bool, by: str | None, prefix: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(tag, steps, values)`` of every curve to export."""
    result = m_coherence(ds, per_layer=per_layer, by=by).compute()
    steps = result["step"].values
    extra = [d for d in result.dims if d != "step"]
    if not extra:
        return [(f"{prefix}/m_coherence", steps, result.values)]
    (dim,) = extra
    return [(f"{prefix}/m_coherence/{label}", steps, result.sel({dim: label}).values)
            for label in result[dim].values.tolist()]
