"""The logger's output: the run's store and its background writer, as one object the facade calls.

:class:`RunOutput` opens the run (root attributes written, projections adopted from a store being appended to),
queues each step's host record once the projections its sketches need are recorded, keeps the last logged step and
m-coherence of each stream, and stops logging for good when the writer fails (``on_error``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from . import schema
from .config import LoggerConfig
from .reducer import record_coherence
from .sketch import ProjectionTable
from .store import HostRecord, StreamWriter, open_run
from .writer import AsyncWriter, WriterError

log = logging.getLogger(__name__)


class RunOutput:
    """Where a logger's records go.

    Args:
        config: The logger configuration (``mode``, queue and flush settings, ``on_error``).
        path: The store's path or URL.
        projections: The run's projection table (recorded in the store before the first sketch that uses it).
    """

    def __init__(self, config: LoggerConfig, path: str, projections: ProjectionTable) -> None:
        self.config = config
        self.path = path
        self.projections = projections
        self.stopped = False  # a writer failure stopped logging for good
        self.last_step: dict[str, int] = {}
        self.coherence: dict[str, float] = {}
        self._writer: AsyncWriter | None = None
        self._root: Any = None

    def open(self, attrs: dict[str, Any], views: dict[str, tuple[int, int]], storage_options: dict | None,
             rank: int, world_size: int) -> None:
        """Open (or create, or append to) the run and start the background writer.

        Args:
            attrs: The run's root attributes.
            views: Natural view of every parameter, by name (to check the projections of a store appended to).
            storage_options: fsspec options for URL stores.
            rank: This process's rank.
            world_size: Number of processes.
        """
        cfg = self.config
        run = open_run(self.path, cfg.mode, attrs, storage_options, rank=rank, world_size=world_size,
                       barrier=torch.distributed.barrier if world_size > 1 else None)
        self.last_step = dict(run.last_steps)
        self._root = run.root
        self.projections.adopt(dict(run.root.attrs), views, self.path)
        layers, groups = attrs[schema.LAYERS_KEY], cfg.group_names

        def make_stream(name: str) -> StreamWriter:
            return StreamWriter(run.root, name, layers, groups, cfg.sketch_dim, cfg.sketch_dtype,
                                cfg.optional_variables)

        self._writer = AsyncWriter(make_stream, self.path, cfg.queue_size, cfg.on_full, cfg.flush_secs)

    def check_order(self, stream: str, step: int) -> None:
        """Raise unless ``step`` comes after the last logged step of ``stream``."""
        last = self.last_step.get(stream)
        if last is not None and step <= last:
            raise ValueError(f"step {step} is not after the last logged step {last} of stream '{stream}'; "
                             "steps must keep increasing (a resumed run continues after the stored steps)")

    def put(self, stream: str, step: int, record: HostRecord) -> None:
        """Queue one step's record (after recording any projection chosen at this step)."""
        self.last_step[stream] = step
        self.coherence[stream] = record_coherence(record)
        if self.projections.unsaved:  # before the step is queued: no committed sketch without its projection
            self._root.attrs[schema.PROJECTIONS_KEY] = self.projections.attribute()
            self.projections.unsaved = False
        self._call(lambda writer: writer.put(stream, record))

    def publish(self, summary_writer: Any, stream: str, step: int, summary: dict[str, float]) -> None:
        """Write a logged step's summary scalars to ``summary_writer`` (``add_scalar``; None: nowhere)."""
        if summary_writer is None:
            return
        prefix = "gradcoh" if stream == schema.STREAM_BATCH else f"gradcoh/{stream}"
        for key, value in summary.items():
            if key != "n" and not math.isnan(value):
                summary_writer.add_scalar(f"{prefix}/{key}", value, step)

    def last_coherence(self, stream: str) -> float:
        """Whole-network m-coherence of the last step logged to ``stream`` (NaN before the first)."""
        return self.coherence.get(stream, math.nan)

    def raise_if_failed(self) -> None:
        """Surface a failure of the background writer (see ``on_error``)."""
        self._call(AsyncWriter.raise_if_failed)

    def flush(self) -> None:
        """Write and commit every step queued so far."""
        self._call(AsyncWriter.flush)

    def close(self) -> None:
        """Flush, commit and stop the writer."""
        self._call(AsyncWriter.close)

    def _call(self, method: Callable[[AsyncWriter], None]) -> None:
        """Call ``method`` of the writer (if any); a writer failure stops logging (see ``on_error``)."""
        if self._writer is None:
            return
        try:
            method(self._writer)
        except WriterError as err:
            self._failed(err)

    def _failed(self, err: WriterError) -> None:
        """A writer failure stops logging for good; ``on_error="raise"`` raises it (once), ``"warn"`` logs it."""
        first = not self.stopped
        self.stopped = True
        if self.config.on_error == "raise":
            raise err
        if first:
            log.warning("%s; logging stopped, training continues (on_error='warn')", err)
