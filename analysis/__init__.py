"""Offline analysis of gradcoh stores: m-coherence, splits, layer breakdowns and pairwise metrics.

NumPy, xarray, Dask and zarr only: this package never imports torch. Every function takes the lazy Dataset of
:func:`open_store` (or any NumPy-backed equivalent) and returns lazy xarray objects; call ``.compute()`` (or
:func:`compute` for a progress display) to get numbers. Plots live in :mod:`gradcoh.analysis.plots` (matplotlib is
imported only there).
"""

from __future__ import annotations

from gradcoh.analysis.alignment import example_alignment, rank_examples
from gradcoh.analysis.cluster import compute, connect, session
from gradcoh.analysis.coherence import (
    alpha,
    coherence_parts,
    debiased_alpha,
    gradient_diversity,
    m_coherence,
    noise_scale,
)
from gradcoh.analysis.finite import guard_coverage
from gradcoh.analysis.io import (
    MissingMetadataWarning,
    StoreNotFoundError,
    StreamNotFoundError,
    describe_store,
    list_streams,
    open_root,
    open_store,
    valid_examples,
)
from gradcoh.analysis.layers import layer_weights, match_layers, select_layers
from gradcoh.analysis.pairwise import (
    class_stiffness,
    gradient_confusion,
    mean_pairwise_cosine,
    pair_statistics,
    stiffness,
)
from gradcoh.analysis.sampled_pairs import sampled_stiffness
from gradcoh.analysis.splits import cg_fractions, cross_group_benefit
from gradcoh.analysis.subsets import membership
from gradcoh.analysis.summary import metrics_summary
from gradcoh.analysis.tensorboard import export_tensorboard
from gradcoh.logger.schema import FormatError

__all__ = [
    "FormatError",
    "MissingMetadataWarning",
    "StoreNotFoundError",
    "StreamNotFoundError",
    "alpha",
    "cg_fractions",
    "class_stiffness",
    "coherence_parts",
    "compute",
    "connect",
    "cross_group_benefit",
    "debiased_alpha",
    "describe_store",
    "example_alignment",
    "export_tensorboard",
    "gradient_confusion",
    "gradient_diversity",
    "guard_coverage",
    "layer_weights",
    "list_streams",
    "m_coherence",
    "match_layers",
    "mean_pairwise_cosine",
    "membership",
    "metrics_summary",
    "noise_scale",
    "open_root",
    "open_store",
    "pair_statistics",
    "rank_examples",
    "sampled_stiffness",
    "select_layers",
    "session",
    "stiffness",
    "valid_examples",
]
