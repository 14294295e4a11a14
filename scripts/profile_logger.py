"""Where gradcoh's hook time goes: torch.profiler over recorded steps, with gradcoh's internals labelled.

The script wraps the logger's internal functions (layer rules, route choice, materialise, ghost norms, sketches,
parameter hooks, packing, device→host copy, queue put) in ``torch.profiler.record_function`` labels by monkeypatching
at the script level (the logger itself is not modified), then prints the labelled totals and the top ATen ops.

``--breakdown`` instead times a logged step of a zoo model (``--model``, the sizes of ``bench_overhead.py``) by
part with wall clocks around the same functions (no profiler overhead): forward, autograd's own backward, the layer
rules, the sketches, the reconciliation guard, the exact reductions and hooks (the rest of the tracker's work), the
end-of-step reduction and the hand-off to the writer; plain forward and backward for reference.

    python scripts/profile_logger.py --batch 64 --steps 20 --sketch-dim 0
    python scripts/profile_logger.py --batch 64 --steps 20 --sketch-dim 256 --trace trace.json
    python scripts/profile_logger.py --breakdown --model timm-resnet --steps 5 --sketch-dim 256
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
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
from bench_overhead import SmallCNN, default_batch, make_zoo_case
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
        *((cls, ("factored", "dense", "indexed")) for cls in sketch.PROJECTIONS.values()),
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


class Clock:
    """Wall time per part, exclusive of the timed parts nested inside it (one stack, one thread)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.stack: list[list] = []

    def wrap(self, fn, part: str):
        @functools.wraps(fn)
        def timed(*a, **kw):
            frame = [part, time.perf_counter(), 0.0]  # part, start, time of nested timed parts
            self.stack.append(frame)
            try:
                return fn(*a, **kw)
            finally:
                self.stack.pop()
                spent = time.perf_counter() - frame[1]
                self.totals[part] = self.totals.get(part, 0.0) + spent - frame[2]
                if self.stack:
                    self.stack[-1][2] += spent

        return timed


PARTS = ("forward", "backward (autograd)", "rules", "sketch", "guard", "exact reductions + hooks", "step reduction",
         "writer hand-off")


def clock_logger(clock: Clock, glog: GradientLogger) -> None:
    """Wrap the logger's functions by part (class- and module-level, for this process; absent names are skipped)."""
    import gradcoh.logger.batchgrad as batchgrad
    import gradcoh.logger.capture as capture
    import gradcoh.logger.results as results

    for t in glog.trackers:
        for source in t.plan.sources:
            source.rule = clock.wrap(source.rule, "rules")
    wraps = [(grads.Factored, "sketch", "sketch"), (grads.Dense, "sketch", "sketch"),
             (grads.Composite, "sketch", "sketch"),
             (tracker, "bilinear", "guard"), (results.LayerResults, "reconciled", "guard"),
             (tracker.LayerTracker, "process", "exact reductions + hooks"),
             (capture.LayerCapture, "_forward_hook", "exact reductions + hooks"),
             (batchgrad.BatchGradient, "_param_hook", "exact reductions + hooks"),
             (reducer.StepReducer, "reduce", "step reduction"), (hook.RunOutput, "put", "writer hand-off")]
    for owner, name, part in wraps:
        if hasattr(owner, name):
            setattr(owner, name, clock.wrap(getattr(owner, name), part))
    for t in glog.trackers:  # the capture holds the tracker's bound process from before the wrapping
        t.capture.on_ready = t.process


def breakdown(args: argparse.Namespace) -> None:
    """Median milliseconds per part of a logged step of one zoo model, and of a plain step."""
    batch = args.batch_zoo or default_batch(args.model)
    case = make_zoo_case(args.model, batch, 0, "cpu")
    model, loss = case["models"]["default"], case["loss"]
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        glog = GradientLogger(model, Path(tmp) / "p.zarr", sketch_dim=args.sketch_dim, mode="overwrite",
                              guard_every=args.guard_every,
                              fused={"auto": "auto", "on": True, "off": False}[args.fused])
        clock_logger(clock, glog)
        rows: dict[str, list[float]] = {p: [] for p in (*PARTS, "plain forward", "plain backward", "logged step")}
        for step in range(args.steps + 1):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = loss(model, case["batch"]).mean()
            mid = time.perf_counter()
            out.backward()
            plain = (mid - start, time.perf_counter() - mid)
            model.zero_grad(set_to_none=True)
            clock.totals.clear()
            start = time.perf_counter()
            with glog.record(step):
                out = clock.wrap(lambda: loss(model, case["batch"]).mean(), "forward")()
                clock.wrap(out.backward, "backward (autograd)")()
            total = time.perf_counter() - start
            glog.flush()
            if step == 0:
                continue  # warm-up: route choices, hashes, calibration
            for part in PARTS:
                rows[part].append(clock.totals.get(part, 0.0))
            rows["plain forward"].append(plain[0])
            rows["plain backward"].append(plain[1])
            rows["logged step"].append(total)
        glog.close()
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    plain_ms = med["plain forward"] + med["plain backward"]
    print(f"# {args.model}, batch {batch}, sketch_dim {args.sketch_dim}: medians of {args.steps} steps (ms)")
    print(f"plain step {plain_ms:.1f} (forward {med['plain forward']:.1f}, backward {med['plain backward']:.1f}); "
          f"logged step {med['logged step']:.1f} ({med['logged step'] / plain_ms:.2f}x)")
    print("| " + " | ".join(PARTS) + " |")
    print("|" + "---:|" * len(PARTS))
    print("| " + " | ".join(f"{med[p]:.1f}" for p in PARTS) + " |")
    guard = statistics.mean(rows["guard"]) * 1e3  # amortised over the guard's schedule (steps: a multiple of R)
    print(f"guard, mean of the {args.steps} steps: {guard:.1f} ms = {100 * guard / plain_ms:.1f}% of a plain step")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sketch-dim", type=int, default=0)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true", help="wall time per part of a zoo model's logged step")
    ap.add_argument("--model", default="timm-resnet", help="zoo model for --breakdown (bench_overhead.py names)")
    ap.add_argument("--guard-every", type=int, default=4, help="the logger's guard_every (--breakdown)")
    ap.add_argument("--fused", choices=("auto", "on", "off"), default="auto",
                    help="the logger's fused mode (--breakdown): 'auto' (its default), 'on' (True), 'off' (False)")
    ap.add_argument("--batch-zoo", type=int, default=0, help="batch for --breakdown (0: bench_overhead's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.breakdown:
        breakdown(args)
        return
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
