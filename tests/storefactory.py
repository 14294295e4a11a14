"""Build gradcoh stores from NumPy per-example gradients, following ``gradcoh.logger.schema`` exactly.

The test oracle is always the full gradients ``grads[step][layer]`` of shape ``(m_step, P_layer)``: analysis
results computed from the store are compared with NumPy on these arrays. Sketches are ``G_l @ R_l.T`` with a
seeded Gaussian ``R_l / sqrt(k)`` standing in for the logger's projector.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from gradcoh.logger import schema

Grads = list[list[np.ndarray]]  # [step][layer] -> (m_step, P_layer)


@dataclass
class StreamData:
    """What was written into one stream (the oracle side)."""

    grads: Grads
    labels: list[np.ndarray]
    groups: list[np.ndarray]
    steps: list[int]
    projections: list[np.ndarray] = field(default_factory=list)  # R_l, (k, P_l), already scaled by 1/sqrt(k)
    reference: list[np.ndarray] | None = None  # reference gradient per layer (P_l,), or None

    def flat(self, step: int, layers: Sequence[int] | None = None) -> np.ndarray:
        """Per-example gradients of one step, concatenated over ``layers`` (all by default)."""
        idx = range(len(self.grads[step])) if layers is None else layers
        return np.concatenate([self.grads[step][j] for j in idx], axis=1)

    def sketch(self, step: int) -> np.ndarray:
        """The exact (float64) sketch of one step, (m, layers * k)."""
        return np.concatenate([g @ r.T for g, r in zip(self.grads[step], self.projections, strict=True)], axis=1)


@dataclass
class StoreData:
    """Path of a built store plus the arrays it was built from."""

    path: Any
    layer_names: list[str]
    group_names: list[str]
    sketch_dim: int
    streams: dict[str, StreamData]

    @property
    def batch(self) -> StreamData:
        return self.streams[schema.STREAM_BATCH]


def random_gradients(
    rng: np.random.Generator,
    *,
    n_steps: int,
    m: int,
    sizes: Sequence[int],
    shared: float = 0.6,
    short_step: tuple[int, int] | None = None,
) -> Grads:
    """Correlated per-example gradients: a shared direction per step and layer plus Gaussian noise.

    Args:
        rng: Random generator.
        n_steps: Number of steps.
        m: Examples per step.
        sizes: Parameters per layer.
        shared: Scale of the shared component (coherence grows with it).
        short_step: ``(step, m_short)``: that step has only ``m_short`` examples (exercises padding).

    Returns:
        ``grads[step][layer]`` arrays of shape ``(m_step, P_layer)``.
    """
    out: Grads = []
    for t in range(n_steps):
        mt = short_step[1] if short_step is not None and short_step[0] == t else m
        scales = rng.uniform(0.3, 2.0, size=(mt, 1))
        out.append([(shared * rng.normal(size=p) + rng.normal(size=(mt, p))) * scales for p in sizes])
    return out


def _create(group: zarr.Group, name: str, data: np.ndarray, dims: tuple[str, ...], dtype: str) -> None:
    chunks = tuple(min(2, n) if d == schema.DIM_STEP else max(n, 1) for d, n in zip(dims, data.shape, strict=True))
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=dtype,
        chunks=chunks,
        fill_value=schema.FILL_VALUES.get(dtype, 0),
        dimension_names=dims,
    )
    arr[...] = data


def _create_static(group: zarr.Group, name: str, values: Sequence[Any], dim: str, dtype: Any) -> None:
    arr = group.create_array(name, shape=(len(values),), dtype=dtype, dimension_names=(dim,))
    arr[...] = np.asarray(values, dtype=dtype)


def _projections(sizes: Sequence[int], k: int, seed: int) -> list[np.ndarray]:
    return [np.random.default_rng([seed, j]).normal(size=(k, p)) / np.sqrt(k) for j, p in enumerate(sizes)]


def _step_arrays(data: StreamData, n_rows: int, sketch_dim: int, n_groups: int) -> dict[str, np.ndarray]:
    """Dense, padded arrays of one stream (``n_rows`` >= number of steps: extra rows are junk)."""
    n_layers = len(data.grads[0])
    width = max(len(g[0]) for g in data.grads)
    arrays = {
        schema.STEP: np.full(n_rows, -1, np.int64),
        schema.N_EXAMPLES: np.zeros(n_rows, np.int64),
        schema.WALL_TIME: np.full(n_rows, np.nan),
        schema.SQ_NORM: np.full((n_rows, width, n_layers), np.nan),
        schema.SUM_SQ_NORM: np.full((n_rows, n_layers), np.nan),
        schema.GROUP_GRAM: np.full((n_rows, n_layers, n_groups, n_groups), np.nan),
        schema.INDEX: np.full((n_rows, width), -1, np.int64),
        schema.LABEL: np.full((n_rows, width), -1, np.int64),
        schema.TRUE_LABEL: np.full((n_rows, width), -1, np.int64),
        schema.GROUP: np.full((n_rows, width), -1, np.int64),
        schema.LOSS: np.full((n_rows, width), np.nan, np.float32),
        schema.FINITE: np.zeros((n_rows, n_layers), bool),
    }
    if sketch_dim:
        arrays[schema.SKETCH] = np.full((n_rows, width, n_layers, sketch_dim), np.nan)
    if data.reference is not None:  # with a reference set, the batch alignment too
        arrays[schema.ALIGNMENT] = np.full((n_rows, width, n_layers), np.nan)
        arrays[schema.REF_ALIGNMENT] = np.full((n_rows, width, n_layers), np.nan)
        arrays[schema.REF_SQ_NORM] = np.full((n_rows, n_layers), np.nan)
        arrays[schema.REF_STEP] = np.full(n_rows, -1, np.int64)
    # junk after the committed steps: a crashed writer's half-written rows
    arrays[schema.SUM_SQ_NORM][len(data.grads) :] = 1e30
    arrays[schema.SQ_NORM][len(data.grads) :] = 1e30
    for t, layers in enumerate(data.grads):
        _fill_step(arrays, data, t, layers, sketch_dim, n_groups)
    return arrays


def _fill_step(arrays, data: StreamData, t: int, layers, sketch_dim: int, n_groups: int) -> None:
    mt = len(layers[0])
    arrays[schema.STEP][t] = data.steps[t]
    arrays[schema.N_EXAMPLES][t] = mt
    arrays[schema.WALL_TIME][t] = 1.7e9 + t
    arrays[schema.INDEX][t, :mt] = np.arange(mt) + 1000 * t
    arrays[schema.LABEL][t, :mt] = data.labels[t]
    arrays[schema.TRUE_LABEL][t, :mt] = data.labels[t]
    arrays[schema.GROUP][t, :mt] = data.groups[t]
    arrays[schema.LOSS][t, :mt] = 1.0
    arrays[schema.FINITE][t] = True
    for j, g in enumerate(layers):
        arrays[schema.SQ_NORM][t, :mt, j] = (g * g).sum(1)
        s = g.sum(0)
        arrays[schema.SUM_SQ_NORM][t, j] = s @ s
        sums = np.stack([g[data.groups[t] == a].sum(0) for a in range(n_groups)])
        arrays[schema.GROUP_GRAM][t, j] = sums @ sums.T
        if sketch_dim:
            arrays[schema.SKETCH][t, :mt, j] = g @ data.projections[j].T
        if data.reference is not None:
            arrays[schema.ALIGNMENT][t, :mt, j] = g @ s
            arrays[schema.REF_ALIGNMENT][t, :mt, j] = g @ data.reference[j]
            arrays[schema.REF_SQ_NORM][t, j] = data.reference[j] @ data.reference[j]
            arrays[schema.REF_STEP][t] = data.steps[t]


def _write_stream(root: zarr.Group, name: str, data: StreamData, store: StoreData, **opts: Any) -> None:
    n_rows = len(data.grads) + opts["extra_steps"]
    arrays = _step_arrays(data, n_rows, store.sketch_dim, len(store.group_names))
    grp = root.create_group(name)
    grp.attrs.update({schema.COMMITTED_KEY: opts["committed"] or len(data.grads), schema.DROPPED_KEY: 0})
    sizes = [g.shape[1] for g in data.grads[0]]
    _create_static(grp, schema.LAYER, store.layer_names, schema.DIM_LAYER, str)
    _create_static(grp, schema.LAYER_SIZE, sizes, schema.DIM_LAYER, np.int64)
    _create_static(grp, schema.GROUP_I, store.group_names, schema.DIM_GROUP_I, str)
    _create_static(grp, schema.GROUP_J, store.group_names, schema.DIM_GROUP_J, str)
    for var, (dims, dtype) in schema.VARIABLES.items():
        if var in arrays:
            dtype = opts["sketch_dtype"] if var == schema.SKETCH else dtype
            _create(grp, var, arrays[var], dims, dtype)


def _root_attrs(store: StoreData, sizes: Sequence[int], **opts: Any) -> dict[str, Any]:
    config = {
        "every": 1,
        "sketch_dim": store.sketch_dim,
        "seed": opts["seed"],
        "loss_reduction": "mean",
        "groups": store.group_names if opts["user_groups"] else None,
    }
    layers = [
        {"name": n, "type": "Linear", "size": int(p), "shapes": [[int(p)]], "view": [1, int(p)], "rule": "linear"}
        for n, p in zip(store.layer_names, sizes, strict=True)
    ]
    sketch = None
    if store.sketch_dim:
        sketch = {"kind": "gaussian", "dim": store.sketch_dim, "seed": opts["seed"], "dtype": opts["sketch_dtype"]}
    attrs = {
        schema.CONFIG_KEY: config,
        schema.LAYERS_KEY: layers,
        schema.SKETCH_KEY: sketch,
        schema.VERSIONS_KEY: {"gradcoh": "test"},
        schema.MODEL_KEY: "storefactory.Toy",
        schema.NOTES_KEY: [],
    }
    if opts["format_version"] is not None:
        attrs[schema.FORMAT_KEY] = opts["format_version"]
    return attrs


def _stream_data(grads: Grads, labels, groups, steps, projections) -> StreamData:
    n = len(grads)
    return StreamData(
        grads=grads,
        labels=list(labels) if labels is not None else [np.full(len(s[0]), -1) for s in grads],
        groups=list(groups) if groups is not None else [np.zeros(len(s[0]), np.int64) for s in grads],
        steps=list(steps) if steps is not None else [10 * t for t in range(n)],
        projections=projections,
    )


def build_store(
    path: str | os.PathLike | zarr.abc.store.Store,
    grads: Grads,
    *,
    labels: Sequence[np.ndarray] | None = None,
    groups: Sequence[np.ndarray] | None = None,
    group_names: Sequence[str] | None = None,
    layer_names: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    sketch_dim: int = 0,
    sketch_dtype: str = "float32",
    seed: int = 0,
    probe: Grads | None = None,
    include_batch: bool = True,
    committed: int | None = None,
    extra_steps: int = 0,
    format_version: int | None = schema.FORMAT_VERSION,
    reference: Sequence[np.ndarray] | None = None,
) -> StoreData:
    """Write a gradcoh store from full per-example gradients.

    Args:
        path: Directory path or a zarr store object.
        grads: ``grads[step][layer]``, arrays ``(m_step, P_layer)``; steps may differ in ``m`` (padding).
        labels: Per-step labels (default: −1, absent).
        groups: Per-step group positions (default: all 0, the single group ``"all"``).
        group_names: Names for the ``group_i`` coordinate (default ``("all",)``).
        layer_names: Layer names (default ``layer0``, ...), in depth order.
        steps: Step numbers (default ``0, 10, 20, ...``).
        sketch_dim: Sketch width k per layer (0: no ``sketch`` variable).
        sketch_dtype: Storage type of sketches.
        seed: Seed of the Gaussian projections.
        probe: Gradients of a ``probe`` stream (same layers, single group, no labels).
        include_batch: Whether to write the ``batch`` stream.
        committed: ``committed_steps`` attribute (default: every step written).
        extra_steps: Junk rows written after the last step (as after a crash).
        format_version: Root format version (``None``: omit the key).
        reference: A reference gradient per layer ``(P_l,)``: the batch stream then also holds ``alignment``,
            ``ref_alignment``, ``ref_sq_norm`` and ``ref_step``.

    Returns:
        The path and the oracle arrays.
    """
    sizes = [g.shape[1] for g in grads[0]]
    store = StoreData(
        path=path,
        layer_names=list(layer_names or [f"layer{j}" for j in range(len(sizes))]),
        group_names=list(group_names or (schema.DEFAULT_GROUP,)),
        sketch_dim=sketch_dim,
        streams={},
    )
    projections = _projections(sizes, sketch_dim, seed) if sketch_dim else []
    opts = {
        "extra_steps": extra_steps,
        "committed": committed,
        "sketch_dtype": sketch_dtype,
        "seed": seed,
        "format_version": format_version,
        "user_groups": group_names is not None,
    }
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.attrs.update(_root_attrs(store, sizes, **opts))
    if include_batch:
        store.streams[schema.STREAM_BATCH] = _stream_data(grads, labels, groups, steps, projections)
        store.streams[schema.STREAM_BATCH].reference = None if reference is None else list(reference)
    if probe is not None:
        store.streams[schema.STREAM_PROBE] = _stream_data(probe, None, None, None, projections)
    for name, data in store.streams.items():
        if name == schema.STREAM_PROBE and len(store.group_names) > 1:
            data.groups = [np.zeros(len(s[0]), np.int64) for s in data.grads]
        _write_stream(root, name, data, store, **opts)
    return store


def aligned_store(path: str | os.PathLike, m: int = 6, sizes: Sequence[int] = (5, 3)) -> tuple[StoreData, np.ndarray,
                                                                                              list[np.ndarray]]:
    """A store with alignment and a reference gradient: 4 steps (the third short), groups clean/corrupted, and
    dataset indices that repeat across steps (7 examples, each seen 1–4 times).

    Returns:
        The store, its ``index`` array ``(step, example)`` and the reference gradient per layer.
    """
    rng = np.random.default_rng(3)
    grads = random_gradients(rng, n_steps=4, m=m, sizes=sizes, shared=0.4, short_step=(2, 4))
    groups = [rng.integers(0, 2, len(g[0])) for g in grads]
    reference = [rng.normal(size=p) for p in sizes]
    store = build_store(path, grads, groups=groups, group_names=["clean", "corrupted"], reference=reference)
    index = np.full((4, m), -1, np.int64)
    for t, g in enumerate(grads):
        index[t, : len(g[0])] = (np.arange(len(g[0])) + 2 * t) % 7
    zarr.open_group(str(path), mode="r+")["batch/index"][...] = index
    return store, index, reference
