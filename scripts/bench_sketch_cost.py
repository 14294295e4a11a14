"""What sketches add to a logged step, with today's projection routes and (optionally) an older sketch.py's, in one
process: plain, exact, and each sketch dimension with each route implementation, repetitions interleaved.

An A/B of route implementations on a shared, loaded machine needs both in the same process and interleaved: two
processes minutes apart saw their plain steps differ by 1.5× (docs/benchmarks.md, 2026-12-03). ``--before FILE``
loads an older ``logger/sketch.py`` (same hashes and classes; e.g. ``git show c3d778c:logger/sketch.py``) and, for
the steps of its loggers, installs its projection classes' methods in place of today's; each logger always runs with
the same implementation, so its projections are built and used by one version.

    git show c3d778c:logger/sketch.py > /tmp/sketch_before.py
    python scripts/bench_sketch_cost.py --models timm-resnet,timm-convnext --ks 256,1024 --reps 7 \\
        --before /tmp/sketch_before.py
    python scripts/bench_sketch_cost.py --routes --models timm-resnet --reps 5 --before /tmp/sketch_before.py

``--routes``: the kernels alone, per projection class and route, on random factors of the shapes of every form of
the first logged step (forms the mixed rule materialised are timed on the dense route; the materialisation that
``choose_route`` adds for a CountSketch is not in them).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import gradcoh.logger.sketch as sketch
import torch
from bench_overhead import GradcohMethod, default_batch, make_zoo_case, plain_step

CLASSES = ("CountSketch", "TensorSketchMean")


def methods_of(module) -> dict[str, dict[str, object]]:
    """The functions each projection class of ``module`` defines itself."""
    return {name: {k: v for k, v in vars(getattr(module, name)).items() if callable(v)} for name in CLASSES}


def load_before(path: Path):
    spec = importlib.util.spec_from_file_location("gradcoh.logger._sketch_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(impl: dict[str, dict[str, object]]) -> None:
    for cls_name, funcs in impl.items():
        cls = getattr(sketch, cls_name)
        for name, fn in funcs.items():
            setattr(cls, name, fn)


def bench_model(name: str, args: argparse.Namespace, tmp: Path, impls: dict) -> dict[str, list[float]]:
    batch = args.batch or default_batch(name)
    case = make_zoo_case(name, batch, 0, "cpu")
    model = case["models"]["default"]
    steps = {"plain": (plain_step(model, case), None)}
    steps["exact"] = (GradcohMethod(model, case, tmp / f"{name}_exact.zarr", {}), "after")
    for k in args.ks:
        for version in impls:
            steps[f"k{k} {version}"] = (GradcohMethod(model, case, tmp / f"{name}_{k}_{version}.zarr",
                                                      {"sketch_dim": k}), version)
    times: dict[str, list[float]] = {key: [] for key in steps}
    order = list(steps)
    for rep in range(args.warmup + args.reps):
        for key in order[rep % len(order):] + order[: rep % len(order)]:  # rotate who goes first
            step, version = steps[key]
            if version is not None:
                install(impls[version])
            start = time.perf_counter()
            step()
            spent = time.perf_counter() - start
            if rep >= args.warmup:
                times[key].append(spent)
    for step, version in steps.values():
        if version is not None:
            install(impls[version])
            step.close()
    install(impls["after"])
    return times


def bench_routes(name: str, args: argparse.Namespace, impls: dict) -> None:
    """Per form of a zoo model's first logged step (as the projection choice saw it), its chosen projection's route
    timed under each implementation (fastest of ``--reps``, interleaved), summed per route."""
    from profile_sketch import first_step_forms

    ns = argparse.Namespace(model=name, batch=args.batch, sketch_dim=0)
    gen = torch.Generator().manual_seed(0)
    for k in args.ks:
        ns.sketch_dim = k
        seen, n = first_step_forms(ns)
        totals: dict[tuple, dict[str, float]] = {}
        for (_, (rows, cols)), (kind, forms) in seen.items():
            for route, t in forms:
                if route == "indexed":
                    continue
                u, v = torch.randn(n, t, rows, generator=gen), torch.randn(n, t, cols, generator=gen)
                m = torch.bmm(u.transpose(1, 2), v) if route == "dense" else None
                best = dict.fromkeys(impls, float("inf"))
                projs = {}
                for version in impls:
                    install(impls[version])
                    projs[version] = sketch.Projection.create(0, "w", (rows, cols), k, kind)
                for _ in range(args.reps):
                    for version, proj in projs.items():
                        install(impls[version])
                        start = time.perf_counter()
                        proj.dense(m) if m is not None else proj.factored(u, v)
                        best[version] = min(best[version], time.perf_counter() - start)
                cell = totals.setdefault((kind, route), {"params": 0, **dict.fromkeys(impls, 0.0)})
                cell["params"] += 1
                for version in impls:
                    cell[version] += best[version] * 1e3
        install(impls["after"])
        for (kind, route), cell in sorted(totals.items()):
            times = " | ".join(f"{cell[v]:.1f}" for v in impls)
            print(f"| {name} | {k} | {kind} | {route} | {cell['params']} | {times} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="timm-resnet")
    ap.add_argument("--ks", default="256,1024")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", type=Path, default=None, help="an older logger/sketch.py to compare with")
    ap.add_argument("--after-first", action="store_true", help="create today's loggers before the older ones")
    ap.add_argument("--routes", action="store_true",
                    help="per route: the sketch kernels alone on each form of the first step (no training step)")
    args = ap.parse_args()
    args.ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    impls = {"after": methods_of(sketch)}
    if args.before is not None:
        before = {"before": methods_of(load_before(args.before))}
        impls = {**impls, **before} if args.after_first else {**before, **impls}
    with open("/proc/loadavg") as f:
        print(f"# load average at start: {' '.join(f.read().split()[:3])}")
    if args.routes:
        print("| model | k | kind | route | params | " + " | ".join(f"ms {v}" for v in impls) + " |")
        print("|---|---:|---|---|---:|" + "---:|" * len(impls))
        for name in args.models.split(","):
            bench_routes(name, args, impls)
        return
    print("| model | plain ms | exact | " + " | ".join(f"k{k} {v}" for k in args.ks for v in impls) + " |")
    print("|---|---:|---:|" + "---:|" * (len(args.ks) * len(impls)))
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            times = bench_model(name, args, Path(tmp), impls)
        med = {key: statistics.median(v) for key, v in times.items()}
        plain = med["plain"]
        cells = [f"{med['exact'] / plain:.2f}×"]
        for k in args.ks:
            for v in impls:
                extra = (med[f"k{k} {v}"] - med["exact"]) / plain
                cells.append(f"{med[f'k{k} {v}'] / plain:.2f}× ({extra:+.2f})")
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
        print(f"| {name} | {plain * 1e3:.0f} | " + " | ".join(cells) + f" |  load {load}", flush=True)


if __name__ == "__main__":
    main()
