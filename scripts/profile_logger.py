"""Where gradcoh's hook time goes: torch.profiler over recorded steps, with gradcoh's internals labelled.

The script wraps the logger's internal functions (layer rules, route choice, materialise, ghost norms, sketches,
parameter hooks, packing, device→host copy, queue put) in ``torch.profiler.record_function`` labels by monkeypatching
at the script level (the logger itself is not modified), then prints the labelled totals and the top ATen ops.

    python scripts/profile_logger.py --batch 64 --steps 20 --sketch-dim 0
    python scripts/profile_logger.py --batch 64 --steps 20 --sketch-dim 256 --trace trace.json
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradcoh.logger.grads as grads
import gradcoh.logger.hook as hook
import gradcoh.logger.reducer as reducer
import gradcoh.logger.sketch as sketch
import gradcoh.logger.tracker as tracker
from bench_overhead import SmallCNN
from gradcoh.logger import GradientLogger


def label(fn, name):
    @functools.wraps(fn)
    def wrapped(*a, **kw):
        with record_function(name):
            return fn(*a, **kw)

    return wrapped


def instrument() -> None:
    for cls, names in (
        (grads.Factored, ("materialise", "sq_norms", "sketch", "group_sums")),
        (grads.Dense, ("sq_norms", "sketch", "group_sums")),
        (sketch.Projection, ("factored", "dense", "indexed")),
        (tracker.LayerTracker, ("_param_hook", "process", "_reduce", "per_example", "gram", "reconciled",
                                "_forward_hook")),
        (reducer.StepReducer, ("reduce",)),
        (hook.GradientLogger, ("_put",)),
    ):
        for n in names:
            setattr(cls, n, label(getattr(cls, n), f"gc.{cls.__name__}.{n}"))
    tracker.choose_route = label(tracker.choose_route, "gc.choose_route")
    tracker.combine = label(tracker.combine, "gc.combine")
    reducer.to_host = label(reducer.to_host, "gc.to_host")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sketch-dim", type=int, default=0)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    instrument()
    torch.manual_seed(0)
    model = SmallCNN()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    with tempfile.TemporaryDirectory() as tmp:
        glog = GradientLogger(model, Path(tmp) / "p.zarr", sketch_dim=args.sketch_dim, mode="overwrite")
        for t in glog.trackers:  # label each layer's rule calls
            for source in t.plan.sources:
                source.rule = label(source.rule, f"gc.rule.{t.name}")
        idx = torch.arange(args.batch)
        step = 0

        def run(n: int, log: bool) -> None:
            nonlocal step
            for _ in range(n):
                model.zero_grad(set_to_none=True)
                if log:
                    with record_function("gc.record_block"), glog.record(step, index=idx, labels=y):
                        F.cross_entropy(model(x), y).backward()
                    step += 1
                else:
                    with record_function("plain_step"):
                        F.cross_entropy(model(x), y).backward()

        run(3, True)
        run(3, False)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(args.steps, False)
            run(args.steps, True)
        glog.close()
    ka = prof.key_averages()
    ours = sorted((e for e in ka if e.key.startswith(("gc.", "plain_step"))), key=lambda e: -e.cpu_time_total)
    print(f"# gradcoh profile: small CNN, batch {args.batch}, sketch_dim {args.sketch_dim}, {args.steps} steps each")
    print("\n## labelled regions (total CPU ms per step, incl. children)\n")
    print("| region | calls/step | ms/step |")
    print("|---|---:|---:|")
    for e in ours:
        print(f"| {e.key} | {e.count / args.steps:.1f} | {e.cpu_time_total / 1e3 / args.steps:.2f} |")
    print("\n## top ATen ops by self CPU time (both runs together)\n")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
