"""Failures while training: disk full, permission denied, a vanished store directory; SIGTERM; modes."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from gradcoh.analysis import open_store
from gradcoh.logger import GradientLogger, StoreError, schema
from gradcoh.logger.writer import WriterError
from zarr.storage import LocalStore


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def step(glog: GradientLogger, model: torch.nn.Module, s: int, n: int = 8) -> None:
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    with glog.record(s, index=torch.arange(n), labels=y):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad()


def fail_chunk_writes(monkeypatch, exc: OSError) -> None:
    """Every data-chunk write raises ``exc`` (metadata, e.g. the root attributes, can still be written)."""
    original = LocalStore.set

    async def broken(self, key, value):
        if "/c/" in key:
            raise exc
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", broken)


CAUSES = {
    "disk full": (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    "permission denied": (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_write_failure_raises_in_training_thread(tmp_path, monkeypatch, cause):
    exc, text = CAUSES[cause]
    path = tmp_path / "run.zarr"
    model = mlp()
    glog = GradientLogger(model, path, flush_secs=0.01)
    step(glog, model, 0)
    glog.flush()  # step 0 is committed before the disk "fills"
    fail_chunk_writes(monkeypatch, exc)
    with pytest.raises(WriterError) as info:
        for s in range(1, 400):
            step(glog, model, s)
            time.sleep(0.005)
        glog.close()
    message = str(info.value)
    assert str(path) in message and text in message
    glog.close()  # the error was reported once; closing again is quiet
    assert not glog.should_log(10_000)
    monkeypatch.undo()
    ds = open_store(path)
    assert ds.sizes["step"] >= 1 and text in ds.attrs[schema.ERROR_KEY]  # the committed prefix survives


@pytest.mark.parametrize("cause", list(CAUSES))
def test_write_failure_with_on_error_warn_keeps_training(tmp_path, monkeypatch, caplog, cause):
    exc, text = CAUSES[cause]
    path = tmp_path / "run.zarr"
    model = mlp()
    fail_chunk_writes(monkeypatch, exc)
    with caplog.at_level(logging.WARNING), GradientLogger(model, path, flush_secs=0.01, on_error="warn") as glog:
        for s in range(50):
            step(glog, model, s)
            time.sleep(0.005)
        assert not glog.should_log(50)  # logging stopped, training went on
    warnings = [r.getMessage() for r in caplog.records if "training continues" in r.getMessage()]
    assert len(warnings) == 1 and text in warnings[0] and str(path) in warnings[0]
    monkeypatch.undo()
    assert text in zarr.open_group(str(path), mode="r").attrs[schema.ERROR_KEY]


@pytest.mark.parametrize("when", ["creating", "resizing"])
def test_array_metadata_failure_raises_and_commits_nothing(tmp_path, monkeypatch, when):
    """One array's metadata write fails (its creation, or its resize at the second commit) while the stream's
    arrays are created or resized together (gradcoh.logger.store._run_all): the writer raises in the training
    thread, naming the cause, and the commit marker does not advance past what was committed before."""
    path = tmp_path / "run.zarr"
    model = mlp()
    glog = GradientLogger(model, path, flush_secs=0.01)
    if when == "resizing":
        step(glog, model, 0)
        glog.flush()
    original = LocalStore.set

    async def broken(self, key, value):
        if key == f"{schema.STREAM_BATCH}/{schema.LOSS}/zarr.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", broken)
    with pytest.raises(WriterError, match="No space left on device"):
        step(glog, model, 1)
        glog.flush()
    glog.close()
    monkeypatch.undo()
    stream = zarr.open_group(str(path), mode="r").get(schema.STREAM_BATCH)
    committed = 0 if stream is None else stream.attrs[schema.COMMITTED_KEY]
    assert committed == (1 if when == "resizing" else 0)


def test_vanished_store_directory(tmp_path):
    path = tmp_path / "run.zarr"
    model = mlp()
    glog = GradientLogger(model, path, flush_secs=0.01)
    step(glog, model, 0)
    glog.flush()
    shutil.rmtree(path)
    with pytest.raises(WriterError, match="vanished"):
        for s in range(1, 200):
            step(glog, model, s)
            time.sleep(0.005)
        glog.close()
    glog.close()
    assert not (path / "zarr.json").exists()  # nothing half-recreated there


def test_modes(tmp_path):
    path = tmp_path / "run.zarr"
    model = mlp()
    with GradientLogger(model, path) as glog:
        for s in range(3):
            step(glog, model, s)
    with pytest.raises(StoreError, match=r"mode=.append.*mode=.overwrite."):
        GradientLogger(model, path)
    with GradientLogger(model, path, mode="append") as glog:
        with pytest.raises(ValueError, match="step 2 is not after the last logged step 2"):
            step(glog, model, 2)
        step(glog, model, 5)
    assert open_store(path).step.values.tolist() == [0, 1, 2, 5]
    for kwargs, fragment in [
        ({"seed": 1}, "seed=1"),
        ({"sketch_dim": 4}, "sketch_dim=4"),
        ({"groups": ("a", "b")}, "groups="),
    ]:
        with pytest.raises(StoreError, match=fragment):
            GradientLogger(model, path, mode="append", **kwargs)
    with pytest.raises(StoreError, match="layers differ"):
        GradientLogger(torch.nn.Linear(6, 3), path, mode="append")
    root = zarr.open_group(str(path), mode="r+")
    root.attrs[schema.FORMAT_KEY] = schema.FORMAT_VERSION + 1
    with pytest.raises(StoreError, match="format version"):
        GradientLogger(model, path, mode="append")
    with GradientLogger(model, path, mode="overwrite") as glog:
        step(glog, model, 0)
    assert open_store(path).step.values.tolist() == [0]
    with pytest.raises(StoreError, match="nothing to append"):
        GradientLogger(model, tmp_path / "absent.zarr", mode="append")


def test_sigterm_handler_installed_only_while_open(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    assert before is signal.SIG_DFL
    glog = GradientLogger(mlp(), tmp_path / "run.zarr")
    assert signal.getsignal(signal.SIGTERM) is not before
    glog.close()
    assert signal.getsignal(signal.SIGTERM) is before
    with GradientLogger(mlp(), tmp_path / "b.zarr", handle_sigterm=False):
        assert signal.getsignal(signal.SIGTERM) is before

    def own(signum, frame):  # a handler the program installed itself is left alone
        pass

    signal.signal(signal.SIGTERM, own)
    try:
        with GradientLogger(mlp(), tmp_path / "c.zarr"):
            assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_flushes_and_commits(forkserver, tmp_path):
    path, progress = tmp_path / "run.zarr", tmp_path / "progress.json"
    pid = forkserver.start(path, 0, 100_000, flush_secs=5.0, sleep=0.002, progress=str(progress))
    deadline = time.monotonic() + 30
    while not (path / schema.STREAM_BATCH / "zarr.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # some steps logged, none committed yet by time (flush_secs=5)
    os.kill(pid, signal.SIGTERM)
    assert forkserver.wait(pid) == 128 + signal.SIGTERM
    last = json.loads(progress.read_text())["last_step"]
    ds = open_store(path)
    assert last is not None and last > 0
    # Every completed step was committed: the progress file is written after each step, so SIGTERM may land between
    # a step's record block and its progress line (one more committed step than reported).
    n = ds.sizes["step"]
    assert n in (last + 1, last + 2), (n, last)
    np.testing.assert_array_equal(ds.step.values, np.arange(n))
    assert zarr.open_group(str(path), mode="r")[schema.STREAM_BATCH][schema.SQ_NORM].shape[0] == n
