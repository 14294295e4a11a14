"""Start a worker script as two torchrun-style processes (gloo on CPU) and wait for both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def run_two_ranks(worker: Path, *args: str, timeout: float = 240) -> None:
    """Run ``worker args`` as ranks 0 and 1 with the environment torchrun sets; raise with stderr on failure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "gradcoh-test", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(worker), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
