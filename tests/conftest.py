"""Shared pytest configuration: makes ``tests/`` importable (``from storefactory import ...``) and shared fixtures."""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path


def _cap_threads() -> None:
    """Give each xdist worker its share of the cores: ``max(1, cpus // workers)`` BLAS/OpenMP threads.

    Two workers with two threads each on a 2-core machine oversubscribe it: spinning OpenMP threads tripled the CPU
    time of the zoo tests (134 s against 44 s). Runs here before numpy/torch start their thread pools, and the value is
    inherited by the subprocesses tests start (DDP ranks, fork server). An explicit ``OMP_NUM_THREADS`` wins (.ci/run's
    one-thread pass); outside xdist nothing is changed. Two-thread numerics are still exercised on any machine:
    tests/logger/test_threads.py runs the exactness checks at two threads explicitly.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    # Idle OpenMP threads sleep instead of spinning: with the machine busy (the other worker, other jobs) a spinning
    # thread burns a core for nothing. tests/logger/test_threads.py at two threads: 20 s of CPU against 35-45 s.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" in os.environ:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cpus // int(workers)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, threads)
    if "torch" in sys.modules:  # a plugin imported it first: its pool is not started yet, so this still applies
        sys.modules["torch"].set_num_threads(int(threads))


_cap_threads()
def _tmp_in_memory() -> None:
    """Temporary files (pytest's ``tmp_path``, the subprocesses' temp files) on ``/dev/shm`` when it is a writable
    tmpfs with at least 2 GiB free and ``TMPDIR`` is not set: every logged store is ~200 small file operations
    (mkdir, temporary file, rename), and on ext4 their journaling was ~50 ms of system CPU per store (test_review.py,
    ``-n 0``: 32.5-34.1 s of CPU in /tmp, 30.4-30.6 in /dev/shm). Same system calls, same atomic renames; pytest keeps
    its usual three newest run directories there. A small ``/dev/shm`` (containers default to 64 MiB) is not used.
    """
    if "TMPDIR" in os.environ:
        return
    shm = "/dev/shm"
    try:
        stat = os.statvfs(shm)
    except OSError:
        return
    if not os.access(shm, os.W_OK) or stat.f_bavail * stat.f_frsize < 2 * 2**30:
        return
    os.environ["TMPDIR"] = shm
    tempfile.tempdir = None  # recomputed from TMPDIR on next use


_tmp_in_memory()
# 64 KiB chunks instead of the product's 4 MiB (gradcoh.logger.schema.CHUNK_BYTES_ENV; inherited by the subprocesses
# tests start): each commit rewrites every array's partly filled chunk whole, ~20 MiB encoded for a 2-layer model at
# 4 MiB, the first cost of every store a test logs. Same code paths; runs of more steps cross chunk boundaries sooner.
# tests/scale/test_long_runs.py checks the chunk rule at the 4 MiB default.
os.environ.setdefault("GRADCOH_CHUNK_BYTES", str(64 * 2**10))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from storefactory import build_store, random_gradients  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def small_store(tmp_path):
    """A store with both streams, two user groups, labels, a short (padded) step and float32 sketches."""
    rng = np.random.default_rng(7)
    grads = random_gradients(rng, n_steps=5, m=12, sizes=(6, 9, 4), short_step=(3, 9))
    labels = [rng.integers(0, 3, size=len(step[0])) for step in grads]
    groups = [rng.integers(0, 2, size=len(step[0])) for step in grads]
    probe = random_gradients(rng, n_steps=3, m=8, sizes=(6, 9, 4))
    data = build_store(
        tmp_path / "run.zarr",
        grads,
        labels=labels,
        groups=groups,
        group_names=("clean", "corrupted"),
        sketch_dim=64,
        probe=probe,
        extra_steps=2,
    )
    return data


def pytest_collection_finish(session) -> None:
    """Move everything imported so far (torch, transformers, every test module) out of the garbage collector's
    view: full collections, and pytest's five at the end of the session, then scan only what the tests create
    (2.4 s less per worker at the end alone). Objects made by tests are collected as before."""
    gc.collect()
    gc.freeze()


@pytest.fixture
def unguarded(monkeypatch):
    """The reconciliation guard's schedule checks no layer (it still advances).

    For fused-mode tests: a layer the guard checks at a step is not fused at that step (gradcoh.logger.fused), and a
    run's first logged step checks every layer; these tests compare the fused ``.grad`` and the statistics with the
    float64 oracles instead.
    """
    from gradcoh.logger.guard import GuardSchedule

    real = GuardSchedule.next_step
    monkeypatch.setattr(GuardSchedule, "next_step", lambda self, stream: [False for _ in real(self, stream)])


FILE_SECONDS = {
    "integrations/test_huggingface.py": 34, "cli/test_cli.py": 32, "reliability/test_crash.py": 31,
    "logger/test_sketch.py": 29, "logger/test_zoo.py": 29, "logger/test_review.py": 28,
    "reliability/test_concurrent.py": 27, "integrations/test_lightning.py": 25, "logger/test_exact.py": 25,
    "distributed/test_ddp.py": 24, "test_bench_smoke.py": 22, "scale/test_remote.py": 22,
    "logger/test_alignment.py": 22, "experiment/test_experiment.py": 20, "analysis/test_stderr.py": 16,
    "logger/test_logger_boundaries.py": 15, "scale/test_cluster_equivalence.py": 14, "analysis/test_plots.py": 14,
    "scale/test_long_runs.py": 14, "logger/test_sketch_variance.py": 14, "scale/test_cluster_example.py": 12,
    "scale/test_compact.py": 12, "analysis/test_missing_metadata.py": 12, "cli/test_plot.py": 10,
}
"""Seconds each of the longest test files took (setup, call and teardown of its tests; README test command at
cec7600, 2026-12-03, load 4-8); any other file counts 0.3 s per test. Only the order of the files depends on these
numbers, never a result."""


def pytest_configure(config) -> None:
    """``--dist loadfile``: hand the files to the two workers longest first (the order of the collection, see
    :func:`pytest_collection_modifyitems`) instead of xdist's default, most tests first, which left the few-test,
    long subprocess files (crash, DDP, Lightning, bench smoke) for the end, one worker finishing them alone."""
    if getattr(config.option, "dist", "no") == "loadfile" and hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _file_name(item) -> str:
    """A test item's file, relative to tests/ (the keys of :data:`FILE_SECONDS`)."""
    return item.path.relative_to(TESTS_DIR).as_posix() if item.path.is_relative_to(TESTS_DIR) else str(item.path)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Order the files longest first (:data:`FILE_SECONDS`), keeping the order of the tests inside each file."""
    weight: dict[str, float] = {}
    for item in items:
        name = _file_name(item)
        weight[name] = weight.get(name, 0.0) + 0.3
    for name in weight:
        weight[name] = FILE_SECONDS.get(name, weight[name])
    items.sort(key=lambda item: -weight[_file_name(item)])
