"""Where a zoo model's sketch time goes, per parameter: projection kind, route, shapes, measured and modelled ms.

Wraps the routes of every :class:`~gradcoh.logger.sketch.Projection` class and the materialisation of factored
gradients (:meth:`gradcoh.logger.grads.Factored.materialise`, which a CountSketch's factored route and the mixed
rule's choice pay for), runs a few logged steps of one zoo model and prints per parameter: kind, route, natural view,
positions ``T``, measured ms per step (median over steps) and the cost model's ms (:meth:`Projection.cost` with
:data:`~gradcoh.logger.costs.SKETCH_COSTS`, times ``n``).

    python scripts/profile_sketch.py --model timm-resnet --sketch-dim 256 --steps 3
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradcoh.logger.sketch as sketch  # noqa: E402
from bench_overhead import default_batch, make_zoo_case  # noqa: E402
from gradcoh.logger import GradientLogger  # noqa: E402

ROUTES = ("dense", "factored", "indexed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="timm-resnet")
    ap.add_argument("--sketch-dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    times: dict[tuple, float] = {}
    names: dict[int, str] = {}
    current: list[tuple] = []

    def wrap(cls: type, route: str) -> None:
        fn = getattr(cls, route)

        @functools.wraps(fn)
        def timed(self, *a, **kw):
            if current:  # nested (a factored route calling dense): charged to the outer call
                return fn(self, *a, **kw)
            if route == "dense":
                form = ("dense", 1)
                n = a[0].shape[0]
            else:
                form = (route, a[1].shape[1])
                n = a[1].shape[0]
            key = (names.get(id(self), "?"), self.kind, form, (self.rows, self.cols), n)
            current.append(key)
            start = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - start
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

    batch = args.batch or default_batch(args.model)
    case = make_zoo_case(args.model, batch, 0, "cpu")
    model, loss = case["models"]["default"], case["loss"]
    per_step: list[dict] = []
    plain: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        glog = GradientLogger(model, Path(tmp) / "p.zarr", sketch_dim=args.sketch_dim, mode="overwrite")
        for step in range(args.steps + 1):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss(model, case["batch"]).mean().backward()
            plain.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
            times.clear()
            with glog.record(step):
                loss(model, case["batch"]).mean().backward()
            glog.flush()
            if step:
                per_step.append(dict(times))
        glog.close()
    keys = per_step[-1].keys()
    med = {k: statistics.median(s.get(k, 0.0) for s in per_step) * 1e3 for k in keys}
    plain_ms = statistics.median(plain[1:]) * 1e3
    rows = sorted(med.items(), key=lambda kv: -kv[1])
    total = sum(med.values())
    model_total = 0.0
    by_kind: dict[tuple, list[float]] = {}
    for (name, kind, form, view, n), ms in rows:
        modelled = sketch.PROJECTIONS[kind].cost(view, args.sketch_dim, form) * n * 1e-6
        model_total += modelled
        agg = by_kind.setdefault((kind, form[0]), [0, 0.0, 0.0])
        agg[0] += 1
        agg[1] += ms
        agg[2] += modelled
    print(f"# {args.model}, batch {batch}, k {args.sketch_dim}: sketch {total:.1f} ms/step (modelled "
          f"{model_total:.1f}) against a plain step of {plain_ms:.1f} ms ({total / plain_ms:.3f}x)")
    print("| kind | route | params | measured ms | modelled ms |\n|---|---|---:|---:|---:|")
    for (kind, route), (count, ms, modelled) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"| {kind} | {route} | {count} | {ms:.1f} | {modelled:.1f} |")
    print("\n| parameter | kind | route | T | view | n | measured ms | modelled ms | other kind modelled |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|")
    for (name, kind, form, view, n), ms in rows[: args.top]:
        modelled = sketch.PROJECTIONS[kind].cost(view, args.sketch_dim, form) * n * 1e-6
        others = [f"{k}: {c.cost(view, args.sketch_dim, form) * n * 1e-6:.1f}" for k, c in sketch.PROJECTIONS.items()
                  if k != kind and c.applies(view, args.sketch_dim)]
        print(f"| {name} | {kind} | {form[0]} | {form[1]} | {view[0]}×{view[1]} | {n} | {ms:.2f} | {modelled:.2f} | "
              f"{', '.join(others)} |")


if __name__ == "__main__":
    main()
