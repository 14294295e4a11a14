"""Offline compaction of a finished store: sharded arrays (fewer, larger objects) and consolidated metadata.

While a run is logging, the writer appends whole chunks and never shards: zarr cannot write part of a shard in
place, and concurrent partial shard writes lose data (the zarr user guide, "Sharding": a full shard must be written
in one go, https://zarr.readthedocs.io/en/stable/user-guide/arrays/#sharding). Once a run is finished,
:func:`compact_store` rewrites it into a new store where each array of a stream is sharded along ``step``:

* each array is rechunked by its own size: inner chunks (the unit of reading) follow the writer's rule of a few MB
  (:func:`gradcoh.logger.schema.steps_per_chunk`), shards (the unit of writing, one object each) hold about
  ``shard_bytes`` of that array, so a small array such as ``n_examples`` is one object for the whole run while the
  sketch has many; the marker's ``shard_steps`` is the smallest shard of each stream (its largest array's);
* every shard is written **whole, once, by one task** (a Dask task per shard, so compaction runs on a cluster too);
* only the committed steps are copied (a crashed tail is dropped), attributes are copied verbatim, each stream's
  ``committed_steps`` is written after its data, and metadata is consolidated last (consolidated metadata is for
  hierarchies that no longer change: https://zarr.readthedocs.io/en/stable/user-guide/consolidated_metadata/);
* afterwards every value of every array is compared with the source (NaN equal to NaN), shard by shard.

The root attribute :data:`COMPACTED_KEY` marks a compacted store: :func:`~gradcoh.analysis.open_store` then reads the
consolidated metadata and uses the shard as its Dask chunk. A compacted store is final: do not append to it with the
logger (appending writes partial shards).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import numpy as np
import zarr
from gradcoh.analysis.io import COMPACTED_KEY, make_store, open_root
from gradcoh.logger import schema

log = logging.getLogger(__name__)

__all__ = ["COMPACTED_KEY", "DEFAULT_SHARD_BYTES", "CompactionError", "compact_store", "count_objects"]

DEFAULT_SHARD_BYTES = 128 * 2**20
"""Target uncompressed size of one shard of a stream's largest array (Dask guidance: ~100 MB per task)."""


class CompactionError(schema.GradcohError, RuntimeError):
    """The compacted copy differs from the source, or the destination cannot be written."""


def _filesystem(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def _exists(path_or_url: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> bool:
    text = os.fspath(path_or_url)
    if not schema.is_url(text):
        return Path(schema.local_path(text)).exists()
    fs, root = _filesystem(text, storage_options)
    return fs.exists(root)


def count_objects(path_or_url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> int:
    """Number of objects (files) under a store: what compaction reduces."""
    text = os.fspath(path_or_url)
    if not schema.is_url(text):
        return sum(len(files) for _, _, files in os.walk(schema.local_path(text)))
    fs, root = _filesystem(text, storage_options)
    return len(fs.find(root))


def _step_arrays(group: zarr.Group) -> dict[str, zarr.Array]:
    out = {}
    for name, arr in group.arrays():
        dims = arr.metadata.dimension_names or ()
        if dims and dims[0] == schema.DIM_STEP:
            out[name] = arr
    return out


def _layout(arr: zarr.Array, committed: int, shard_bytes: int) -> tuple[int, int]:
    """``(steps per inner chunk, steps per shard)`` of one per-step array, from its own bytes a step.

    The inner chunk follows the writer's rule (:func:`gradcoh.logger.schema.steps_per_chunk`: a few MB, so one step
    of a large sketch but thousands of steps of ``n_examples``), whatever the source's chunks (older stores chunked
    every array like the largest); the shard is a whole number of inner chunks of about ``shard_bytes``, never
    longer than the data.
    """
    step_bytes = arr.dtype.itemsize * math.prod(arr.shape[1:])
    inner = min(schema.steps_per_chunk(step_bytes), max(1, committed))
    n_chunks = max(1, shard_bytes // max(step_bytes * inner, 1))
    needed = max(1, math.ceil(committed / inner))
    return inner, inner * min(n_chunks, needed)


def _create_like(group: zarr.Group, name: str, src: zarr.Array, shape: tuple[int, ...], shards: Any,
                 chunks: tuple[int, ...] | None = None) -> zarr.Array:
    return group.create_array(
        name,
        shape=shape,
        dtype=src.dtype,
        chunks=chunks or src.chunks,
        shards=shards,
        filters=src.filters or None,
        compressors=src.compressors or None,
        fill_value=src.fill_value,
        dimension_names=src.metadata.dimension_names,
        attributes=src.attrs.asdict(),
        config={"write_empty_chunks": True},
    )


def _copy_shard(src: zarr.Array, dst: zarr.Array, start: int, stop: int) -> int:
    """Write one whole shard (one object) of ``dst`` from ``src``; returns the bytes copied."""
    block = src[start:stop]
    dst[start:stop] = block
    return int(block.nbytes)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _compare_shard(src: zarr.Array, dst: zarr.Array, start: int, stop: int) -> bool:
    return _same(np.asarray(src[start:stop]), np.asarray(dst[start:stop]))


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _run(tasks: list[Any], progress: bool) -> list[Any]:
    from gradcoh.analysis.cluster import compute

    if not tasks:
        return []
    return list(compute({str(i): t for i, t in enumerate(tasks)}, progress=progress).values())


@dataclass
class _Plan:
    copies: list[Any] = field(default_factory=list)  # one delayed whole-shard copy per shard
    checks: list[Any] = field(default_factory=list)  # one delayed comparison per shard / static array
    pairs: list[tuple[str, str, int | None, int | None]] = field(default_factory=list)  # (group, array, start, stop)
    shard_steps: dict[str, int] = field(default_factory=dict)  # stream group path → steps per shard
    stream_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)


def _plan_group(group: zarr.Group, out: zarr.Group, path: str, plan: _Plan, shard_bytes: int) -> None:
    """Create ``out``'s arrays and subgroups like ``group``'s; streams (groups with ``committed_steps``) are sharded.

    Recursive, so multi-process stores (``rank-XXXXX/batch``) are compacted like single-process ones.
    """
    attrs = group.attrs.asdict()
    is_stream = schema.COMMITTED_KEY in attrs
    committed = int(attrs.get(schema.COMMITTED_KEY, 0))
    step_arrays = _step_arrays(group) if is_stream else {}
    layouts = {name: _layout(arr, committed, shard_bytes) for name, arr in step_arrays.items()}
    if is_stream:
        plan.shard_steps[path] = min((steps for _, steps in layouts.values()), default=0)
        plan.stream_attrs[path] = attrs
    for name, arr in group.arrays():
        if name in step_arrays:
            inner, steps = layouts[name]
            new = _create_like(out, name, arr, (committed, *arr.shape[1:]), (steps, *arr.shape[1:]),
                               (inner, *arr.chunks[1:]))
            for start, stop in _ranges(committed, steps):
                plan.copies.append(dask.delayed(_copy_shard, pure=False)(arr, new, start, stop))
                plan.checks.append(dask.delayed(_compare_shard, pure=False)(arr, new, start, stop))
                plan.pairs.append((path, name, start, stop))
        else:  # static coordinates and anything outside a stream: small, copied as they are
            new = _create_like(out, name, arr, arr.shape, None)
            new[...] = arr[...]
            plan.checks.append(dask.delayed(_compare_shard, pure=False)(arr, new, 0, arr.shape[0] if arr.ndim else 1))
            plan.pairs.append((path, name, None, None))
    for name, child in group.groups():
        child_attrs = child.attrs.asdict()
        if schema.COMMITTED_KEY in child_attrs:  # the commit marker is written after the data
            child_attrs[schema.COMMITTED_KEY] = 0
        _plan_group(child, out.create_group(name, attributes=child_attrs), f"{path}/{name}".lstrip("/"), plan,
                    shard_bytes)


def compact_store(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    dst_storage_options: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Rewrite a finished store ``src`` into ``dst`` with sharded arrays and consolidated metadata.

    Runs on the active Dask scheduler (one task per shard): on a ``distributed`` cluster every worker must reach
    both stores.

    Args:
        src: Source store path or fsspec URL.
        dst: Destination path or URL (must not exist unless ``overwrite``; never the source).
        storage_options: fsspec options for ``src``.
        dst_storage_options: fsspec options for ``dst`` (default: ``storage_options`` when ``dst`` is a URL).
        shard_bytes: Target uncompressed size of the largest array's shard.
        overwrite: Replace an existing ``dst``.
        verify: Compare every value of every array (and all attributes) after writing.
        progress: Progress bar on stderr.

    Returns:
        A summary: ``{"src", "dst", "shard_steps", "arrays", "bytes", "objects_before", "objects_after",
        "verified"}``.

    Raises:
        FormatError: ``src`` is not a readable gradcoh store.
        FileExistsError: ``dst`` exists and ``overwrite`` is False.
        CompactionError: A value or attribute of ``dst`` differs from ``src``.

    """
    if schema.local_path(os.fspath(src)).rstrip("/") == schema.local_path(os.fspath(dst)).rstrip("/"):
        raise ValueError("compact into a new store: dst must differ from src")
    if dst_storage_options is None and schema.is_url(os.fspath(dst)):
        dst_storage_options = storage_options
    root = open_root(src, storage_options)
    if _exists(dst, dst_storage_options) and not overwrite:
        raise FileExistsError(f"{os.fspath(dst)!r} already exists; pass overwrite=True (--overwrite) to replace it")
    out_store = make_store(dst, dst_storage_options, read_only=False)
    root_attrs = root.attrs.asdict()
    out = zarr.create_group(out_store, zarr_format=3, overwrite=True, attributes={})
    plan = _Plan()
    _plan_group(root, out, "", plan, shard_bytes)
    copied = sum(_run(plan.copies, progress))
    for path, attrs in plan.stream_attrs.items():  # the commit marker goes after the data, as in the writer
        out[path].attrs.update(attrs)
    marker = {schema.SHARD_STEPS_KEY: plan.shard_steps, schema.SHARD_BYTES_KEY: int(shard_bytes)}
    out.attrs.update({**root_attrs, COMPACTED_KEY: marker})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(out_store)
    summary = {
        "src": os.fspath(src),
        "dst": os.fspath(dst),
        "shard_steps": plan.shard_steps,
        "arrays": len({(path, name) for path, name, _, _ in plan.pairs}),
        "bytes": copied,
        "verified": False,
    }
    if verify:
        _verify(root, dst, dst_storage_options, plan, progress)
        summary["verified"] = True
    summary["objects_before"] = count_objects(src, storage_options)
    summary["objects_after"] = count_objects(dst, dst_storage_options)
    log.info("compacted %s → %s: %s", src, dst, summary)
    return summary


def _verify(root: zarr.Group, dst: Any, options: Any, plan: _Plan, progress: bool) -> None:
    bad = [pair for pair, ok in zip(plan.pairs, _run(plan.checks, progress), strict=True) if not ok]
    if bad:
        raise CompactionError(f"compacted store differs from the source in {len(bad)} block(s), first {bad[0]}")
    new_root = open_root(dst, options)  # reopen through the read path, consolidated metadata included
    new_attrs = new_root.attrs.asdict()
    new_attrs.pop(COMPACTED_KEY, None)
    if new_attrs != root.attrs.asdict():
        raise CompactionError("root attributes differ after compaction")
    for path, _ in root.groups():
        _compare_group_attrs(root[path], new_root[path], path)


def _compare_group_attrs(old: zarr.Group, new: zarr.Group, path: str) -> None:
    if new.attrs.asdict() != old.attrs.asdict():
        raise CompactionError(f"attributes of group {path!r} differ after compaction")
    for name, child in old.groups():
        _compare_group_attrs(child, new[name], f"{path}/{name}")
