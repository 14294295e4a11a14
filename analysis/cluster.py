"""Where computations run: connecting to a Dask scheduler, and computing results with a progress display.

Analysis functions never take a ``client=``: they build lazy graphs that run on whatever scheduler is active (a
``distributed.Client`` made current by :func:`connect`/:func:`session`, or Dask's default threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import dask
from dask.diagnostics import ProgressBar

log = logging.getLogger(__name__)

__all__ = ["SCHEDULER_ENV", "active_client", "compute", "connect", "session"]

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"


def connect(address: str | None = None, workers: int | None = None) -> Any:
    """A ``distributed.Client``: to ``address`` (or ``$DASK_SCHEDULER_ADDRESS``), or to a new local cluster.

    A :class:`~distributed.LocalCluster` (dashboard bound to 127.0.0.1 on a free port) is started only when
    ``workers`` is given; with neither an address nor ``workers`` this returns ``None`` and Dask's default local
    scheduler is used.

    Args:
        address: Scheduler address such as ``tcp://10.0.0.5:8786``.
        workers: Number of local worker processes to start when no address is known.

    Returns:
        The client (the caller closes it; :func:`session` does this for you), or ``None``.

    Raises:
        ValueError: ``workers`` < 1.

    """
    from distributed import Client, LocalCluster  # heavy import, only when a cluster is wanted

    address = address or os.environ.get(SCHEDULER_ENV) or None
    if address:
        log.info("connecting to Dask scheduler at %s", address)
        return Client(address)
    if workers is None:
        return None
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    log.info("started local Dask cluster with %d workers, dashboard %s", workers, cluster.dashboard_link)
    return Client(cluster)


@contextlib.contextmanager
def session(address: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """Context manager around :func:`connect` that closes the client and any cluster it started."""
    client = connect(address, workers)
    try:
        yield client
    finally:
        if client is not None:
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()


def active_client() -> Any:
    """The current ``distributed.Client``, or ``None`` (does not import distributed if it was never imported)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_client

    try:
        return get_client()
    except ValueError:
        return None


def _compute_all(objs: list[Any], progress: bool) -> list[Any]:
    client = active_client()
    if progress and client is not None:
        from distributed import futures_of
        from distributed import progress as show_progress

        objs = client.persist(objs)
        with contextlib.redirect_stdout(sys.stderr):  # the text bar writes to stdout; keep stdout for results
            show_progress(futures_of(objs))
    if progress and client is None:
        with ProgressBar(out=sys.stderr):
            return list(dask.compute(*objs))
    return list(dask.compute(*objs))


def compute(obj: Any, *, progress: bool = False) -> Any:
    """Compute lazy xarray/Dask objects (one, or a dict of them in one pass), with progress on stderr if asked.

    Under a distributed client the progress bar is ``distributed.progress``; otherwise Dask's
    :class:`~dask.diagnostics.ProgressBar`. Both write to stderr, so stdout stays clean for results.

    Args:
        obj: A DataArray, Dataset or Dask collection, or a dict of names to them.
        progress: Show a progress bar.

    Returns:
        The computed object (a dict for a dict).

    """
    if isinstance(obj, dict):  # not Mapping: an xarray.Dataset is a Mapping too
        return dict(zip(obj.keys(), _compute_all(list(obj.values()), progress), strict=True))
    return _compute_all([obj], progress)[0]
