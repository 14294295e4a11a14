"""The logger's fixed cost per layer: a deep, narrow MLP where every op is tiny, so the logged step's extra time is
gradcoh's Python and dispatch cost, per layer.

Plain steps, logged steps with the writer and logged steps whose records are dropped run interleaved in one process
(1 thread); the script prints the median and the fastest repetition of each (the fastest is the least preempted on
a shared machine), the extra milliseconds per layer, and the deterministic counts behind them: ATen ops and Python
function calls per logged step over a plain one, per layer.

    python scripts/bench_layer_cost.py --layers 20 --width 32 --batch 16 --reps 25
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from torch import nn
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger("bench_layer_cost")


def aten_ops(fn, n: int) -> float:
    """ATen ops per call of ``fn`` (top-level and nested, counted by the profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(args.layers - 1):
        mods += [nn.Linear(args.width, args.width), nn.Tanh()]
    model = nn.Sequential(*mods, nn.Linear(args.width, 10))
    x, y = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))
    with tempfile.TemporaryDirectory() as tmp:
        writer = GradientLogger(model, Path(tmp) / "a.zarr", mode="overwrite", handle_sigterm=False)
        dropped = GradientLogger(model, Path(tmp) / "b.zarr", mode="overwrite", handle_sigterm=False)
        dropped._output.put = lambda *a: None
        step = [0]

        def run(glog: GradientLogger | None) -> None:
            if glog is None:
                F.cross_entropy(model(x), y).backward()
            else:
                with glog.record(step[0]):
                    F.cross_entropy(model(x), y).backward()
                step[0] += 1
            model.zero_grad(set_to_none=True)

        times: dict[str, list[float]] = {"plain": [], "writer": [], "dropped": []}
        for rep in range(args.reps + 5):
            for name, glog in (("plain", None), ("writer", writer), ("dropped", dropped)):
                start = time.perf_counter()
                run(glog)
                if rep >= 5:
                    times[name].append(time.perf_counter() - start)
        ops = {name: aten_ops(lambda g=g: run(g), 8) for name, g in (("plain", None), ("dropped", dropped))}
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(8):
            run(dropped)
        prof.disable()
        calls = sum(v[1] for v in pstats.Stats(prof).stats.values()) / 8
        writer.close()
        dropped.close()
    L = args.layers
    for stat, fn in (("median", statistics.median), ("fastest", min)):
        m = {k: fn(v) * 1e3 for k, v in times.items()}
        log.info("%s: plain %.2f ms, logged %.2f ms (records dropped %.2f ms): %.3f ms per layer (%.3f dropped)",
                 stat, m["plain"], m["writer"], m["dropped"], (m["writer"] - m["plain"]) / L,
                 (m["dropped"] - m["plain"]) / L)
    log.info("ATen ops per step: plain %.0f, logged %.0f: %.1f more per layer; Python calls per logged step %.0f "
             "(%.0f per layer)", ops["plain"], ops["dropped"], (ops["dropped"] - ops["plain"]) / L, calls, calls / L)


if __name__ == "__main__":
    main()
