"""The daemon writer: a bounded queue and one background thread that owns the store's array handles.

Modelled on TensorBoard's ``_AsyncWriter``, with its known failure modes designed out: the producer never deadlocks on a
dead consumer (errors are stored and re-raised at the next ``put``/``flush``/``close``), the policy on a full queue is
explicit (``"block"`` or ``"drop"``, dropped steps counted in the store), steps are buffered
until :data:`~gradcoh.logger.store.COMMIT_BYTES` are pending and committed at least every ``flush_secs``,
and ``close`` is idempotent and registered with ``atexit``.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable

from .schema import GradcohError
from .store import COMMIT_BYTES, HostRecord, StreamWriter

log = logging.getLogger(__name__)

_FLUSH = object()
_CLOSE = object()


def _at_exit(fn: Callable[[], None]) -> None:
    """Run ``fn`` at interpreter exit *before* thread pools shut down (zarr writes through one).

    ``atexit`` callbacks run after ``concurrent.futures`` has stopped its executors, too late to write; threading's
    exit hooks (the mechanism ``concurrent.futures`` itself uses) run before, in reverse order of registration.
    """
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise AttributeError
        register(fn)
    except (AttributeError, RuntimeError):
        atexit.register(fn)
    else:
        atexit.register(fn)  # also run by atexit when threading's hooks are not (idempotent)


class WriterError(GradcohError, RuntimeError):
    """The background writer failed; the message names the store and the cause."""


class AsyncWriter:
    """Moves :class:`HostRecord` objects from the training thread into stream writers on a background thread.

    Args:
        streams: Factory ``name -> StreamWriter``, called on the writer thread the first time a stream is used.
        where: The store's path, for error messages.
        queue_size: Maximum queued steps.
        on_full: ``"block"`` (wait) or ``"drop"`` (drop the step and count it).
        flush_secs: Commit buffered steps at least this often.
    """

    def __init__(self, streams: Callable[[str], StreamWriter], where: str, queue_size: int = 16,
                 on_full: str = "block", flush_secs: float = 10.0) -> None:
        self._make_stream = streams
        self._where = where
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._on_full = on_full
        self._flush_secs = flush_secs
        self._streams: dict[str, StreamWriter] = {}
        self._pending: dict[str, list[HostRecord]] = {}
        self._dropped: dict[str, int] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gradcoh-writer", daemon=True)
        self._thread.start()
        _at_exit(self.close)

    # --- training thread ---------------------------------------------------------------------------------
    def put(self, stream: str, record: HostRecord) -> None:
        """Queue one step for ``stream``; raises the writer's error if it failed."""
        self.raise_if_failed()
        if self._closed:
            raise WriterError(f"{self._where}: the writer is closed")
        self._raise_if_dead()
        if self._on_full == "drop":
            try:
                self._queue.put_nowait((stream, record))
            except queue.Full:
                with self._lock:
                    self._dropped[stream] = self._dropped.get(stream, 0) + 1
                log.warning("gradcoh writer queue full: dropped step %s of stream %s", record.step, stream)
            return
        while True:  # block, but wake up if the writer dies so the producer never deadlocks
            try:
                self._queue.put((stream, record), timeout=0.5)
                return
            except queue.Full:
                self.raise_if_failed()
                self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        if not self._thread.is_alive():
            raise WriterError(f"gradcoh could not write to {self._where}: the writer stopped after an earlier error")

    def flush(self) -> None:
        """Write and commit everything queued so far; raises the writer's error if it failed."""
        if not self._closed and self._thread.is_alive():
            done = threading.Event()
            self._put_control((_FLUSH, done))
            while not done.wait(0.5):
                if not self._thread.is_alive():
                    break
        self.raise_if_failed()

    def close(self) -> None:
        """Flush, commit and stop the thread (idempotent); raises the writer's error if it failed."""
        if not self._closed:
            self._closed = True
            if self._thread.is_alive():
                self._put_control((_CLOSE, None))
                self._thread.join()
            atexit.unregister(self.close)  # (threading's exit hooks cannot be unregistered; close is idempotent)
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Re-raise a writer failure in the calling thread (once)."""
        if self._error is not None:
            err, self._error = self._error, None
            raise WriterError(f"gradcoh could not write to {self._where}: {err}") from err

    def _put_control(self, item: tuple) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    # --- writer thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        last_commit = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=min(self._flush_secs, 1.0))
            except queue.Empty:
                item = None
            try:
                if item is None:
                    pass
                elif item[0] is _FLUSH:
                    self._commit_all()
                    last_commit = time.monotonic()
                    item[1].set()
                    continue
                elif item[0] is _CLOSE:
                    self._commit_all()
                    return
                else:
                    stream, record = item
                    self._pending.setdefault(stream, []).append(record)
                    self._commit_full_chunks(stream)
                if time.monotonic() - last_commit >= self._flush_secs:
                    self._commit_all()
                    last_commit = time.monotonic()
            except BaseException as err:
                self._error = err
                log.error("gradcoh writer failed on %s: %s", self._where, err)
                for writer in self._streams.values():
                    writer.record_error(f"{type(err).__name__}: {err}")
                self._drain()
                return

    def _drain(self) -> None:
        """Empty the queue after a failure, releasing anyone waiting on a flush."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item[0] is _FLUSH:
                item[1].set()

    def _stream(self, name: str) -> StreamWriter:
        if name not in self._streams:
            self._streams[name] = self._make_stream(name)
        return self._streams[name]

    def _commit_full_chunks(self, name: str) -> None:
        """Commit the buffered steps of ``name`` once they hold :data:`COMMIT_BYTES` (one write per many steps)."""
        writer = self._stream(name)
        pending = self._pending[name]
        if len(pending) * writer.ensure_created(pending) >= COMMIT_BYTES:
            self._write(name, pending)
            self._pending[name] = []

    def _commit_all(self) -> None:
        names = set(self._pending) | set(self._dropped)
        for name in names:
            self._write(name, self._pending.get(name, []))
            self._pending[name] = []

    def _write(self, name: str, records: list[HostRecord]) -> None:
        with self._lock:
            dropped = self._dropped.pop(name, 0)
        self._stream(name).write(records, dropped)
