"""Where a zoo model's sketch time goes, per parameter: projection kind, route, shapes, measured and modelled ms.

Wraps the routes of every :class:`~gradcoh.logger.sketch.Projection` class and the materialisation of factored
gradients (:meth:`gradcoh.logger.grads.Factored.materialise`, which a CountSketch's factored route and the mixed
rule's choice pay for), runs a few logged steps of one zoo model and prints per parameter: kind, route, natural view,
positions ``T``, measured ms per step (median over steps, the main thread's CPU time: other processes on a shared
machine inflate it far less than wall time) and the cost model's ms (:meth:`Projection.cost` with
:data:`~gradcoh.logger.costs.SKETCH_COSTS`, times ``n``).

    python scripts/profile_sketch.py --model timm-resnet --sketch-dim 256 --steps 3
    python scripts/profile_sketch.py --model timm-resnet --sketch-dim 256 --check-choice   # model vs measured
    python scripts/profile_sketch.py --model timm-resnet --sketch-dim 256 --check-choice --whole  # with exact routes
    python scripts/profile_sketch.py --model timm-resnet --sketch-dim 1024 --counts --blocks v5,shape  # per rule
    python scripts/profile_sketch.py --model timm-resnet --sketch-dim 1024 --ab-blocks v5,shape --reps 7  # whole step

``--blocks`` and ``--ab-blocks`` take a comma list of block rules: ``shape`` is the logger's own
(:func:`~gradcoh.logger.sketch.tensorsketch_blocks`: the fewest of 1, 2, 4 within the worst case), a number ``B``
averages ``B`` blocks for every view, ``v5`` the version-5 rule (4 blocks, its costs and choices: no fused-mode
credit in :func:`~gradcoh.logger.sketch.form_cost`; the hashes' injectivity does not change a route's cost). For a
comparison only: a store's projections follow the rule of the gradcoh that wrote it.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import gradcoh.logger.sketch as sketch
import torch
from bench_overhead import default_batch, make_zoo_case
from gradcoh.logger import GradientLogger, ghost
from gradcoh.logger.costs import SKETCH_COSTS

ROUTES = ("dense", "factored", "indexed")


def instrument(times: dict, names: dict) -> None:
    """Time each route of each projection class per call (nested calls charged to the outer one)."""
    current: list[tuple] = []

    def wrap(cls: type, route: str) -> None:
        fn = getattr(cls, route)

        @functools.wraps(fn)
        def timed(self, *a, **kw):
            if current:
                return fn(self, *a, **kw)
            x = a[0] if route == "dense" else a[1]
            form = ("dense", 1) if route == "dense" else (route, x.shape[1])
            key = (names.get(id(self), "?"), self.kind, form, (self.rows, self.cols), x.shape[0])
            current.append(key)
            start = time.thread_time()
            try:
                return fn(self, *a, **kw)
            finally:
                times[key] = times.get(key, 0.0) + time.thread_time() - start
                current.pop()

        setattr(cls, route, timed)

    for cls in sketch.PROJECTIONS.values():
        for route in ROUTES:
            wrap(cls, route)
    real_get = sketch.ProjectionTable.get

    def get(self, name, view, forms, device):
        proj = real_get(self, name, view, forms, device)
        names[id(proj)] = name
        return proj

    sketch.ProjectionTable.get = get


def run(args: argparse.Namespace, times: dict) -> tuple[list[dict], float, int]:
    """Per-step route times of ``args.steps`` logged steps (after one warm-up) and the median plain step (ms)."""
    batch = args.batch or default_batch(args.model)
    case = make_zoo_case(args.model, batch, 0, "cpu")
    model, loss = case["models"]["default"], case["loss"]
    per_step, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        glog = GradientLogger(model, Path(tmp) / "p.zarr", sketch_dim=args.sketch_dim, mode="overwrite")
        for step in range(args.steps + 1):
            model.zero_grad(set_to_none=True)
            start = time.thread_time()
            loss(model, case["batch"]).mean().backward()
            plain.append(time.thread_time() - start)
            model.zero_grad(set_to_none=True)
            times.clear()
            with glog.record(step):
                loss(model, case["batch"]).mean().backward()
            glog.flush()
            if step:
                per_step.append(dict(times))
        glog.close()
    return per_step, statistics.median(plain[1:]) * 1e3, batch


def modelled_ms(kind: str, view: tuple[int, int], k: int, form: tuple, n: int) -> float:
    return sketch.PROJECTIONS[kind].cost(view, k, form) * n * 1e-6


def report(args: argparse.Namespace, per_step: list[dict], plain_ms: float, batch: int) -> None:
    keys = per_step[-1].keys()
    med = {key: statistics.median(s.get(key, 0.0) for s in per_step) * 1e3 for key in keys}
    rows = sorted(med.items(), key=lambda kv: -kv[1])
    k = args.sketch_dim
    by_kind: dict[tuple, list[float]] = {}
    for (_, kind, form, view, n), ms in rows:
        agg = by_kind.setdefault((kind, form[0]), [0, 0.0, 0.0])
        agg[0] += 1
        agg[1] += ms
        agg[2] += modelled_ms(kind, view, k, form, n)
    total, model_total = sum(med.values()), sum(a[2] for a in by_kind.values())
    print(f"# {args.model}, batch {batch}, k {k}: sketch {total:.1f} ms/step (modelled {model_total:.1f}) against a "
          f"plain step of {plain_ms:.1f} ms ({total / plain_ms:.3f}x); thread CPU, load {os.getloadavg()[0]:.2f}")
    print("| kind | route | params | measured ms | modelled ms |\n|---|---|---:|---:|---:|")
    for (kind, route), (count, ms, modelled) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"| {kind} | {route} | {count} | {ms:.1f} | {modelled:.1f} |")
    print("\n| parameter | kind | route | T | view | n | measured ms | modelled ms | other kind modelled |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|")
    for (name, kind, form, view, n), ms in rows[: args.top]:
        others = [f"{o}: {modelled_ms(o, view, k, form, n):.1f}" for o, c in sketch.PROJECTIONS.items()
                  if o != kind and c.applies(view, k)]
        print(f"| {name} | {kind} | {form[0]} | {form[1]} | {view[0]}×{view[1]} | {n} | {ms:.2f} | "
              f"{modelled_ms(kind, view, k, form, n):.2f} | {', '.join(others)} |")


def check_choice(args: argparse.Namespace) -> None:
    """For every factored per-example gradient of one logged step: both classes' factored routes timed on random
    factors of its shapes (fastest of ``--reps``, interleaved, thread CPU time) against the kind the cost model
    chose; with ``--blocks``, the TensorSketch mean once per number of blocks (the choice at the current count)."""
    seen, batch = first_step_forms(args)
    if args.whole:
        check_whole(args, seen, batch)
        return
    k, gen = args.sketch_dim, torch.Generator().manual_seed(0)
    blocks = args.blocks.split(",") if args.blocks else ["shape"]
    forms = {(view, t): kind for (_, view), (kind, fs) in seen.items() for route, t in fs
             if route == "factored" and min(view) > 1 and view[0] * view[1] > k}
    ts = [f"tensorsketch B={b}" for b in blocks]
    print(f"# {args.model}, batch {batch}, k {k}: factored forms, fastest of {args.reps} (ms thread CPU; model)")
    print(f"| view | T | chosen | countsketch | {' | '.join(ts)} | cheaper measured |")
    print(f"|---|---:|---|---:|{'---:|' * len(ts)}---|")
    for ((rows, cols), t), kind in sorted(forms.items()):
        u, v = torch.randn(batch, t, rows, generator=gen), torch.randn(batch, t, cols, generator=gen)
        projs, model_ms = {}, {}
        for name, b in [("countsketch", blocks[0]), *zip(ts, blocks, strict=True)]:
            set_blocks(b)
            cls = sketch.CountSketch if name == "countsketch" else sketch.TensorSketchMean
            projs[name] = (cls(0, "w", (rows, cols), k), b)
            model_ms[name] = modelled_ms(cls.kind, (rows, cols), k, ("factored", t), batch)
        best = dict.fromkeys(projs, float("inf"))
        for _ in range(args.reps):
            for name, (proj, b) in projs.items():
                set_blocks(b)
                start = time.thread_time()
                proj.factored(u, v)
                best[name] = min(best[name], (time.thread_time() - start) * 1e3)
        set_blocks(blocks[0])
        fastest = min(best, key=best.get)
        cells = " | ".join(f"{best[name]:.2f} ({model_ms[name]:.2f})" for name in projs)
        print(f"| {rows}×{cols} | {t} | {kind} | {cells} | {fastest} |")


def check_whole(args: argparse.Namespace, seen: dict, batch: int) -> None:
    """:func:`check_choice` for what :func:`~gradcoh.logger.sketch.form_cost` weighs: each class's sketch *with* the
    exact statistics' route it implies, per factored parameter, on random factors of its shapes and layout.

    TensorSketch mean: the ghost norm (:func:`gradcoh.logger.ghost.sq_norms`; a convolution whose rule takes the norm
    from the input map's Gram pays less) and the factored route. CountSketch: materialising (one batched GEMM), the
    squared norms and the dense route; "fused" also subtracts what a fused call spares (autograd's weight-gradient
    GEMM, less the slot's sum), which at level ``"auto"`` only Linear calls and first convolutions get, while
    ``form_cost`` credits it to every form with ``T ≥ 20``. Convolutions' factors are given their rule's layout (the
    patches' transposed storage, which the sketch copies). Fastest of ``--reps``, interleaved, thread CPU (ms)."""
    k, gen = args.sketch_dim, torch.Generator().manual_seed(0)
    model = make_zoo_case(args.model, batch, 0, "cpu")["models"]["default"]
    modules = dict(model.named_modules())
    print(f"# {args.model}, batch {batch}, k {k}: factored forms with the exact statistics' route, fastest of "
          f"{args.reps} (ms thread CPU; model, load {os.getloadavg()[0]:.2f})")
    print("| parameter | view | T | chosen | tensorsketch + ghost norm | countsketch + materialise | "
          "countsketch, fused | cheaper measured (unfused) |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    slower, lost = 0, 0.0
    for (name, (rows, cols)), (kind, forms) in sorted(seen.items(), key=lambda kv: kv[0][0]):
        ts_forms = [t for route, t in forms if route == "factored" and t > 1]
        if len(ts_forms) != 1 or len(forms) != 1 or not sketch.TensorSketchMean.applies((rows, cols), k):
            continue
        t = ts_forms[0]
        conv = isinstance(modules.get(name.rpartition(".")[0]), torch.nn.modules.conv._ConvNd)
        if conv:  # the rules' layout: [n, C, T] storage viewed [n, T, C]
            u = torch.randn(batch, rows, t, generator=gen).transpose(1, 2)
            v = torch.randn(batch, cols, t, generator=gen).transpose(1, 2)
        else:
            u, v = torch.randn(batch, t, rows, generator=gen), torch.randn(batch, t, cols, generator=gen)
        best = _whole_times(u, v, k, args.reps)
        model_ms = {c.kind: sketch.form_cost(c, (rows, cols), k, ("factored", t)) * batch * 1e-6
                    for c in (sketch.TensorSketchMean, sketch.CountSketch)}
        fused = best["cs"] - max(0.0, best["spared"] - best["slot"])
        cheaper = "tensorsketch" if best["ts"] < best["cs"] else "countsketch"
        if cheaper != kind:
            slower += 1
            lost += abs(best["ts"] - best["cs"])
        print(f"| {name}{' (conv)' if conv else ''} | {rows}×{cols} | {t} | {kind} | {best['ts']:.2f} "
              f"({model_ms['tensorsketch']:.2f}) | {best['cs']:.2f} ({model_ms['countsketch']:.2f}) | {fused:.2f} | "
              f"{cheaper} |")
    print(f"\n{slower} parameters chose the class measured dearer without fusing, {lost:.1f} ms per step in all")


def _whole_times(u: torch.Tensor, v: torch.Tensor, k: int, reps: int) -> dict[str, float]:
    """Fastest of ``reps`` (ms, thread CPU, interleaved) for :func:`check_whole`: ``ts`` (ghost norm + TensorSketch
    mean), ``cs`` (materialise + norms + CountSketch), ``spared`` (autograd's weight GEMM), ``slot`` (a slot's sum)."""
    batch, _, rows = u.shape
    cols = v.shape[2]
    ts = sketch.TensorSketchMean(0, "w", (rows, cols), k)
    cs = sketch.CountSketch(0, "w", (rows, cols), k)
    step = max(1, sketch.MATERIALISE_ELEMENTS // (rows * cols))

    def ts_whole() -> None:
        ghost.sq_norms(u, v)
        ts.factored(u, v)

    def cs_whole() -> None:
        for i in range(0, batch, step):
            m = torch.bmm(u[i : i + step].transpose(1, 2), v[i : i + step])
            m.pow(2).sum((1, 2))
            cs.dense(m)

    fns = {"ts": ts_whole, "cs": cs_whole,
           "spared": lambda: torch.mm(u.reshape(-1, rows).T, v.reshape(-1, cols)),
           "slot": lambda: torch.empty(batch, rows, cols).sum(0)}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.thread_time()
            fn()
            best[key] = min(best[key], (time.thread_time() - start) * 1e3)
    return best


def first_step_forms(args: argparse.Namespace) -> tuple[dict, int]:
    """``{(name, view): (kind, forms)}`` as :func:`~gradcoh.logger.sketch.choose_projection` saw them at the first
    logged step of a zoo model, and the batch."""
    seen: dict[tuple, tuple] = {}
    real = sketch.choose_projection
    real_get = sketch.ProjectionTable.get

    def get(self, name, view, forms, device):
        kind = self.kinds.get(name) or real(view, self.dim, forms)
        seen[(name, view)] = (kind, list(forms))
        return real_get(self, name, view, forms, device)

    sketch.ProjectionTable.get = get
    batch = args.batch or default_batch(args.model)
    case = make_zoo_case(args.model, batch, 0, "cpu")
    model, loss = case["models"]["default"], case["loss"]
    with tempfile.TemporaryDirectory() as tmp:
        glog = GradientLogger(model, Path(tmp) / "p.zarr", sketch_dim=args.sketch_dim, mode="overwrite")
        with glog.record(0):
            loss(model, case["batch"]).mean().backward()
        glog.close()
    sketch.ProjectionTable.get = real_get
    return seen, batch


_SHAPE_RULE = sketch.tensorsketch_blocks
_FUSED_SUM_NS = sketch.FUSED_SUM_NS


def set_blocks(blocks: str) -> None:
    """Average TensorSketches by the rule ``blocks`` from now on (hashes, routes and the cost model): ``"shape"``,
    the logger's own, a number ``B`` for every view, or ``"v5"``: 4 for every view and no fused-mode credit in
    :func:`~gradcoh.logger.sketch.form_cost` (the choices of sketch version 5) — for comparisons only."""
    sketch.FUSED_SUM_NS = math.inf if blocks == "v5" else _FUSED_SUM_NS
    fixed = 4 if blocks == "v5" else (0 if blocks == "shape" else int(blocks))
    sketch.tensorsketch_blocks = _SHAPE_RULE if not fixed else (lambda view, dim: fixed)


def counts(args: argparse.Namespace) -> None:
    """The operations that bound a logged step's sketch: scattered adds, real FFTs of size k, and the multiply-adds
    of materialising factored gradients for a CountSketch (forms as the first step's choice saw them). With
    ``--blocks``, for each number of TensorSketch blocks, the kinds re-chosen from the same forms, and the
    parameters whose kind differs from the first."""
    seen, n = first_step_forms(args)
    blocks = args.blocks.split(",") if args.blocks else ["shape"]
    first = None
    for b in blocks:
        set_blocks(b)
        kinds = {key: sketch.choose_projection(key[1], args.sketch_dim, forms) for key, (_, forms) in seen.items()}
        count_kinds(args, {key: (kinds[key], forms) for key, (_, forms) in seen.items()}, n, b)
        if first is None:
            first = kinds
            continue
        changed = [f"{name} {view[0]}×{view[1]} T={','.join(str(t) for _, t in seen[(name, view)][1])}: "
                   f"{first[(name, view)]} → {kind}"
                   for (name, view), kind in kinds.items() if kind != first[(name, view)]]
        print(f"# B = {b}: {len(changed)} parameters change kind" + "".join(f"\n#   {c}" for c in changed))


def count_kinds(args: argparse.Namespace, seen: dict, n: int, blocks: str) -> None:
    """Print the counts of one choice ``{(name, view): (kind, forms)}`` with the block rule ``blocks`` in force."""
    k = args.sketch_dim
    tally: dict[str, float] = {"countsketch scattered adds": 0.0, "countsketch materialise multiply-adds": 0.0,
                               "tensorsketch scattered adds": 0.0, "tensorsketch FFTs (size k)": 0.0}
    for (_, (rows, cols)), (kind, forms) in seen.items():
        for route, t in forms:
            if kind == "countsketch":
                tally["countsketch scattered adds"] += n * (t * cols if route == "indexed" else rows * cols)
                if route == "factored":
                    tally["countsketch materialise multiply-adds"] += n * t * rows * cols
                continue
            b = sketch.tensorsketch_blocks((rows, cols), k)
            if route == "factored":
                tally["tensorsketch scattered adds"] += b * n * t * (rows + cols)
                tally["tensorsketch FFTs (size k)"] += 2 * b * n * t + n
            elif route == "indexed":
                tally["tensorsketch scattered adds"] += b * n * t * (cols + k)
                tally["tensorsketch FFTs (size k)"] += b * n * t
            else:
                tally["tensorsketch scattered adds"] += b * n * (rows * cols + 3 * rows * k)
    parts = "; ".join(f"{key} {value / 1e6:.3g} M" for key, value in tally.items())
    print(f"# {args.model}, batch {n}, k {k}, B {blocks}: {parts}")
    # The same counts weighed with the fixed SKETCH_COSTS: the sketch's modelled increment over the exact step. A
    # CountSketch's factored forms are materialised by the mixed rule where that is cheaper with the sketch, which
    # spares the ghost norm the exact step computes (T²·(rows + cols) multiply-adds per example, T > 1).
    c = SKETCH_COSTS
    saved = sum(n * t * t * (rows + cols) for (_, (rows, cols)), (kind, forms) in seen.items()
                for route, t in forms if kind == "countsketch" and route == "factored" and t > 1)
    ms = {"scatter": c.scatter * (tally["countsketch scattered adds"] + tally["tensorsketch scattered adds"]),
          "materialise": c.gemm * tally["countsketch materialise multiply-adds"],
          "ghost norms spared": -c.gemm * saved,
          "FFT": c.fft * k * math.log2(k) * tally["tensorsketch FFTs (size k)"]}
    total = sum(ms.values()) * 1e-6
    line = ", ".join(f"{key} {value * 1e-6:+.1f}" for key, value in ms.items())
    bound = f" = {total / args.plain_ms:.2f}× of a {args.plain_ms:.0f} ms plain step" if args.plain_ms else ""
    print(f"# modelled increment (SKETCH_COSTS, ms per step): {line}; total {total:.1f}{bound}")


def ab_blocks(args: argparse.Namespace) -> None:
    """Whole logged steps, interleaved in one process: plain, exact, and one logger per number of TensorSketch
    blocks in ``--ab-blocks`` (each makes its choices and hashes with its own count at its first step). Medians over
    ``--reps`` steps after a warm-up, as × the plain step, in the main thread's CPU time (``time.thread_time``:
    other processes on a shared machine disturb it far less than wall time) and in wall time."""
    batch = args.batch or default_batch(args.model)
    case = make_zoo_case(args.model, batch, 0, "cpu")
    model, loss = case["models"]["default"], case["loss"]
    blocks = args.ab_blocks.split(",")
    methods: dict[str, str | int | None] = {"plain": None, "exact": 0,
                                            **{f"k{args.sketch_dim} B={b}": b for b in blocks}}
    times: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        logs = {m: GradientLogger(model, Path(tmp) / f"{i}.zarr", sketch_dim=args.sketch_dim if b else 0,
                                  mode="overwrite") for i, (m, b) in enumerate(methods.items()) if b is not None}
        for rep in range(args.reps + 1):
            for m, b in methods.items():
                model.zero_grad(set_to_none=True)
                if b:
                    set_blocks(b)
                wall, cpu = time.perf_counter(), time.thread_time()
                if b is None:
                    loss(model, case["batch"]).mean().backward()
                else:
                    with logs[m].record(rep):
                        loss(model, case["batch"]).mean().backward()
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                if b is not None:
                    logs[m].flush()  # the writer finishes outside the timed region
                if rep:
                    times[m][0].append(cpu)
                    times[m][1].append(wall)
        tensorsketches = {m: sum(p is not None and p.kind == "tensorsketch" for t in g.trackers for p in t.projectors)
                          for m, g in logs.items()}
        for g in logs.values():
            g.close()
    plain = [statistics.median(x) for x in times["plain"]]
    print(f"# {args.model}, batch {batch}, {args.reps} steps each, interleaved; plain {plain[0] * 1e3:.0f} ms thread "
          f"CPU, {plain[1] * 1e3:.0f} ms wall; load {os.getloadavg()[0]:.2f}")
    print("| method | thread CPU × plain | wall × plain | TensorSketch parameters |\n|---|---:|---:|---:|")
    for m in methods:
        if m != "plain":
            cpu, wall = (statistics.median(x) / p for x, p in zip(times[m], plain, strict=True))
            print(f"| {m} | {cpu:.2f} | {wall:.2f} | {tensorsketches[m]} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="timm-resnet")
    ap.add_argument("--sketch-dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--check-choice", action="store_true", help="time both classes on every factored form")
    ap.add_argument("--whole", action="store_true",
                    help="with --check-choice: each class with the exact statistics' route it implies")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--counts", action="store_true", help="operation counts of the first step's sketch")
    ap.add_argument("--plain-ms", type=float, default=0.0, help="with --counts: a plain step (ms) to divide by")
    ap.add_argument("--blocks", default="",
                    help="with --counts or --check-choice: comma list of block rules to compare ('shape', 'v5' or "
                         "B); alone: the rule of the per-parameter report")
    ap.add_argument("--ab-blocks", default="", help="whole-step A/B of these block rules, e.g. shape,4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.check_choice:
        check_choice(args)
        return
    if args.counts:
        counts(args)
        return
    if args.ab_blocks:
        ab_blocks(args)
        return
    if args.blocks:  # the per-parameter report under one block rule
        set_blocks(args.blocks)
    times: dict[tuple, float] = {}
    instrument(times, {})
    report(args, *run(args, times))


if __name__ == "__main__":
    main()
