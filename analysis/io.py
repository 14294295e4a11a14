"""Opening gradcoh stores as lazy, Dask-backed :class:`xarray.Dataset` objects (disk → Dataset).

Only ``gradcoh.logger.schema`` (stdlib) is shared with the writer; torch is never imported here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.errors
from gradcoh.analysis.finite import guard_counts
from gradcoh.logger import schema
from zarr.storage import FsspecStore, LocalStore

log = logging.getLogger(__name__)

__all__ = [
    "COMPACTED_KEY",
    "RECORD_ARGUMENTS",
    "VALID",
    "MissingMetadataWarning",
    "StoreNotFoundError",
    "StreamNotFoundError",
    "describe_store",
    "holds_metadata",
    "list_streams",
    "make_store",
    "open_root",
    "open_store",
    "valid_examples",
    "warn_missing_metadata",
]


COMPACTED_KEY = schema.COMPACTED_KEY
"""Root attribute written by :func:`~gradcoh.analysis.compact.compact_store` (final store, sharded, consolidated)."""


VALID = "valid"
"""``(step, example)`` boolean coordinate of multi-process stores: True at real examples (see :func:`valid_examples`).

Single-process stores do not carry it: there the rule ``example < n_examples`` is applied on the fly.
"""

RECORD_ARGUMENTS = {
    schema.INDEX: "index",
    schema.LABEL: "labels",
    schema.TRUE_LABEL: "true_labels",
    schema.GROUP: "group",
}
"""Per-example metadata variable → the ``GradientLogger.record``/``probe`` argument that provides it."""

_NOUNS = {schema.INDEX: "dataset indices", schema.LABEL: "labels", schema.TRUE_LABEL: "true labels",
          schema.GROUP: "groups"}


class MissingMetadataWarning(UserWarning):
    """An analysis needs per-example metadata (labels, indices) that the store does not hold.

    Issued by :func:`warn_missing_metadata` instead of a silently empty or NaN result; the message names the
    ``GradientLogger.record()`` argument that would have provided the data.
    """


class StoreNotFoundError(schema.FormatError):
    """Nothing exists at the given path or URL."""


class StreamNotFoundError(schema.FormatError):
    """The store exists but lacks the requested stream."""


def make_store(
    path_or_url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *, read_only: bool = True
) -> Any:
    """A zarr store object for a local path, a ``file://`` URL (both :class:`LocalStore`) or a remote fsspec URL.

    Local and remote are told apart by :func:`gradcoh.logger.schema.is_url`, as in the writer.

    Args:
        path_or_url: Store directory or URL.
        storage_options: fsspec options; only for remote URLs.
        read_only: Open read-only; a read-only local store must exist.

    Returns:
        A :class:`~zarr.storage.LocalStore` or :class:`~zarr.storage.FsspecStore`.

    Raises:
        StoreNotFoundError: A read-only local store that does not exist, or a URL fsspec cannot open.
        ValueError: ``storage_options`` for a local path.

    """
    text = os.fspath(path_or_url)
    if schema.is_url(text):
        try:
            return FsspecStore.from_url(text, storage_options=dict(storage_options or {}), read_only=read_only)
        except (ImportError, ValueError) as exc:
            raise StoreNotFoundError(f"cannot open {text!r}: {exc}") from exc
    if storage_options:
        raise ValueError("storage_options only apply to remote URLs (s3://, memory://, ...)")
    path = schema.local_path(text)
    if read_only and not Path(path).exists():
        raise StoreNotFoundError(f"no such store: {text!r}")
    return LocalStore(path, read_only=read_only)


def open_root(path_or_url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open a store's root group and check that it is a gradcoh store this version can read.

    Args:
        path_or_url: Directory path or fsspec URL (``memory://``, ``file://``, ``s3://`` ...).
        storage_options: Passed to fsspec for URLs.

    Returns:
        The root :class:`zarr.Group`, opened read-only.

    Raises:
        StoreNotFoundError: Nothing exists at ``path_or_url``.
        FormatError: Not a Zarr group, not a gradcoh store, or a format newer than this gradcoh.

    """
    store = make_store(path_or_url, storage_options)
    try:
        root = zarr.open_group(store, mode="r", use_consolidated=False)
    except FileNotFoundError as exc:
        if isinstance(store, LocalStore):
            raise schema.FormatError(f"{os.fspath(path_or_url)!r} is not a zarr store") from exc
        raise StoreNotFoundError(f"no such store: {os.fspath(path_or_url)!r}") from exc
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, KeyError, ValueError) as exc:
        raise schema.FormatError(f"{os.fspath(path_or_url)!r} is not a zarr store (no zarr group at its root)") from exc
    _check_format(root.attrs.asdict(), os.fspath(path_or_url))
    if COMPACTED_KEY in root.attrs:
        # Only compaction consolidates, and a compacted store is final, so its consolidated metadata is never
        # stale; it saves one request per array on object stores. Live stores are always read unconsolidated.
        root = zarr.open_group(store, mode="r", use_consolidated=True)
    return root


def _check_format(attrs: Mapping[str, Any], where: str) -> None:
    version = attrs.get(schema.FORMAT_KEY)
    if version is None:
        raise schema.FormatError(f"{where!r} is a zarr group but not a gradcoh store (no {schema.FORMAT_KEY!r})")
    if not isinstance(version, int) or isinstance(version, bool):
        raise schema.FormatError(f"{where!r}: invalid {schema.FORMAT_KEY!r} {version!r}")
    if version > schema.FORMAT_VERSION:
        raise schema.FormatError(
            f"{where!r} was written by a newer gradcoh (format {version} > {schema.FORMAT_VERSION}); upgrade gradcoh"
        )
    if version < schema.OLDEST_READABLE_FORMAT:
        raise schema.FormatError(
            f"{where!r}: format {version} is older than supported ({schema.OLDEST_READABLE_FORMAT})")


def list_streams(root: zarr.Group) -> list[str]:
    """Names of the streams present in a store, in ``schema.STREAMS`` order first.

    A multi-process store keeps its streams in per-rank groups (``schema.rank_group``): its streams are those of
    rank 0's group, which :func:`open_store` joins with the other ranks'.
    """
    if _world_size(root) > 1 and schema.rank_group(0) in root:
        root = root[schema.rank_group(0)]
    names = sorted(name for name, _ in root.groups())
    return [s for s in schema.STREAMS if s in names] + [s for s in names if s not in schema.STREAMS]


def _world_size(root: zarr.Group) -> int:
    """Processes that wrote the store (1: single-process; its streams are the root's subgroups)."""
    world = root.attrs.get(schema.WORLD_SIZE_KEY, 1)
    return world if isinstance(world, int) and not isinstance(world, bool) and world > 1 else 1


_RANK_FLAGS = (schema.FINITE, schema.RECONCILED, schema.GUARD_CHECKED)
"""``(step, layer)`` flags each rank of a multi-process store computes over its own examples: the run's value is True
only where it is True on every rank (a layer-step non-finite, flagged or unchecked on one rank is so for the run)."""


def _all_ranks(values: list[Any], world: int) -> Any:
    """One of :data:`_RANK_FLAGS` over a run: the AND of the ranks' (NumPy or xarray) values.

    All False when some rank lacks the variable (``guard_checked`` of a rank whose stream a crash left before an
    append added it): never a check that rank did not claim.
    """
    out = values[0]
    for v in values[1:]:
        out = out & v
    return out if len(values) == world else out & False


def _committed_steps(group: zarr.Group, stream: str) -> int:
    committed = group.attrs.get(schema.COMMITTED_KEY)
    if not isinstance(committed, int) or committed < 0:
        raise schema.FormatError(f"stream {stream!r} has no valid {schema.COMMITTED_KEY!r} attribute")
    return committed


def _stream_group(root: zarr.Group, stream: str) -> zarr.Group:
    existing = list_streams(root)
    if stream not in existing:
        found = ", ".join(existing) or "none"
        raise StreamNotFoundError(f"store has no stream {stream!r} (streams present: {found})")
    return root[stream]


TASK_BYTES = 100 * 2**20
"""Target uncompressed bytes of one Dask chunk of each per-step variable (about 100 MB a task, the Dask guidance)."""


def task_steps(step_bytes: int, unit: int, steps: int) -> int:
    """Steps of one Dask chunk: a whole number of ``unit`` (the stored chunk or shard), about :data:`TASK_BYTES`.

    Never more than ``steps`` rounded up to ``unit`` (one chunk for a short stream).
    """
    per = max(1, TASK_BYTES // max(step_bytes * unit, 1)) * unit
    return max(unit, min(per, -(-max(steps, 1) // unit) * unit))


def _chunk_by_bytes(ds: xr.Dataset, group: zarr.Group) -> xr.Dataset:
    """Dask chunks per variable: whole stored objects along ``step``, about :data:`TASK_BYTES` each, whole otherwise.

    The stored chunks differ per array (format 3) and can be tiny (one step in older stores), so the Dask chunk is
    set by each variable's bytes, not by its zarr chunk: one task reads many objects of a small array. The per-step
    summaries (no ``example`` or ``proj`` dimension: ``sum_sq_norm``, ``n_examples``, ``finite`` ...) share one
    chunking of about :data:`TASK_BYTES` of all of them together, so combining them needs no rechunk and a task's
    inputs stay near that size. Only metadata already read is used (no request).
    """
    sizes: dict[str, tuple[int, int]] = {}  # name -> (bytes a step, stored steps per object)
    for name, var in ds.variables.items():
        if schema.DIM_STEP in var.dims and name != schema.DIM_STEP and name in group:
            arr = group[name]
            step_bytes = var.dtype.itemsize * int(np.prod([n for d, n in var.sizes.items() if d != schema.DIM_STEP]))
            sizes[name] = (step_bytes, (arr.shards or arr.chunks)[0])
    summaries = [n for n in sizes if not {schema.DIM_EXAMPLE, schema.DIM_PROJ} & set(ds[n].dims)]
    n_steps = ds.sizes.get(schema.DIM_STEP, 0)
    steps = {n: task_steps(*sizes[n], n_steps) for n in sizes}
    if summaries:
        # One task reads all the summaries together, so their bytes add up; chunk boundaries follow the finest
        # stored chunk among them (an object of a coarser one, at most a few MiB, may be read by two tasks).
        shared = task_steps(sum(sizes[n][0] for n in summaries), min(sizes[n][1] for n in summaries), n_steps)
        steps.update(dict.fromkeys(summaries, shared))
    chunked = {n: ds.variables[n].chunk({d: (steps[n] if d == schema.DIM_STEP else -1) for d in ds[n].dims})
               for n in sizes}
    coords = {k: v for k, v in chunked.items() if k in ds.coords}
    return ds.assign_coords(coords).assign({k: v for k, v in chunked.items() if k not in coords})


def _open_trimmed(store: Any, group: zarr.Group, stream: str, committed: int, **kwargs: Any) -> xr.Dataset:
    """``xr.open_zarr`` of one stream, cut to its committed steps.

    The per-step arrays can differ in length beyond ``committed`` (a writer killed while resizing, or one resizing
    right now), which ``xr.open_zarr`` refuses ("conflicting sizes for dimension 'step'"). Then every per-step array
    is opened on its own, trimmed, and the parts are merged: arrays only grow while a stream is written, so each is
    at least ``committed`` long.
    """
    trim = {schema.DIM_STEP: slice(0, committed)}
    try:
        return xr.open_zarr(store, group=stream, zarr_format=3, **kwargs).isel(trim)
    except ValueError as exc:
        if "conflicting sizes" not in str(exc):
            raise
    per_step = [name for name, arr in group.arrays() if (arr.metadata.dimension_names or (None,))[0] == schema.DIM_STEP]
    parts = []
    for name in per_step:
        part = xr.open_zarr(
            store, group=stream, zarr_format=3, drop_variables=[n for n in per_step if n != name], **kwargs
        )
        if part.sizes[schema.DIM_STEP] < committed:
            raise schema.FormatError(
                f"stream {stream!r}: {name} holds {part.sizes[schema.DIM_STEP]} steps but {committed} are committed "
                "(the store was modified outside gradcoh)"
            )
        parts.append(part.isel(trim))
    log.info("stream %s: arrays of unequal length beyond the %d committed steps", stream, committed)
    return xr.merge(parts, compat="override", join="exact", combine_attrs="override")


def open_store(
    path_or_url: str | os.PathLike,
    stream: str = schema.STREAM_BATCH,
    chunks: Mapping[str, int] | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Open one stream of a gradcoh store as a lazy Dask-backed Dataset, trimmed to its committed steps.

    Args:
        path_or_url: Store directory or fsspec URL (``memory://``, ``file://``, ``s3://``; ``s3`` needs s3fs).
        stream: ``"batch"`` or ``"probe"``.
        chunks: Dask chunks; ``None`` sets them per variable by bytes: about :data:`TASK_BYTES` along ``step``,
            always a whole number of stored objects (zarr chunks, or shards in a compacted store), whole along
            the other dimensions. Any other value is passed to :func:`xarray.open_zarr`.
        storage_options: fsspec options for URLs (credentials, endpoint, ...).

    Returns:
        The Dataset: ``index, label, true_label, group, n_examples, wall_time, layer_size`` are coordinates; the
        root attributes are copied into ``ds.attrs`` (plus ``stream`` and the stream's own attributes).

    Raises:
        StoreNotFoundError: Nothing at ``path_or_url``.
        StreamNotFoundError: The stream is missing (the message names the streams present).
        FormatError: Not a zarr store, not a gradcoh store, or written by a newer gradcoh.

    Examples:
        >>> ds = open_store("runs/exp1.zarr")  # doctest: +SKIP
        >>> ds.sq_norm.dims  # doctest: +SKIP
        ('step', 'example', 'layer')

    """
    root = open_root(path_or_url, storage_options)
    world = _world_size(root)
    if world > 1:
        return _open_ranks(root, stream, world, chunks)
    group = _stream_group(root, stream)
    committed = _committed_steps(group, stream)
    if committed == 0 and schema.COORDINATES_KEY not in group.attrs:  # the writer's last step when creating a stream
        raise StreamNotFoundError(f"stream {stream!r} holds no committed steps (its writer stopped while creating it)")
    compacted = COMPACTED_KEY in root.attrs
    ds = _open_trimmed(root.store, group, stream, committed, consolidated=compacted, chunks=chunks)
    if chunks is None:
        ds = _chunk_by_bytes(ds, group)
    ds = ds.set_coords([name for name in schema.NON_INDEX_COORDS if name in ds.data_vars])
    ds.attrs = {**root.attrs.asdict(), **group.attrs.asdict(), "stream": stream}
    log.debug("opened %s stream %s: %d committed steps", path_or_url, stream, committed)
    return ds


def _open_ranks(root: zarr.Group, stream: str, world: int, chunks: Mapping[str, int] | str | None) -> xr.Dataset:
    """One Dataset from the per-rank groups of a multi-process store (see ``schema.rank_group``).

    The ``example`` axis is the ranks' examples in rank order (each rank's padding stays in its block); per-step
    global values (``sum_sq_norm``, ``group_gram``) come from rank 0, ``n_examples`` is summed over ranks, and only
    the steps committed by every rank are shown (:func:`_common_rows`: a rank killed mid-run shortens the common
    prefix, a step one rank dropped is left out); the per-rank sums ``sq_norm_total``, ``group_sq_norm`` and
    ``group_count`` are summed over ranks like ``n_examples``; the flags ``finite``, ``reconciled`` and
    ``guard_checked`` are True only where every rank's are (:data:`_RANK_FLAGS`).
    """
    groups = [_stream_group(_rank_group(root, rank), stream) for rank in range(world)]
    rows, committed = _common_rows(groups, stream)
    parts = [
        _open_trimmed(root.store, g, f"{schema.rank_group(r)}/{stream}", c,
                      consolidated=COMPACTED_KEY in root.attrs, chunks=chunks)
        for r, (g, c) in enumerate(zip(groups, committed, strict=True))
    ]
    parts = [p if len(r) == c else p.isel({schema.DIM_STEP: r}) for p, r, c in zip(parts, rows, committed, strict=True)]
    if chunks is None:
        parts = [_chunk_by_bytes(p, g) for p, g in zip(parts, groups, strict=True)]
    n_examples = sum(p[schema.N_EXAMPLES] for p in parts)
    # The writer's per-step sums (format 3) cover each rank's own examples: the run's are their sums over ranks.
    totals = {name: sum(p[name] for p in parts) for name in schema.PER_STEP_SUMS if all(name in p for p in parts)}
    # Each rank's padding sits inside its own block, so the rank's own n_examples decides which positions are real.
    valid = xr.concat([_leading_positions(p[schema.N_EXAMPLES], p.sizes[schema.DIM_EXAMPLE]) for p in parts],
                      dim=schema.DIM_EXAMPLE)
    # Each rank's flags cover its own examples (the concatenation below would keep rank 0's alone).
    flags = {name: _all_ranks([p[name] for p in parts if name in p], world) for name in _RANK_FLAGS
             if any(name in p for p in parts)}
    parts = [p.drop_vars(list(flags), errors="ignore") for p in parts]
    ds = xr.concat(parts, dim=schema.DIM_EXAMPLE, data_vars="minimal", coords="minimal", compat="override",
                   join="override", combine_attrs="override")
    ds[schema.N_EXAMPLES] = n_examples
    for name, total in {**totals, **flags}.items():
        ds[name] = total
    ds = ds.set_coords([name for name in schema.NON_INDEX_COORDS if name in ds.data_vars])
    ds = ds.assign_coords({VALID: valid})
    ds.attrs = {**root.attrs.asdict(), **groups[0].attrs.asdict(), schema.COMMITTED_KEY: len(rows[0]),
                "stream": stream}
    return ds


def _common_rows(groups: list[zarr.Group], stream: str) -> tuple[list[np.ndarray], list[int]]:
    """Per rank: the rows of the steps every rank committed, and its committed steps.

    Rows are matched by step number, not position: a rank that dropped a step (``on_full="drop"``) or was killed
    holds fewer rows, and pairing rows by position would join one rank's examples of a step with another's of a
    later step. Reads each rank's ``step`` (8 bytes a step).
    """
    committed = [_committed_steps(g, stream) for g in groups]
    steps = [np.asarray(g[schema.STEP][:c]) if c else np.zeros(0, np.int64) for g, c in zip(groups, committed,
                                                                                               strict=True)]
    common = steps[0]
    for s in steps[1:]:
        common = np.intersect1d(common, s)  # (each rank's steps increase: sorted, unique)
    return [np.searchsorted(s, common) for s in steps], committed


def _rank_group(root: zarr.Group, rank: int) -> zarr.Group:
    """The group of one rank's streams in a multi-process store."""
    name = schema.rank_group(rank)
    if name not in root:
        raise StreamNotFoundError(f"multi-process store without the group of rank {rank} ({name})")
    return root[name]


def _leading_positions(n_examples: xr.DataArray, width: int) -> xr.DataArray:
    """``(step, example)`` boolean ``example < n_examples[step]`` over ``width`` positions (lazy if the input is)."""
    position = xr.DataArray(np.arange(width, dtype=np.int64), dims=schema.DIM_EXAMPLE)
    below = n_examples.reset_coords(drop=True) > position
    return below.transpose(schema.DIM_STEP, schema.DIM_EXAMPLE)


def valid_examples(ds: xr.Dataset) -> xr.DataArray:
    """Which ``(step, example)`` positions hold a real example: the one rule every analysis uses for padding.

    A step with fewer examples than the store's ``example`` width is padded at the end, so position ``e`` of step
    ``s`` is real iff ``e < n_examples[s]`` (per rank block in a multi-process store, whose :func:`open_store`
    result carries this mask as the coordinate :data:`VALID`). The metadata values never decide it: ``index``,
    ``label`` and ``true_label`` are −1 at real examples too when ``GradientLogger.record`` was not given them.

    Args:
        ds: A store Dataset (:func:`open_store`), or any Dataset with ``n_examples`` and the store's whole
            ``example`` axis (positions are counted along it, so do not subset ``example`` before analysing).

    Returns:
        Lazy boolean DataArray ``(step, example)`` without coordinates other than ``step``.

    """
    if VALID in ds.coords:
        return ds[VALID].reset_coords(drop=True).astype(bool)
    return _leading_positions(ds[schema.N_EXAMPLES], ds.sizes[schema.DIM_EXAMPLE])


def holds_metadata(ds: xr.Dataset, name: str) -> bool:
    """Whether some real example of ``ds`` has a value ≥ 0 in the per-example variable ``name`` (e.g. ``label``).

    Computes one boolean reduction over ``name`` (a small ``(step, example)`` integer array). A Dataset without
    steps or examples holds nothing to miss and counts as holding it.
    """
    if not (ds.sizes.get(schema.DIM_STEP, 0) and ds.sizes.get(schema.DIM_EXAMPLE, 0)):
        return True
    known = (ds[name].reset_coords(drop=True) >= 0) & valid_examples(ds)
    return bool(known.any().compute())


def _outside_stacklevel() -> int:
    """``stacklevel`` for a warning issued here that points at the first caller outside ``gradcoh.analysis``."""
    frame, level = sys._getframe(1), 1  # the caller of this function (which calls warnings.warn) is level 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("gradcoh.analysis"):
        frame, level = frame.f_back, level + 1
    return level


def warn_missing_metadata(ds: xr.Dataset, name: str, needed_by: str, consequence: str) -> None:
    """Warn (:class:`MissingMetadataWarning`) that ``needed_by`` needs the per-example ``name`` the store lacks.

    The message names the ``GradientLogger`` argument that provides the data (:data:`RECORD_ARGUMENTS`), in
    ``record()`` for the batch stream and ``probe()`` for the probe stream, and what the result looks like instead.

    Args:
        ds: The store Dataset (its ``stream`` attribute picks the method named).
        name: The missing variable (``"label"``, ``"true_label"``, ``"index"``, ...).
        needed_by: What needs it, e.g. ``"m_coherence(by='label')"``.
        consequence: What the result holds instead, e.g. ``"the result has no label subsets"``.

    """
    method = "probe" if ds.attrs.get("stream") == schema.STREAM_PROBE else "record"
    argument = RECORD_ARGUMENTS.get(name, name)
    noun = _NOUNS.get(name, name)
    warnings.warn(
        f"{needed_by} needs per-example {noun}, but this store has none ({name} is -1 for every example): "
        f"pass {argument}= to GradientLogger.{method}() when logging; {consequence}",
        MissingMetadataWarning,
        stacklevel=_outside_stacklevel(),
    )


def _describe_stream(groups: list[zarr.Group], name: str) -> dict[str, Any]:
    """One stream's summary from its group in each rank (one group in a single-process store).

    As :func:`open_store` joins the ranks: the steps every rank committed, ``m`` summed over ranks, the guard's
    flags over every rank (:data:`_RANK_FLAGS`).
    """
    rows, committed = _common_rows(groups, name)

    def read(var: str, dtype: Any = None) -> list[np.ndarray]:
        return [np.asarray(g[var][:c], dtype=dtype)[r] for g, r, c in zip(groups, rows, committed, strict=True)
                if var in g]

    def flags(var: str) -> np.ndarray | None:
        values = read(var, bool)
        return _all_ranks(values, len(groups)) if values else None

    steps = read(schema.STEP)[0].tolist()
    m = np.sum(read(schema.N_EXAMPLES), axis=0).tolist() if steps else []
    group = groups[0]
    return {
        "committed_steps": len(steps),
        "dropped_steps": max(g.attrs.get(schema.DROPPED_KEY, 0) for g in groups),
        "first_step": steps[0] if steps else None,
        "last_step": steps[-1] if steps else None,
        "m_min": min(m) if m else None,
        "m_max": max(m) if m else None,
        "groups": [str(g) for g in group[schema.GROUP_I][:]],
        "has_sketch": schema.SKETCH in group,
        "guard": guard_counts(flags(schema.RECONCILED), flags(schema.GUARD_CHECKED)),
    }


def describe_store(path_or_url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able summary of a store: format, configuration, layers, sketch and per-stream sizes.

    Reads only attributes and the small per-step ``step``/``n_examples``/``reconciled``/``guard_checked`` arrays.

    Args:
        path_or_url: Store directory or fsspec URL.
        storage_options: fsspec options for URLs.

    Returns:
        Dict with ``path, format_version, model, config, sketch, layers, streams, notes, error, versions``.

    Raises:
        FormatError: As :func:`open_root`.

    """
    root = open_root(path_or_url, storage_options)
    attrs = root.attrs.asdict()
    world = _world_size(root)
    ranks = [root] if world == 1 else [_rank_group(root, rank) for rank in range(world)]
    layers = [
        {"name": layer.get("name"), "type": layer.get("type"), "size": layer.get("size")}
        for layer in attrs.get(schema.LAYERS_KEY) or []
    ]
    return {
        "path": os.fspath(path_or_url),
        "format_version": attrs.get(schema.FORMAT_KEY),
        "model": attrs.get(schema.MODEL_KEY),
        "config": attrs.get(schema.CONFIG_KEY),
        "sketch": attrs.get(schema.SKETCH_KEY),
        "layers": layers,
        "streams": {name: _describe_stream([ranks[r][name] for r in range(len(ranks))], name)
                    for name in list_streams(root)},
        "notes": attrs.get(schema.NOTES_KEY) or [],
        "error": attrs.get(schema.ERROR_KEY),
        "versions": attrs.get(schema.VERSIONS_KEY),
    }
