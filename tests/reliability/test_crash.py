"""Acceptance test: a logging process killed with SIGKILL at random moments leaves a store whose committed prefix is
exactly what an uninterrupted run logs, and a resumed run (mode="append") continues it exactly.

The runs are deterministic (``worker.py``: weights and batch derived from the step number) and start from a fork
server, so a trial costs no torch import; four trials run at a time.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import zarr
from gradcoh.logger import schema
from gradcoh.logger.store import find_partial_files, repair_store
from reliability_helpers import N_STEPS, SLEEP
from reliability_helpers import assert_prefix as _assert_prefix

TRIALS = 12
AT_ONCE = 4

def test_sigkill_at_random_moments_then_resume(forkserver, reference, tmp_path):
    ref, duration = reference
    seed = int(os.environ.get("GRADCOH_CRASH_SEED", "20261129"))
    rng = random.Random(seed)
    stores = [tmp_path / f"kill{i}.zarr" for i in range(TRIALS)]
    statuses = []
    for wave in range(0, TRIALS, AT_ONCE):
        batch = stores[wave : wave + AT_ONCE]
        t0 = time.monotonic()
        pids = [forkserver.start(s, 0, N_STEPS, sleep=SLEEP) for s in batch]
        # Four runs share two cores, so each lasts longer than the solo reference: a kill within that lands mid-run.
        kills = sorted((rng.uniform(0.1, duration), pid) for pid in pids)
        for at, pid in kills:
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            os.kill(pid, signal.SIGKILL)
        statuses += [forkserver.wait(pid) for pid in pids]
    killed = sum(s == -signal.SIGKILL for s in statuses)
    assert killed >= 10, f"only {killed} of {TRIALS} runs were killed before finishing: {statuses}"

    committed, tails, partials = [], [], []
    for store in stores:
        n = _assert_prefix(store, ref, store.name)
        committed.append(n)
        if n:
            tails.append(zarr.open_group(str(store), mode="r")[schema.STREAM_BATCH][schema.SQ_NORM].shape[0] - n)
        partials.append(len(find_partial_files(store)))
    print(f"seed {seed}: committed {committed}; rows beyond the commit {tails}; .partial files {partials}")
    assert any(0 < n < N_STEPS for n in committed), committed

    # gradcoh repair on every killed store: shapes back to the committed count, no temp files, values unchanged.
    for store, n in zip(stores, committed, strict=True):
        if not (store / "zarr.json").exists():
            assert forkserver.wait(forkserver.start(store, 0, 3)) == 0  # mode="create" accepts the empty leftover
            continue
        if not n:
            continue
        repair_store(store)
        batch = zarr.open_group(str(store), mode="r")[schema.STREAM_BATCH]
        assert all(batch[k].shape[0] == n for k in schema.VARIABLES if k in batch)
        assert not find_partial_files(store)
        assert _assert_prefix(store, ref, f"{store.name} after repair") == n

    # Resume the most advanced unfinished store (not repaired: append trims the tail itself) and finish the run.
    store = stores[max((i for i, n in enumerate(committed) if 0 < n < N_STEPS), key=lambda i: committed[i])]
    resumed = tmp_path / "resumed.zarr"
    os.rename(store, resumed)
    start = committed[stores.index(store)]
    assert forkserver.wait(forkserver.start(resumed, start, N_STEPS, mode="append", sleep=0.0)) == 0
    assert _assert_prefix(resumed, ref, "resumed") == N_STEPS


def test_resume_of_unrepaired_crash_tail(forkserver, reference, tmp_path):
    """A crash between (1) resize/data and (3) the commit: append trims the tail and continues exactly."""
    ref, _ = reference
    store = tmp_path / "tail.zarr"
    assert forkserver.wait(forkserver.start(store, 0, 40)) == 0
    batch = zarr.open_group(str(store), mode="r+")[schema.STREAM_BATCH]
    for name in schema.VARIABLES:  # what a writer killed after resizing leaves: longer arrays, old commit marker
        if name in batch:
            arr = batch[name]
            arr.resize((55, *arr.shape[1:]))
    assert forkserver.wait(forkserver.start(store, 40, 80, mode="append")) == 0
    assert _assert_prefix(store, ref, "tail") == 80


@pytest.mark.parametrize("when", ["temp", "renamed"])
def test_sigkill_inside_a_partial_chunk_rewrite(forkserver, reference, tmp_path, when):
    """Killed while a partly filled chunk holding committed steps is written again: those steps survive unchanged.

    The tiny run's arrays hold 64 (sketch) to 8192 (n_examples) steps a chunk at the suite's 64 KiB chunks (256 for
    sq_norm; at the product's 4 MiB, 64× more), so every commit (every ~20 ms) rewrites the partly filled chunk of each
    array; the kill lands in the 40th such rewrite, mid-commit (some arrays rewritten, others not). ``temp``: half of
    the new chunk written to zarr's temporary file; ``renamed``: the new chunk, with steps not yet committed, already
    replaced the old one.
    """
    ref, _ = reference
    store = tmp_path / f"rewrite-{when}.zarr"
    batch_path = store / schema.STREAM_BATCH
    assert forkserver.wait(forkserver.start(store, 0, 120, sleep=0.01, kill_rewrite=[40, when])) == -signal.SIGKILL
    root = zarr.open_group(str(store), mode="r")
    per = root[schema.STREAM_BATCH][schema.SQ_NORM].chunks[0]
    n = _assert_prefix(store, ref, f"killed in a rewrite ({when})")
    assert 0 < n < per, (n, per)  # the committed steps all sit in the partly filled first chunk
    if when == "temp":
        assert find_partial_files(store)
    else:  # some array already holds steps beyond the commit, in the rewritten chunk
        batch = root[schema.STREAM_BATCH]
        assert any(batch[k].shape[0] > n for k in schema.VARIABLES if k in batch)
    assert (batch_path / schema.SQ_NORM / "c" / "0" / "0" / "0").exists()
    repair_store(store)
    assert not find_partial_files(store)
    assert _assert_prefix(store, ref, f"repaired ({when})") == n
    assert forkserver.wait(forkserver.start(store, n, 150, mode="append", sleep=0.0)) == 0
    assert _assert_prefix(store, ref, f"resumed ({when})") == 150
