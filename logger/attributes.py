"""The store's root attributes for a run: format, configuration, the layer table, sketches, versions, notes."""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any

from torch import nn

from . import schema
from .config import LoggerConfig
from .grads import natural_view
from .probe import PROBE_NOTES
from .sketch import SKETCH_KIND, SKETCH_VERSION
from .tracker import LayerTracker


def layer_table(trackers: list[LayerTracker]) -> list[dict[str, Any]]:
    """One entry per layer: name, module types, size, parameter shapes and names, views, rules, modules."""
    return [
        {"name": t.name, "type": "+".join(dict.fromkeys(t.plan.types)), "size": t.size,
         "shapes": [list(p.shape) for p in t.params], "params": t.plan.param_names,
         "views": [list(natural_view(s)) for s in t.shapes], "rule": "+".join(t.plan.rule_names),
         "modules": [s.name for s in t.plan.sources] + t.plan.loose}
        for t in trackers
    ]


def notes(trackers: list[LayerTracker], probe_mode: str = "constant") -> list[str]:
    """Semantics worth knowing when reading the store (train-mode BatchNorm couples examples; how probes treat it)."""
    bn = [t.name for t in trackers
          if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in [s.module for s in t.plan.sources]
                 + t.plan.loose_modules)]
    if not bn:
        return []
    return [
        "BatchNorm layers " + ", ".join(bn) + ": in train mode the batch statistics couple the examples; "
        "per-example values are then each example's contribution to the batch gradient (they sum exactly "
        "to it), and the gradients of earlier layers are coupled the same way. In eval mode they are exact.",
        PROBE_NOTES[probe_mode],
    ]


def root_attributes(config: LoggerConfig, trackers: list[LayerTracker], model: nn.Module,
                    world_size: int) -> dict[str, Any]:
    """Everything the root group of a run records about it."""
    sketch = None
    if config.sketch_dim:
        sketch = {"kind": SKETCH_KIND, "version": SKETCH_VERSION, "dim": config.sketch_dim, "seed": config.seed,
                  "dtype": config.sketch_dtype}
    stored = config.to_dict()
    stored[schema.IDENTITY_KEY] = config.store_identity()
    return {
        schema.FORMAT_KEY: schema.FORMAT_VERSION,
        schema.CONFIG_KEY: stored,
        schema.LAYERS_KEY: layer_table(trackers),
        schema.SKETCH_KEY: sketch,
        schema.VERSIONS_KEY: versions(),
        schema.MODEL_KEY: f"{type(model).__module__}.{type(model).__qualname__}",
        schema.NOTES_KEY: notes(trackers, config.probe_mode),
        schema.WORLD_SIZE_KEY: world_size,
    }


def versions() -> dict[str, str]:
    """Versions of the packages that shape the store (looked up once per process: ~20 ms of metadata parsing)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("gradcoh", "torch", "zarr", "numpy", "numcodecs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out
