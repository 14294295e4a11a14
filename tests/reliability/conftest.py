"""Fixtures of the reliability tests: a fork server running deterministic logging runs (see ``worker.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradcoh.analysis import open_store
from gradcoh.logger import schema

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from reliability_helpers import N_STEPS, SLEEP, values  # noqa: E402


class ForkServer:
    """Talks to ``worker.py serve``: starts runs (``start``), reaps them (``wait``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "worker.py"), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def _ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, store, start: int, stop: int, **kw) -> int:
        return self._ask(cmd="run", store=str(store), start=start, stop=stop, **kw)["pid"]

    def wait(self, pid: int) -> int:
        return self._ask(cmd="wait", pid=pid)["status"]

    def close(self) -> None:
        try:
            self._ask(cmd="quit") if False else self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


@pytest.fixture(scope="session")
def forkserver():
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def reference(forkserver, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    t0 = time.monotonic()
    assert forkserver.wait(forkserver.start(path, 0, N_STEPS, sleep=SLEEP)) == 0
    duration = time.monotonic() - t0
    ds = open_store(path)
    assert ds.sizes[schema.DIM_STEP] == N_STEPS
    return values(ds), duration


