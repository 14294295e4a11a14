"""A deterministic logging run, and a fork server that starts many of them cheaply (torch is imported once).

Each step's model weights and batch are derived from the step number alone, so a run resumed at any step logs
exactly what an uninterrupted run logs there.

Fork server protocol (one JSON object per line on stdin, one reply per line on stdout):
    {"cmd": "run", "store": ..., "start": 0, "stop": 300, "mode": "create", "flush_secs": 0.02, "sleep": 0.004,
     "progress": path-or-null}                  -> {"pid": PID}
    {"cmd": "wait", "pid": PID}                 -> {"pid": PID, "status": exit code or -signal}
"""

from __future__ import annotations

import json
import os
import sys
import time

N_IN, N_HIDDEN, N_OUT, BATCH = 12, 16, 4, 16
SKETCH_DIM = 8
GROUPS = ("a", "b")


def arm_kill_in_rewrite(nth: int, when: str) -> None:
    """SIGKILL this process at the ``nth`` rewrite of an existing chunk object (a partly filled chunk written again).

    ``when="temp"``: half of the new chunk's bytes are in zarr's temporary file, nothing renamed yet;
    ``when="renamed"``: the new chunk replaced the old one (holding uncommitted steps), the commit marker not yet.
    Patches zarr's LocalStore write function (``zarr.storage._local._put``, looked up at call time).
    """
    import signal
    import uuid
    from pathlib import Path

    import zarr.storage._local as local

    original = local._put
    seen = [0]

    def put(path, value, exclusive=False):
        path = Path(path)
        if "c" in path.parts and path.exists():  # a chunk object written before: a partly filled chunk rewritten
            seen[0] += 1
            if seen[0] == nth:
                if when == "temp":
                    data = bytes(value.as_buffer_like())
                    path.with_suffix(f".{uuid.uuid4().hex}.partial").write_bytes(data[: len(data) // 2])
                else:
                    original(path, value, exclusive)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(path, value, exclusive)

    local._put = put


def run(store: str, start: int, stop: int, mode: str = "create", flush_secs: float = 0.02, sleep: float = 0.0,
        progress: str | None = None, kill_rewrite: list | None = None) -> None:
    """Log steps ``start..stop-1`` into ``store``; ``progress`` (a file) receives the last completed step.

    ``kill_rewrite``: ``[nth, when]`` of :func:`arm_kill_in_rewrite`.
    """
    if kill_rewrite:
        arm_kill_in_rewrite(*kill_rewrite)
    import torch
    import torch.nn.functional as F
    from gradcoh.logger import GradientLogger

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(N_IN, N_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(N_HIDDEN, N_OUT))
    done = None
    try:
        with GradientLogger(model, store, sketch_dim=SKETCH_DIM, seed=3, groups=GROUPS, mode=mode,
                            flush_secs=flush_secs) as glog:
            for step in range(start, stop):
                g = torch.Generator().manual_seed(1000 + step)
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                x = torch.randn(BATCH, N_IN, generator=g)
                y = torch.randint(0, N_OUT, (BATCH,), generator=g)
                group = torch.randint(0, len(GROUPS), (BATCH,), generator=g)
                with glog.record(step, index=torch.arange(BATCH) + BATCH * step, labels=y, group=group) as rec:
                    per = F.cross_entropy(model(x), y, reduction="none")
                    rec.loss(per)
                    per.mean().backward()
                model.zero_grad(set_to_none=True)
                done = step
                if sleep:
                    time.sleep(sleep)
    finally:
        if progress:
            with open(progress, "w") as f:
                f.write(json.dumps({"last_step": done}))


def serve() -> None:
    """The fork server: import the heavy modules once, then fork one child per ``run`` request."""
    import gradcoh.logger.hook  # noqa: F401
    import torch  # noqa: F401  (imported before forking: children start instantly)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "run":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    run(req["store"], req["start"], req["stop"], req.get("mode", "create"),
                        req.get("flush_secs", 0.02), req.get("sleep", 0.0), req.get("progress"),
                        req.get("kill_rewrite"))
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
            print(json.dumps({"pid": pid}), flush=True)
        elif req["cmd"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            code = os.waitstatus_to_exitcode(status)
            print(json.dumps({"pid": req["pid"], "status": code}), flush=True)
        elif req["cmd"] == "quit":
            return


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:  # python worker.py STORE START STOP [MODE]
        run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(sys.argv[4:5] or ["create"]))
