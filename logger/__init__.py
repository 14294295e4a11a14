"""Training side of gradcoh: the per-example gradient hook, layer rules, sketches and the store writer.

Re-exports are lazy (PEP 562) so that ``import gradcoh.logger.schema`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GradientLogger": "gradcoh.logger.hook",
    "LayerRules": "gradcoh.logger.layers",
    "default_rules": "gradcoh.logger.layers",
    "Projection": "gradcoh.logger.sketch",
    "StoreError": "gradcoh.logger.store",
    "validate": "gradcoh.logger.validation",
    "Validation": "gradcoh.logger.validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import public names on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gradcoh.logger' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
