"""The on-disk contract between ``gradcoh.logger`` (writer) and ``gradcoh.analysis`` (reader).

Standard library only: both sides import this module, and ``gradcoh.analysis`` must never import torch.

Layout of a store (one Zarr v3 group)::

    run.zarr/                    root attrs: FORMAT_KEY, CONFIG_KEY, LAYERS_KEY, VERSIONS_KEY, MODEL_KEY, ...
      batch/                     stream written by ``GradientLogger.record`` (attrs: COMMITTED_KEY, DROPPED_KEY)
        step        (step)                              int64   coordinate, the step passed to ``record``
        layer       (layer)                             str     coordinate, qualified module names
        layer_size  (layer)                             int64   coordinate, parameters per layer
        group_i     (group_i)                           str     coordinate, group names
        group_j     (group_j)                           str     coordinate, group names
        n_examples  (step)                              int64   examples m logged at that step
        wall_time   (step)                              float64 seconds since the epoch
        sq_norm     (step, example, layer)              float64 ‖g_{i,l}‖²  (NaN pads a short step)
        sum_sq_norm (step, layer)                       float64 ‖Σ_i g_{i,l}‖²
        sq_norm_total (step, layer)                     float64 Σ_i ‖g_{i,l}‖² (the m-coherence denominator; format 3)
        group_sq_norm (step, layer, group_i)            float64 Σ_{i∈a} ‖g_{i,l}‖² (format 3)
        group_count (step, group_i)                     int64   examples of each group at that step (format 3)
        group_gram  (step, layer, group_i, group_j)     float64 (Σ_{i∈a} g_{i,l})·(Σ_{j∈b} g_{j,l})
        index       (step, example)                     int64   dataset index, −1 pads
        label       (step, example)                     int64   training label, −1 when absent or padding
        true_label  (step, example)                     int64   label before corruption, −1 when unknown
        group       (step, example)                     int64   position in ``group_i``, −1 when padding
        loss        (step, example)                     float32 per-example loss, NaN when not recorded
        finite      (step, layer)                       bool    all statistics of that layer finite
        reconciled  (step, layer)                       bool    False: flagged (the guard or the verifier found the
                                                                 per-example gradients not summing to the batch
                                                                 gradient); True: not flagged, which is a verdict
                                                                 only where guard_checked is True
        guard_checked (step, layer)                     bool    the reconciliation guard compared the layer's sums at
                                                                 that step, with finite values (format 4; its
                                                                 schedule checks each layer once every guard_every
                                                                 logged steps)
        sketch      (step, example, layer, proj)        float16 (or the configured dtype), only if sketch_dim > 0
        alignment   (step, example, layer)              float64 g_{i,l}·G_l, G_l = Σ_j g_{j,l} of the step (sums over
                                                                 examples to sum_sq_norm); only if alignment=True
        ref_alignment (step, example, layer)            float64 g_{i,l}·R_l, R the reference gradient (mean loss of the
                                                                 reference set); only with a reference set
        ref_sq_norm (step, layer)                       float64 ‖R_l‖²; only with a reference set
        ref_step    (step)                              int64   step at which the R in use was computed
      probe/                     same variables, written by ``GradientLogger.probe``
      rank-00000/batch, ...      instead of the above when written by several processes (see ``rank_group``)

Readers trust the stream attribute ``COMMITTED_KEY`` (steps fully written), never an array's shape: the writer
resizes, writes the data chunks, and only then advances the committed count.
"""

from __future__ import annotations

import os

FORMAT_VERSION = 4
"""Incremented on every change of the layout below (2: ``reconciled`` added, per-parameter sketches; 3: every
per-step array has its own step chunk, sized by its bytes a step, instead of the step chunk of the largest array;
the per-step sums ``sq_norm_total``, ``group_sq_norm`` and ``group_count``, so that exact m-coherence reads no
per-example array; 4: ``guard_checked``, which layer-steps the reconciliation guard checked)."""

PER_STEP_SUMS = ("sq_norm_total", "group_sq_norm", "group_count")
"""Format-3 variables the writer derives from ``sq_norm`` and ``group`` (absent from older stores: readers sum)."""

APPENDABLE_FORMATS = (2, 3, 4)
"""Formats the logger appends to (the writer follows each existing array's own chunks). Appending to a stream of
format 2 or 3 adds ``guard_checked``, False at the steps written before (not known to be checked)."""

OLDEST_READABLE_FORMAT = 1
"""Readers accept stores from this format on (format 1 lacks ``reconciled``)."""

# --- root attributes -----------------------------------------------------------------------------------
FORMAT_KEY = "gradcoh_format_version"
CONFIG_KEY = "gradcoh_config"  # the logger configuration (JSON object)
LAYERS_KEY = "gradcoh_layers"  # list of {name, type, size, shapes, view, rule}
SKETCH_KEY = "gradcoh_sketch"  # {kind, dim, seed, dtype, version} or null
PROJECTIONS_KEY = "gradcoh_projections"  # {version, dim, params: {name: {kind, view}}}: each parameter's projection,
# written at the first step that sketches it (on the group the process writes: the root, or its rank's group)
VERSIONS_KEY = "gradcoh_versions"  # {package: version}
MODEL_KEY = "gradcoh_model"  # model class, qualified name
NOTES_KEY = "gradcoh_notes"  # list of strings: semantics worth knowing (BatchNorm in train mode, ...)
ERROR_KEY = "gradcoh_error"  # why logging stopped early (on_error="warn"), or absent
COMPACTED_KEY = "gradcoh_compacted"  # set by `gradcoh compact`: a finished, sharded, read-only store
WORLD_SIZE_KEY = "gradcoh_world_size"  # number of ranks; > 1: the streams live in per-rank groups

IDENTITY_KEY = "identity"  # inside CONFIG_KEY: the fields that must match to append to a store
SHARD_STEPS_KEY = "shard_steps"  # inside COMPACTED_KEY: {stream group path: steps per shard of its largest array}
SHARD_BYTES_KEY = "shard_bytes"  # inside COMPACTED_KEY: the shard size compaction aimed at

# --- stream attributes ---------------------------------------------------------------------------------
COMMITTED_KEY = "committed_steps"
DROPPED_KEY = "dropped_steps"
COORDINATES_KEY = "coordinates"  # CF convention: variables readers show as coordinates; written last at creation

# --- streams -------------------------------------------------------------------------------------------
STREAM_BATCH = "batch"
STREAM_PROBE = "probe"
STREAMS = (STREAM_BATCH, STREAM_PROBE)

# --- dimensions ----------------------------------------------------------------------------------------
DIM_STEP = "step"
DIM_EXAMPLE = "example"
DIM_LAYER = "layer"
DIM_GROUP_I = "group_i"
DIM_GROUP_J = "group_j"
DIM_PROJ = "proj"

# --- variables -----------------------------------------------------------------------------------------
STEP = "step"
LAYER = "layer"
LAYER_SIZE = "layer_size"
GROUP_I = "group_i"
GROUP_J = "group_j"
N_EXAMPLES = "n_examples"
WALL_TIME = "wall_time"
SQ_NORM = "sq_norm"
SUM_SQ_NORM = "sum_sq_norm"
SQ_NORM_TOTAL = "sq_norm_total"
GROUP_SQ_NORM = "group_sq_norm"
GROUP_COUNT = "group_count"
GROUP_GRAM = "group_gram"
INDEX = "index"
LABEL = "label"
TRUE_LABEL = "true_label"
GROUP = "group"
LOSS = "loss"
FINITE = "finite"
RECONCILED = "reconciled"
GUARD_CHECKED = "guard_checked"
SKETCH = "sketch"
ALIGNMENT = "alignment"
REF_ALIGNMENT = "ref_alignment"
REF_SQ_NORM = "ref_sq_norm"
REF_STEP = "ref_step"

DEFAULT_GROUP = "all"
"""The single group used when the logger is given no ``groups``."""

VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    # name: (dimensions, dtype); the order is the order of creation.
    STEP: ((DIM_STEP,), "int64"),
    N_EXAMPLES: ((DIM_STEP,), "int64"),
    WALL_TIME: ((DIM_STEP,), "float64"),
    SQ_NORM: ((DIM_STEP, DIM_EXAMPLE, DIM_LAYER), "float64"),
    SUM_SQ_NORM: ((DIM_STEP, DIM_LAYER), "float64"),
    GROUP_GRAM: ((DIM_STEP, DIM_LAYER, DIM_GROUP_I, DIM_GROUP_J), "float64"),
    SQ_NORM_TOTAL: ((DIM_STEP, DIM_LAYER), "float64"),
    GROUP_SQ_NORM: ((DIM_STEP, DIM_LAYER, DIM_GROUP_I), "float64"),
    GROUP_COUNT: ((DIM_STEP, DIM_GROUP_I), "int64"),
    INDEX: ((DIM_STEP, DIM_EXAMPLE), "int64"),
    LABEL: ((DIM_STEP, DIM_EXAMPLE), "int64"),
    TRUE_LABEL: ((DIM_STEP, DIM_EXAMPLE), "int64"),
    GROUP: ((DIM_STEP, DIM_EXAMPLE), "int64"),
    LOSS: ((DIM_STEP, DIM_EXAMPLE), "float32"),
    FINITE: ((DIM_STEP, DIM_LAYER), "bool"),
    RECONCILED: ((DIM_STEP, DIM_LAYER), "bool"),
    GUARD_CHECKED: ((DIM_STEP, DIM_LAYER), "bool"),
    SKETCH: ((DIM_STEP, DIM_EXAMPLE, DIM_LAYER, DIM_PROJ), "float16"),  # dtype configurable
    ALIGNMENT: ((DIM_STEP, DIM_EXAMPLE, DIM_LAYER), "float64"),
    REF_ALIGNMENT: ((DIM_STEP, DIM_EXAMPLE, DIM_LAYER), "float64"),
    REF_SQ_NORM: ((DIM_STEP, DIM_LAYER), "float64"),
    REF_STEP: ((DIM_STEP,), "int64"),
}
"""Every variable that grows along ``step``."""

OPTIONAL = (SKETCH, ALIGNMENT, REF_ALIGNMENT, REF_SQ_NORM, REF_STEP)
"""Variables a stream has only when the run asked for them (sketches, alignment, a reference set)."""

REFERENCE_VARIABLES = (REF_ALIGNMENT, REF_SQ_NORM, REF_STEP)
"""The variables of a reference set (``GradientLogger(reference=...)``)."""

STATIC_COORDS: dict[str, tuple[str, ...]] = {
    LAYER: (DIM_LAYER,),
    LAYER_SIZE: (DIM_LAYER,),
    GROUP_I: (DIM_GROUP_I,),
    GROUP_J: (DIM_GROUP_J,),
}
"""Coordinates written once when a stream is created."""

FILL_VALUES: dict[str, object] = {
    "int64": -1,
    "float64": float("nan"),
    "float32": float("nan"),
    "float16": float("nan"),
    "bool": False,
}

SKETCH_DTYPES = ("float16", "float32", "bfloat16")
"""Sketch storage types; ``bfloat16`` is stored as float32 rounded to bfloat16's 7 mantissa bits (BitRound)."""

NON_INDEX_COORDS = (N_EXAMPLES, WALL_TIME, INDEX, LABEL, TRUE_LABEL, GROUP, LAYER_SIZE, REF_STEP)
"""Variables that readers present as coordinates rather than data (the ``coordinates`` attribute)."""


CHUNK_BYTES_ENV = "GRADCOH_CHUNK_BYTES"
"""Environment variable overriding :data:`CHUNK_TARGET_BYTES` (read once, at import) for new arrays. The test suite
sets 64 KiB: every commit rewrites each array's partly filled chunk whole, so small chunks make its many short runs
cheap (4 MiB chunks: ~20 MiB encoded per commit of a 2-layer model) while exercising the same code."""


def chunk_target_bytes(environ: dict[str, str]) -> int:
    """:data:`CHUNK_TARGET_BYTES` as set by ``environ`` (4 MiB when :data:`CHUNK_BYTES_ENV` is unset).

    Raises:
        ValueError: The variable is not a positive integer.
    """
    text = environ.get(CHUNK_BYTES_ENV)
    if text is None:
        return 4 * 2**20
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"gradcoh.logger.schema: {CHUNK_BYTES_ENV}={text!r} is not a positive number of bytes; "
                         f"unset it (4 MiB chunks) or give e.g. {CHUNK_BYTES_ENV}=65536")
    return value


CHUNK_TARGET_BYTES = chunk_target_bytes(os.environ)
"""Target uncompressed size of one chunk of each per-step array (4 MiB unless :data:`CHUNK_BYTES_ENV` says
otherwise); sets that array's steps per chunk. Existing arrays keep their chunks when appended to."""

MAX_STEPS_PER_CHUNK = 2**16
"""Upper bound on the steps of one chunk (the small per-step arrays: 512 KiB of ``n_examples``)."""


def steps_per_chunk(step_bytes: int) -> int:
    """Steps in one chunk of an array of ``step_bytes`` bytes a step: a power of two, ≤ :data:`CHUNK_TARGET_BYTES`.

    At least one step, at most :data:`MAX_STEPS_PER_CHUNK`.

    Powers of two make the chunks of all arrays nest, so a reader can give several arrays the same chunk
    boundaries along ``step`` with whole stored objects on every array.
    """
    fit = max(1, min(MAX_STEPS_PER_CHUNK, CHUNK_TARGET_BYTES // max(step_bytes, 1)))
    return 1 << (fit.bit_length() - 1)


def is_url(path: str) -> bool:
    """Whether ``path`` names a remote fsspec location (``s3://``, ``memory://``, ...); ``file://`` is local."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """``path`` without a ``file://`` prefix."""
    return path[len("file://") :] if path.startswith("file://") else path


def rank_group(rank: int) -> str:
    """Name of the group holding one rank's streams in a multi-process (DDP) store: ``rank-00003``.

    A store written by ``world_size > 1`` processes has ``rank-XXXXX/batch``, ``rank-XXXXX/probe``, ... instead of
    top-level streams: every rank writes only its own group (no cross-process writes to one array). The ``example``
    axis of the run is the concatenation of the ranks' examples in rank order; ``sum_sq_norm`` and ``group_gram``
    are global (all-reduced) and identical in every rank's group.
    """
    return f"rank-{rank:05d}"


class GradcohError(Exception):
    """Base of every error gradcoh raises on purpose (the CLI turns these into one-line messages)."""


class FormatError(GradcohError, ValueError):
    """A path is not a gradcoh store, or one written in a format this version cannot read."""
