"""Start a worker script as torchrun-style ranks (gloo on CPU): ``start_ranks`` / ``run_two_ranks``.

The ranks are forked from one launcher process that has imported the worker module (torch, and Lightning or the
Hugging Face Trainer stack: 2.5-5 s of CPU each) once, instead of each rank's interpreter importing it again. Each
rank is still a process of its own, with its own gloo process group, joined through the torchrun environment
variables, and runs the worker's ``main()`` as ``python worker.py ARGS`` would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

_PIDS = "gradcoh-launch-pids "


class Ranks:
    """The launcher of a run's ranks and the ranks' process ids."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self._pids: list[int] | None = None

    @property
    def pids(self) -> list[int]:
        """The ranks' process ids: the launcher's first line, once it has forked every rank (read when first asked
        for, not when started: a launcher stuck in its imports fails :meth:`wait`'s timeout, it does not hang)."""
        if self._pids is None:
            self._pids = []
            for line in self.proc.stdout:
                if line.startswith(_PIDS):
                    self._pids = json.loads(line[len(_PIDS):])
                    break
        return self._pids

    def kill_rank(self, rank: int) -> None:
        """SIGKILL one rank (the launcher then kills the others: they would wait for it forever)."""
        os.kill(self.pids[rank], signal.SIGKILL)

    def wait(self, timeout: float) -> tuple[int, str]:
        """``(exit status, stderr)`` of the launcher: 0 when every rank exited with 0."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:  # timed out: the launcher and its ranks (its process group)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode, err


def start_ranks(worker: Path, *args: str, world: int = 2, extra_env: dict[str, str] | None = None) -> Ranks:
    """Start ``world`` ranks of ``worker``'s ``main()`` with ``args`` (the launcher imports it, then forks them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GROUP_RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
           "TORCHELASTIC_RUN_ID": "gradcoh-test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, __file__, str(worker), str(world), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return Ranks(proc)


def run_two_ranks(worker: Path, *args: str, timeout: float = 240) -> None:
    """Run ``worker``'s ``main()`` with ``args`` as ranks 0 and 1; raise with stderr on failure."""
    code, err = start_ranks(worker, *args).wait(timeout)
    assert code == 0, err[-3000:]


def _fork_ranks(worker: str, world: int, args: list[str]) -> int:
    """Import ``worker``, fork ``world`` ranks, run its ``main()`` in each; the number of ranks that failed."""
    spec = importlib.util.spec_from_file_location(Path(worker).stem, worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = [worker, *args]
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
                module.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    print(_PIDS + json.dumps(pids), flush=True)
    ranks = dict(zip(pids, range(world), strict=True))
    failed = 0
    while ranks:
        pid, status = os.wait()
        rank = ranks.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if rank is not None and code:
            print(f"rank {rank} exited with {code}", file=sys.stderr)
            failed += 1
            for other in ranks:  # the others would wait for it forever
                os.kill(other, signal.SIGKILL)
    return failed


if __name__ == "__main__":
    sys.exit(1 if _fork_ranks(sys.argv[1], int(sys.argv[2]), sys.argv[3:]) else 0)
