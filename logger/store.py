"""The Zarr v3 store: create / append / overwrite, and chunk-aligned, committed writes of one stream.

Chunking by array, by bytes (format 3): each per-step array gets its own step chunk, as many steps as fit in
``schema.CHUNK_TARGET_BYTES`` (:func:`gradcoh.logger.schema.steps_per_chunk`). A sketch of several MB a step keeps
one or a few steps per chunk; ``n_examples`` (8 bytes a step) holds 65536 steps per chunk, so an analysis reading
the small arrays touches a handful of objects whatever the step count.

Commit protocol (crash consistency): for every batch of steps the stream writer (1) resizes its arrays, (2) writes
the data chunks of every array, and only then (3) advances the stream attribute ``committed_steps``. A process killed
at any moment leaves a store whose first ``committed_steps`` steps are complete; arrays may be longer (their tail
holds fill values or a partial chunk), which readers trim. Only the writer thread holds array handles, so no stale
handle can rewrite metadata.

A chunk that is only partly filled when a batch is committed is written again, whole, by the next commit. Committed
steps inside it are never at risk: the writer keeps the committed rows of every array's last, partly filled chunk in
memory (:attr:`StreamWriter.tails`) and writes the chunk from its first row, so zarr never reads back nor merges into
the old object; the new chunk object replaces the old one whole (LocalStore writes a temporary file and renames it
over the old one, zarr ≥ 3.1.3; object stores replace an object by one PUT). A kill at any point of a rewrite leaves
either the old object (the committed rows, as committed) or the new one (the same committed rows plus uncommitted
ones, which readers trim). ``tests/reliability/test_crash.py`` kills the writer inside such a rewrite.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from . import schema

log = logging.getLogger(__name__)

COMMIT_BYTES = 64 * 2**20
"""The writer commits once this many bytes of steps are buffered (and at least every ``flush_secs``): the rewrite
of the partly filled chunks of small arrays at each commit stays a small fraction of the bytes committed."""


class StoreError(schema.GradcohError, RuntimeError):
    """A store cannot be created, appended to or written."""


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _run_all(coroutines: list) -> list:
    """Run zarr coroutines concurrently in one round trip through zarr's event loop; raise the first error.

    Every coroutine has finished (or failed) when this returns. A synchronous zarr call (``create_array``,
    ``resize``) is one round trip each, its file operations one after another: creating a stream and committing its
    first step took 68 round trips, 28 with the arrays' creations and resizes run together here. The coroutines touch
    different arrays, so their order does not matter to the commit protocol; what must follow them (the chunks, the
    commit marker) is written after this returns.
    """
    async def gather() -> list:
        return await asyncio.gather(*coroutines, return_exceptions=True)

    results = sync(gather())
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results





def open_run(path: str | Path, mode: str, attrs: dict[str, Any], storage_options: dict | None = None, *,
             rank: int = 0, world_size: int = 1, barrier: Any = None) -> RunStore:
    """Open a run's store for writing: the group this process writes and the last step of each stream in it.

    With several processes rank 0 creates (or checks) the run, every rank waits at ``barrier``, then each opens
    its own group ``rank-XXXXX``.

    Args:
        path: Local path or fsspec URL of the store.
        mode: ``"create"``, ``"append"`` or ``"overwrite"``.
        attrs: Root attributes of this run (format, configuration, layers, sketch, versions, model).
        storage_options: fsspec options for URLs (credentials should come from the environment).
        rank: This process's rank.
        world_size: Number of processes.
        barrier: Called between rank 0's creation and the other ranks' opening (``torch.distributed.barrier``).

    Raises:
        StoreError: The store exists in ``"create"`` mode, does not exist in ``"append"`` mode, or differs from
            this run in layers, sketch configuration, seed, number of processes or format version.
    """
    if world_size == 1:
        root = _open_root(path, mode, attrs, storage_options)
    else:
        if rank == 0:
            _open_root(path, mode, attrs, storage_options)
        barrier()
        root = _open_root(path, "append", attrs, storage_options).require_group(schema.rank_group(rank))
    last = {}
    for name in schema.STREAMS:
        if name in root:
            _, step = committed_state(root[name])
            if step is not None:
                last[name] = step
    return RunStore(root, last)


@dataclass
class RunStore:
    """The group one process writes (the root, or its rank's group) and the last committed step per stream."""

    root: zarr.Group
    last_steps: dict[str, int]


def committed_state(group: zarr.Group) -> tuple[int, int | None]:
    """``(committed steps, last committed step or None)`` of a stream group."""
    committed = int(group.attrs.get(schema.COMMITTED_KEY, 0))
    if not committed or schema.STEP not in group:
        return committed, None
    return committed, int(group[schema.STEP][committed - 1])


def _open_root(path: str | Path, mode: str, attrs: dict[str, Any], storage_options: dict | None) -> zarr.Group:
    """The root group for writing according to ``mode`` (see :func:`open_run`)."""
    path = schema.local_path(str(path))
    exists = _exists(path, storage_options)
    if mode == "create" and exists:
        raise StoreError(
            f"{path} already exists; pass mode='append' to continue it or mode='overwrite' to replace it"
        )
    if mode == "append" and not exists:
        raise StoreError(f"{path} does not exist, so there is nothing to append to; use mode='create'")
    if mode == "overwrite" and exists:
        _remove(path, storage_options)
    if mode == "append":
        root = zarr.open_group(path, mode="r+", storage_options=storage_options if schema.is_url(path) else None)
        check_compatible(path, dict(root.attrs), attrs)
        return root
    # The attributes go into the group's first zarr.json: a crash never leaves a root without them.
    return zarr.open_group(
        path, mode="w-", zarr_format=3, attributes=attrs,
        storage_options=storage_options if schema.is_url(path) else None,
    )


_IDENTITY_ADDED = {"alignment": False, "reference": False}
"""Identity fields added after the first stores were written, and the value those stores implicitly had."""


def check_compatible(path: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse to append a run whose configuration differs from the store's."""
    if schema.COMPACTED_KEY in old:
        raise StoreError(f"{path} is a compacted (sharded, finished) store and cannot be appended to; append to "
                         "the original store or start a new one")
    version = old.get(schema.FORMAT_KEY)
    if version is None:
        raise StoreError(f"{path} is not a gradcoh store (no {schema.FORMAT_KEY!r} attribute); cannot append")
    if version not in schema.APPENDABLE_FORMATS:
        raise StoreError(f"{path}: format version {version!r}; this gradcoh appends to formats "
                         f"{', '.join(map(str, schema.APPENDABLE_FORMATS))} only; cannot append")
    old_layers = [(x["name"], x["shapes"]) for x in old.get(schema.LAYERS_KEY, [])]
    new_layers = [(x["name"], x["shapes"]) for x in new[schema.LAYERS_KEY]]
    if old_layers != new_layers:
        raise StoreError(f"{path}: the model's layers differ from the store's (names or shapes); cannot append")
    old_world, new_world = old.get(schema.WORLD_SIZE_KEY, 1), new.get(schema.WORLD_SIZE_KEY, 1)
    if old_world != new_world:
        raise StoreError(f"{path} was written by {old_world} process(es), this run has {new_world}; cannot append "
                         "(the example axis is laid out per rank)")
    old_id = old.get(schema.CONFIG_KEY, {}).get(schema.IDENTITY_KEY, {})
    new_id = new[schema.CONFIG_KEY][schema.IDENTITY_KEY]
    for key, value in new_id.items():
        stored = old_id.get(key, _IDENTITY_ADDED.get(key))
        if stored != value:
            raise StoreError(f"{path}: {key}={value!r} differs from the store's {stored!r}; cannot append")


def _exists(path: str, storage_options: dict | None) -> bool:
    if schema.is_url(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        return fs.exists(root)
    p = Path(path)
    if p.is_dir() and not (p / "zarr.json").exists():
        leftovers = list(p.iterdir())
        if all(x.is_file() and x.name.endswith(".partial") for x in leftovers):
            # An empty folder, or what a writer killed while creating the store left: nothing was ever stored.
            for x in leftovers:
                x.unlink(missing_ok=True)
            p.rmdir()
            return False
    return p.exists()


def _remove(path: str, storage_options: dict | None) -> None:
    if schema.is_url(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        fs.rm(root, recursive=True)
    else:
        shutil.rmtree(path)


@dataclass
class HostRecord:
    """One logged step on the host, ready to write. Arrays are NumPy; ``sketch`` is None without sketches."""

    step: int
    wall_time: float
    sq_norm: np.ndarray  # [n, L] float64
    sum_sq_norm: np.ndarray  # [L] float64
    group_gram: np.ndarray  # [L, G, G] float64
    index: np.ndarray  # [n] int64
    label: np.ndarray  # [n] int64
    true_label: np.ndarray  # [n] int64
    group: np.ndarray  # [n] int64
    loss: np.ndarray  # [n] float32
    finite: np.ndarray  # [L] bool
    sketch: np.ndarray | None  # [n, L, k]
    reconciled: np.ndarray | None = None  # [L] bool; None: every layer reconciled
    guard_checked: np.ndarray | None = None  # [L] bool; None: no layer checked by the guard
    alignment: np.ndarray | None = None  # [n, L] float64, with alignment=True
    ref_alignment: np.ndarray | None = None  # [n, L] float64, with a reference set
    ref_sq_norm: np.ndarray | None = None  # [L] float64, with a reference set
    ref_step: int | None = None  # step the reference gradient was computed at

    @property
    def n(self) -> int:
        """Examples in this step."""
        return self.sq_norm.shape[0]


class StreamWriter:
    """Owns the arrays of one stream and appends whole, committed batches of steps. Writer thread only."""

    def __init__(self, root: zarr.Group, name: str, layers: list[dict], groups: tuple[str, ...],
                 sketch_dim: int, sketch_dtype: str, optional: tuple[str, ...] = ()) -> None:
        self.root = root
        self.name = name
        self.layers = layers
        self.groups = groups
        self.sketch_dim = sketch_dim
        self.sketch_dtype = sketch_dtype
        self.optional = set(optional) | ({schema.SKETCH} if sketch_dim else set())
        self.group: zarr.Group | None = None
        self.arrays: dict[str, zarr.Array] = {}
        self.tails: dict[str, np.ndarray] = {}
        """Per array: the committed rows of its last, partly filled chunk (rewritten whole at the next commit)."""
        self.committed = 0
        self.dropped = 0
        self.last_step: int | None = None
        self.width = 0
        if name in root:
            self._reopen()

    def _reopen(self) -> None:
        """Continue an existing stream: trim arrays back to the committed steps (repairs a crashed tail)."""
        group = self.root[self.name]
        attrs = dict(group.attrs)
        committed = int(attrs.get(schema.COMMITTED_KEY, 0))
        arrays = {k: group[k] for k in schema.VARIABLES if k in group}
        if committed == 0 and schema.COORDINATES_KEY not in attrs:  # (the last attribute ``_create`` writes)
            # Killed while the stream was being created: nothing was committed, start it afresh.
            log.warning("stream '%s' was left half-created by a crash; recreating it", self.name)
            del self.root[self.name]
            self.dropped = int(attrs.get(schema.DROPPED_KEY, 0))
            return
        self.group = group
        self.committed = committed
        self.dropped = int(attrs.get(schema.DROPPED_KEY, 0))
        self.arrays = arrays
        if schema.GUARD_CHECKED not in arrays and schema.RECONCILED in arrays:
            # A stream of format 2 or 3: add the variable; the steps stored before read False (not known checked).
            like = arrays[schema.RECONCILED]
            arrays[schema.GUARD_CHECKED] = group.create_array(
                schema.GUARD_CHECKED, shape=(committed, like.shape[1]), chunks=like.chunks, dtype="bool",
                dimension_names=schema.VARIABLES[schema.GUARD_CHECKED][0], fill_value=False,
                compressors=_compressor(), config={"write_empty_chunks": True})
        for arr in self.arrays.values():
            if arr.shape[0] != self.committed:
                arr.resize((self.committed, *arr.shape[1:]))
        self.width = self.arrays[schema.INDEX].shape[1]
        _, self.last_step = committed_state(group)
        for name, arr in self.arrays.items():
            self.tails[name] = np.asarray(arr[self.committed - self.committed % arr.chunks[0] : self.committed])

    def _create(self, width: int) -> None:
        # The commit marker exists from the group's first zarr.json on, so readers never meet a stream without it.
        g = self.root.create_group(self.name, attributes={schema.COMMITTED_KEY: 0, schema.DROPPED_KEY: self.dropped})
        self.width = width
        n_layers, n_groups = len(self.layers), len(self.groups)
        sizes = {
            schema.DIM_EXAMPLE: width,
            schema.DIM_LAYER: n_layers,
            schema.DIM_GROUP_I: n_groups,
            schema.DIM_GROUP_J: n_groups,
            schema.DIM_PROJ: self.sketch_dim,
        }
        variables = {k: v for k, v in schema.VARIABLES.items() if k not in schema.OPTIONAL or k in self.optional}
        coroutines, names = [], []
        group = g._async_group  # (zarr.Group's asynchronous half: every array below in one round trip)
        for name, (dims, dtype) in variables.items():
            np_dtype = _np_dtype(name, dtype, self.sketch_dtype)
            shape = (0, *(sizes[d] for d in dims[1:]))
            chunks = (schema.steps_per_chunk(_step_bytes(dims, np_dtype, sizes)), *(sizes[d] for d in dims[1:]))
            filters = None
            if name == schema.SKETCH and self.sketch_dtype == "bfloat16":
                from zarr.codecs.numcodecs import BitRound

                filters = [BitRound(keepbits=7)]
            coroutines.append(group.create_array(
                name, shape=shape, chunks=chunks, dtype=np_dtype, dimension_names=dims,
                fill_value=schema.FILL_VALUES[dtype if name != schema.SKETCH else "float32"],
                compressors=_compressor(), filters=filters, config={"write_empty_chunks": True},
            ))
            names.append(name)
            self.tails[name] = np.empty((0, *shape[1:]), dtype=np_dtype)
        coords = {
            schema.LAYER: np.array([x["name"] for x in self.layers], dtype=str),
            schema.LAYER_SIZE: np.array([x["size"] for x in self.layers], dtype=np.int64),
            schema.GROUP_I: np.array(self.groups, dtype=str),
            schema.GROUP_J: np.array(self.groups, dtype=str),
        }
        coroutines += [_create_filled(group, name, values) for name, values in coords.items()]
        created = _run_all(coroutines)
        self.arrays = {name: zarr.Array(arr) for name, arr in zip(names, created[: len(names)], strict=True)}
        # The last attribute written: a stream without it was killed while being created (see ``_reopen``).
        g.attrs.update({schema.COMMITTED_KEY: 0, schema.DROPPED_KEY: 0,
                        schema.COORDINATES_KEY: " ".join(n for n in schema.NON_INDEX_COORDS
                                                         if n != schema.LAYER_SIZE and n in variables)})
        self.group = g

    def ensure_created(self, records: list[HostRecord]) -> int:
        """Create the stream (sized for ``records``) if it does not exist yet; returns the bytes of one step."""
        if self.group is None:
            self._create(max(r.n for r in records))
        return sum(arr.dtype.itemsize * math.prod(arr.shape[1:]) for arr in self.arrays.values())

    def write(self, records: list[HostRecord], dropped: int = 0) -> None:
        """Append ``records`` (steps in increasing order) and commit them.

        Raises:
            StoreError: A step is not greater than the last stored one.
        """
        if not records:
            if dropped:
                self.dropped += dropped
                if self.group is not None:
                    self.group.attrs[schema.DROPPED_KEY] = self.dropped
            return
        self._check_present()
        width = max(r.n for r in records)
        if self.group is None:
            self._create(width)
        elif width > self.width:
            self._widen(width)
        for r in records:
            if self.last_step is not None and r.step <= self.last_step:
                raise StoreError(f"step {r.step} is not after the last stored step {self.last_step} "
                                 f"in stream '{self.name}'; steps must keep increasing")
            self.last_step = r.step
        stop = self.committed + len(records)
        # Metadata first, every array's in one round trip; then the chunks, one array after another (written
        # together, the arrays' chunk buffers, up to CHUNK_TARGET_BYTES each, would be encoded at once: more memory
        # and more CPU than one at a time).
        _run_all([arr.async_array.resize((stop, *arr.shape[1:])) for arr in self.arrays.values()])
        for name, arr in self.arrays.items():
            rows = _stack(name, records, self.width, arr.dtype, len(self.groups))
            self.tails[name] = _write_from_chunk_start(arr, self.tails[name], rows, stop)
        self.committed = stop
        self.dropped += dropped
        # The commit marker goes last: readers see a step only once all its chunks are written.
        self.group.attrs.update({schema.COMMITTED_KEY: self.committed, schema.DROPPED_KEY: self.dropped})

    def _check_present(self) -> None:
        """Refuse to write into a local store whose directory vanished (zarr would silently recreate the folders)."""
        store = self.root.store
        root = getattr(store, "root", None)
        if isinstance(store, zarr.storage.LocalStore) and not (Path(root) / "zarr.json").exists():
            raise StoreError(f"the store directory {root} vanished (deleted or moved while logging)")

    def _widen(self, width: int) -> None:
        chunk = self.arrays[schema.INDEX].chunks[1]
        new = int(math.ceil(width / chunk) * chunk)
        for arr in self.arrays.values():
            dims = arr.metadata.dimension_names
            if schema.DIM_EXAMPLE in dims:
                shape = list(arr.shape)
                axis = dims.index(schema.DIM_EXAMPLE)
                shape[axis] = new
                arr.resize(tuple(shape))
                tail = self.tails[arr.basename]
                pad = [(0, 0)] * tail.ndim
                pad[axis] = (0, new - tail.shape[axis])
                fill = schema.FILL_VALUES["float32" if arr.basename == schema.SKETCH else
                                          schema.VARIABLES[arr.basename][1]]
                self.tails[arr.basename] = np.pad(tail, pad, constant_values=fill)
        self.width = new

    def record_error(self, message: str) -> None:
        """Note in the root attributes why logging stopped (best effort)."""
        try:
            self._check_present()  # never recreate a deleted store just to note why it failed
            self.root.attrs[schema.ERROR_KEY] = message
        except Exception:
            log.debug("could not record the error in the store", exc_info=True)


def _write_from_chunk_start(arr: zarr.Array, tail: np.ndarray, new: np.ndarray, stop: int) -> np.ndarray:
    """Write ``new`` into ``arr`` (already resized to ``stop`` steps) from the first row of its partly filled chunk.

    ``tail`` holds the committed rows of ``arr``'s last, partly filled chunk. Writing from that chunk's first row to
    the end of the array makes every touched chunk complete within the array's bounds, so zarr writes each chunk
    object whole without reading the old one (a kill leaves the old object or the new, never a mix). Returns the
    rows of the new last, partly filled chunk (empty when ``stop`` falls on a chunk boundary).
    """
    per = arr.chunks[0]
    start = stop - len(new) - len(tail)
    block = np.concatenate([tail, new]) if len(tail) else new
    arr[start:stop] = block
    return block[len(block) - stop % per :].copy() if stop % per else block[:0].copy()


async def _create_filled(group: Any, name: str, values: np.ndarray) -> Any:
    """Create a static coordinate array of ``group`` (a ``zarr.AsyncGroup``) and write its values."""
    dtype = str if values.dtype.kind == "U" else values.dtype  # variable-length UTF-8 strings
    arr = await group.create_array(name, shape=values.shape, dtype=dtype,
                                   dimension_names=schema.STATIC_COORDS[name])
    await arr.setitem(slice(None), values)
    return arr


def _np_dtype(name: str, dtype: str, sketch_dtype: str) -> str:
    if name == schema.SKETCH:
        return "float16" if sketch_dtype == "float16" else "float32"
    return dtype


def _step_bytes(dims: tuple[str, ...], dtype: str, sizes: dict[str, int]) -> int:
    out = np.dtype(dtype).itemsize
    for d in dims[1:]:
        out *= sizes[d]
    return out


_FIELDS = {
    schema.STEP: "step", schema.WALL_TIME: "wall_time", schema.N_EXAMPLES: "n", schema.SQ_NORM: "sq_norm",
    schema.SUM_SQ_NORM: "sum_sq_norm", schema.GROUP_GRAM: "group_gram", schema.INDEX: "index",
    schema.LABEL: "label", schema.TRUE_LABEL: "true_label", schema.GROUP: "group", schema.LOSS: "loss",
    schema.FINITE: "finite", schema.RECONCILED: "reconciled", schema.GUARD_CHECKED: "guard_checked",
    schema.SKETCH: "sketch",
    schema.ALIGNMENT: "alignment", schema.REF_ALIGNMENT: "ref_alignment", schema.REF_SQ_NORM: "ref_sq_norm",
    schema.REF_STEP: "ref_step",
}


def _group_sums(r: HostRecord, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ_{i∈a} sq_norm[i, l] as [L, G], examples per group [G])`` of one step (group −1: in no group)."""
    onehot = (np.asarray(r.group)[:, None] == np.arange(n_groups)[None, :])
    return (np.asarray(r.sq_norm).T @ onehot.astype(np.float64)), onehot.sum(0)


_SUMS = {
    schema.SQ_NORM_TOTAL: lambda r, n_groups: np.asarray(r.sq_norm).sum(0),
    schema.GROUP_SQ_NORM: lambda r, n_groups: _group_sums(r, n_groups)[0],
    schema.GROUP_COUNT: lambda r, n_groups: _group_sums(r, n_groups)[1],
}
"""The per-step sums (``schema.PER_STEP_SUMS``): name → function of one record and the number of groups."""


def _stack(name: str, records: list[HostRecord], width: int, dtype: np.dtype, n_groups: int) -> np.ndarray:
    """Stack one variable over steps, padding the example axis to ``width``."""
    if name in _SUMS:
        return np.stack([_SUMS[name](r, n_groups) for r in records]).astype(dtype, copy=False)
    absent = np.zeros_like if name == schema.GUARD_CHECKED else np.ones_like  # never claim a check not made
    values = [np.asarray(getattr(r, _FIELDS[name])) if getattr(r, _FIELDS[name]) is not None
              else absent(r.finite) for r in records]
    if schema.DIM_EXAMPLE not in schema.VARIABLES[name][0]:
        return np.stack(values).astype(dtype, copy=False)
    fill = schema.FILL_VALUES["float32" if name == schema.SKETCH else schema.VARIABLES[name][1]]
    out = np.full((len(values), width, *values[0].shape[1:]), fill, dtype=dtype)
    for i, v in enumerate(values):
        out[i, : v.shape[0]] = v
    return out



# --- repair and verification (``gradcoh repair``) ----------------------------------------------------------
def _local_root(path: str) -> Path | None:
    path = schema.local_path(path)
    return None if schema.is_url(path) else Path(path)


def find_partial_files(path: str | Path) -> list[Path]:
    """Temporary ``*.partial`` files that a killed writer left behind in a local store (none for URLs)."""
    root = _local_root(str(path))
    if root is None or not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*.partial") if p.is_file())


def scan_chunks(root: zarr.Group, streams: tuple[str, ...] | None = None,
                tally: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Decode every committed chunk of every per-step variable; report the ones that cannot be read.

    Args:
        root: The store's root group.
        streams: Streams to scan (default: every group).
        tally: Filled with what was read: ``{"streams", "variables", "chunks", "steps"}``.

    Returns:
        One entry per unreadable chunk: ``{stream, variable, rows: [first, last], steps: [first, last] | None,
        error}``. ``rows`` are positions along ``step``; ``steps`` are the logged step numbers when readable.
    """
    bad: list[dict[str, Any]] = []
    tally = {} if tally is None else tally
    for key in ("streams", "variables", "chunks", "steps"):
        tally.setdefault(key, 0)
    for name in streams or tuple(n for n, _ in root.groups()):
        if name in root and isinstance(root[name].attrs.get(schema.COMMITTED_KEY), int):
            _scan_stream(name, root[name], bad, tally)
    return bad


def _scan_stream(name: str, group: zarr.Group, bad: list[dict[str, Any]], tally: dict[str, int]) -> None:
    committed = group.attrs[schema.COMMITTED_KEY]
    try:
        steps = np.asarray(group[schema.STEP][:committed])
    except Exception:  # the step variable itself is damaged: report rows only
        steps = None
    tally["streams"] += 1
    tally["steps"] += committed
    for var in (v for v in schema.VARIABLES if v in group):
        arr = group[var]
        tally["variables"] += 1
        per = arr.chunks[0]
        for start in range(0, committed, per):
            stop = min(start + per, committed)
            tally["chunks"] += 1
            try:
                arr[start:stop]
            except Exception as err:
                bad.append({
                    "stream": name, "variable": var, "rows": [start, stop - 1],
                    "steps": None if steps is None else [int(steps[start]), int(steps[stop - 1])],
                    "error": f"{type(err).__name__}: {err}",
                })


def describe_bad_chunks(bad: list[dict[str, Any]]) -> str:
    """One line naming the damaged variables and their steps."""
    parts = []
    for b in bad:
        where = (f"steps {b['steps'][0]}..{b['steps'][1]}" if b["steps"] else f"rows {b['rows'][0]}..{b['rows'][1]}")
        parts.append(f"{b['stream']}/{b['variable']} {where}")
    return "corrupted chunk(s): " + "; ".join(parts)


def repair_store(path: str | Path, *, dry_run: bool = False, check: bool = False,
                 storage_options: dict | None = None) -> dict[str, Any]:
    """Bring a store left by a killed writer back to its committed state. Run it only while no writer is active.

    Trims every stream's arrays to the stream's ``committed_steps`` (deleting the chunks beyond), removes streams
    that were being created when the writer died (nothing committed), and deletes orphaned ``*.partial`` files.
    With ``check`` it also decodes every committed chunk and reports the unreadable ones (it cannot fix them).

    Returns:
        ``{"actions": [str], "corrupted": [dict], "checked": {"streams", "variables", "chunks", "steps"}}`` (the
        last empty without ``check``); with ``dry_run`` the actions are what would be done.

    Raises:
        StoreError: ``path`` is not a gradcoh store.
    """
    text = str(path)
    root = _open_for_repair(text, dry_run, storage_options)
    actions: list[str] = []
    for name, group in list(root.groups()):
        actions += _repair_stream(root, name, group, dry_run)
    for partial in find_partial_files(text):
        actions.append(f"delete orphaned temporary file {partial}")
        if not dry_run:
            partial.unlink(missing_ok=True)
    checked: dict[str, int] = {}
    corrupted = scan_chunks(root, tally=checked) if check else []
    return {"actions": actions, "corrupted": corrupted, "checked": checked}


def _open_for_repair(text: str, dry_run: bool, storage_options: dict | None) -> zarr.Group:
    local = _local_root(text)
    if local is not None and not local.exists():
        raise StoreError(f"no such store: {text}")
    opts = storage_options if schema.is_url(text) else None
    try:
        root = zarr.open_group(str(local) if local is not None else text, mode="r" if dry_run else "r+",
                               storage_options=opts, use_consolidated=False)
    except Exception as err:
        raise StoreError(f"{text} is not a zarr store ({type(err).__name__}: {err})") from err
    version = root.attrs.get(schema.FORMAT_KEY)
    if version is None:
        raise StoreError(f"{text} is a zarr group but not a gradcoh store (no {schema.FORMAT_KEY!r})")
    if not isinstance(version, int) or not schema.OLDEST_READABLE_FORMAT <= version <= schema.FORMAT_VERSION:
        raise StoreError(f"{text}: format version {version!r}; this gradcoh repairs formats "
                         f"{schema.OLDEST_READABLE_FORMAT}..{schema.FORMAT_VERSION}")
    return root


def _repair_stream(root: zarr.Group, name: str, group: zarr.Group, dry_run: bool) -> list[str]:
    """Trim one stream to its committed steps, or delete it when it was never committed."""
    committed = group.attrs.get(schema.COMMITTED_KEY)
    half_created = committed == 0 and schema.COORDINATES_KEY not in group.attrs
    if not isinstance(committed, int) or committed < 0 or half_created:
        if not dry_run:
            del root[name]
        return [f"delete stream '{name}': created by a writer that died before committing anything"]
    actions = []
    for var in (v for v in schema.VARIABLES if v in group):
        arr = group[var]
        if arr.shape[0] != committed:
            actions.append(f"trim {name}/{var} from {arr.shape[0]} to {committed} steps")
            if not dry_run:
                arr.resize((committed, *arr.shape[1:]))
    return actions
