"""Sketch accuracy and cost versus k: the table in the README ("How to choose k").

For each model and k it logs one batch with float32 sketches under several seeds and reports, per layer type, the
standard deviation of ‖s_i‖²/‖g_i‖² − 1 (per example, over examples and seeds) and of ‖Σ s_i‖²/‖Σ g_i‖² − 1 (the
batch sum, over seeds), both in units of √(2/k) (a dense Gaussian projection's), the largest over layers; the
relative error of the sketch-based m-coherence (numerator ‖Σ s_i‖², exact denominator); and the step time relative
to the plain forward+backward.

    python scripts/sketch_accuracy.py --ks 256,1024,4096 --seeds 20 --out docs/sketch_accuracy.json

``--routes`` instead measures every route of every projection class directly (no model): per-example gradients
``Σ_t u_t v_tᵀ`` with T positions (T = 1: rank one, the TensorSketch mean's worst case), given to the projection
materialised (``dense``), as factors (``factored``) or as embedding rows (``indexed``); the same table of sd in
units of √(2/k), per example and for the batch sum, and the mean of ‖s‖²/‖g‖² − 1 (unbiasedness).

    python scripts/sketch_accuracy.py --routes --ks 256,1024 --seeds 40

``--zoo-costs`` logs one step of each zoo model (``bench_overhead.py`` sizes) and counts, from the cost model of
:mod:`gradcoh.logger.sketch`, what its sketches cost per step with the projection each parameter got, against a
CountSketch of every materialised per-example gradient (the route of sketch version 3 for every parameter with
several positions): scattered adds, FFT units ``k·log2 k`` and modelled milliseconds.

    python scripts/sketch_accuracy.py --zoo-costs llama,timm-resnet --ks 256,1024
"""

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from gradcoh.logger import GradientLogger
from torch import nn

p = argparse.ArgumentParser()
p.add_argument("--ks", default="64,256,1024,4096")
p.add_argument("--seeds", type=int, default=5)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--reps", type=int, default=5)
p.add_argument("--out", default=None)
p.add_argument("--routes", action="store_true", help="sd per projection class and route (no model)")
p.add_argument("--view", default="48x96", help="rows x cols of the --routes matrices (cols >= k: folded buckets)")
p.add_argument("--zoo-costs", default="", help="comma list of zoo models: modelled sketch cost per step")
args = p.parse_args()
torch.manual_seed(0)


def route_table(ks: list[int], seeds: int, n: int = 32, view: tuple[int, int] = (48, 96)) -> list[str]:
    """Markdown rows: kind, route, T, k, sd per example and of the batch sum in units of √(2/k), mean error."""
    from gradcoh.logger.grads import Factored
    from gradcoh.logger.sketch import KINDS, Projection

    rows_out = ["| projection | route | T | k | sd per example / √(2/k) | sd batch sum / √(2/k) | mean ‖s‖²/‖g‖² − 1 |",
                "|---|---|---:|---:|---:|---:|---:|"]
    rows, cols = view
    for kind in KINDS:
        for route in ("dense", "factored", "indexed"):
            for t in (1, 4, 64):
                gen = torch.Generator().manual_seed(t)
                v = torch.randn(n, t, cols, generator=gen, dtype=torch.float64)
                if route == "indexed":
                    form = Factored(None, v, rows_index=torch.randint(0, rows, (n, t), generator=gen), n_rows=rows)
                else:
                    form = Factored(torch.randn(n, t, rows, generator=gen, dtype=torch.float64), v)
                dense = form.materialise()
                flat = dense.m.reshape(n, -1)
                form = dense if route == "dense" else form
                norms, total = flat.square().sum(1), flat.sum(0).square().sum()
                for k in ks:
                    per, batch = [], []
                    for seed in range(seeds):
                        s_ = form.sketch(Projection.create(seed, "w", view, k, kind))
                        per.append((s_.square().sum(1) / norms - 1).numpy())
                        batch.append(float(s_.sum(0).square().sum() / total - 1))
                    per_a, unit = np.concatenate(per), np.sqrt(2 / k)
                    rows_out.append(f"| {kind} | {route} | {t} | {k} | {per_a.std() / unit:.2f} | "
                                    f"{np.std(batch) / unit:.2f} | {per_a.mean():+.4f} |")
    return rows_out


def zoo_costs(models: list[str], ks: list[int]) -> list[str]:
    """Markdown rows: model, k, per step: projections chosen, modelled ms now and with CountSketch everywhere."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_overhead import default_batch, make_zoo_case
    from gradcoh.logger import sketch as sk
    from gradcoh.logger.costs import SKETCH_COSTS

    out = ["| model | k | tensorsketch / countsketch parameters | modelled sketch ms/step | of which materialising "
           "factors | with CountSketch only |", "|---|---:|---:|---:|---:|---:|"]
    for name in models:
        for k in ks:
            case = make_zoo_case(name, default_batch(name), 0, "cpu")
            model, n = case["models"]["default"], default_batch(name)
            seen: dict[str, tuple] = {}
            get = sk.ProjectionTable.get

            def spy(self, pname, view, forms, device, get=get, seen=seen):
                proj = get(self, pname, view, forms, device)
                seen[pname] = (view, forms, proj.kind)
                return proj

            sk.ProjectionTable.get = spy
            try:
                store = Path(tempfile.mkdtemp()) / f"{name}-{k}.zarr"
                with GradientLogger(model, store, sketch_dim=k) as g:
                    with g.record(0):
                        case["loss"](model, case["batch"]).mean().backward()
            finally:
                sk.ProjectionTable.get = get
            now = sum(sk.PROJECTIONS[kind].cost(view, k, f) for view, forms, kind in seen.values() for f in forms)
            count = sum(sk.CountSketch.cost(view, k, f) for view, forms, _ in seen.values() for f in forms)
            mat = sum(SKETCH_COSTS.gemm * f[1] * view[0] * view[1] for view, forms, kind in seen.values()
                      for f in forms if kind == "countsketch" and f[0] == "factored")
            kinds = [kind for _, _, kind in seen.values()]
            out.append(f"| {name} | {k} | {kinds.count('tensorsketch')} / {kinds.count('countsketch')} | "
                       f"{now * n / 1e6:.1f} | {mat * n / 1e6:.1f} | {count * n / 1e6:.1f} |")
            print(out[-1], flush=True)
    return out


if args.zoo_costs:
    print("\n".join(zoo_costs(args.zoo_costs.split(","), [int(k) for k in args.ks.split(",")])))
    raise SystemExit

if args.routes:
    view = tuple(int(x) for x in args.view.split("x"))
    print(f"# every route, view {view}, 32 examples, {args.seeds} seeds")
    print("\n".join(route_table([int(k) for k in args.ks.split(",")], args.seeds, view=view)))
    raise SystemExit


def small_cnn():  # 3 conv + 2 linear, 32×32×3 (the benchmark model)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(), nn.Linear(256, 10))


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class Tiny(nn.Module):  # embedding + transformer encoder + head: sequence inputs
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


MODELS = {
    "cnn": (small_cnn, lambda b: torch.randn(b, 3, 32, 32)),
    "mlp": (mlp, lambda b: torch.randn(b, 64)),
    "transformer": (Tiny, lambda b: torch.randint(0, 100, (b, 16))),
}
ks = [int(k) for k in args.ks.split(",")]
results = {}
tmp = Path(tempfile.mkdtemp())
for name, (make, data) in MODELS.items():
    model = make()
    x, y = data(args.batch), torch.randint(0, 10, (args.batch,))
    types = {}
    for mod_name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            types[mod_name or "root"] = type(module).__name__
    per_k = {}
    for k in ks:
        per, total, coh_err = defaultdict(list), defaultdict(list), []
        for seed in range(args.seeds):
            path = tmp / f"{name}-{k}-{seed}.zarr"
            with GradientLogger(model, path, sketch_dim=k, seed=seed, sketch_dtype="float32", mode="overwrite") as g:
                with g.record(0):
                    F.cross_entropy(model(x), y).backward()
            model.zero_grad()
            ds = xr.open_zarr(path, group="batch", consolidated=False).load()
            s = ds.sketch.values[0].astype(np.float64)
            ratio = (s**2).sum(-1) / ds.sq_norm.values[0]  # [n, L]
            summed = (s.sum(0) ** 2).sum(-1) / ds.sum_sq_norm.values[0]  # [L]
            for j, layer in enumerate(ds.layer.values):
                per[(types.get(str(layer), "?"), j)].extend((ratio[:, j] - 1).tolist())
                total[(types.get(str(layer), "?"), j)].append(summed[j] - 1)
            exact = ds.sum_sq_norm.values[0].sum()
            est = sum(float((s[:, j].sum(0) ** 2).sum()) for j in range(s.shape[1]))
            coh_err.append(abs(est / exact - 1))
        unit = np.sqrt(2 / k)
        sd: dict[str, dict[str, float]] = {}
        for (kind, _), values in per.items():
            entry = sd.setdefault(kind, {"per_example": 0.0, "batch_sum": 0.0})
            entry["per_example"] = max(entry["per_example"], float(np.std(values) / unit))
        for (kind, _), values in total.items():
            sd[kind]["batch_sum"] = max(sd[kind]["batch_sum"], float(np.std(values) / unit))
        per_k[k] = {"sd_over_sqrt_2_over_k": sd, "coherence_rel_error": float(np.mean(coh_err))}
    # step time: plain vs exact vs each k (interleaved)
    loggers = {0: GradientLogger(model, tmp / f"{name}-t0.zarr", mode="overwrite")}
    for k in ks:
        loggers[k] = GradientLogger(model, tmp / f"{name}-t{k}.zarr", sketch_dim=k, mode="overwrite")
    times = defaultdict(list)
    for rep in range(args.reps + 1):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        times["plain"].append(time.perf_counter() - t0)
        for k, g in loggers.items():
            t0 = time.perf_counter()
            with g.record(rep):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad()
            times[k].append(time.perf_counter() - t0)
            g.flush()  # the background writer finishes outside the timed regions of the other methods
    for g in loggers.values():
        g.close()
    plain = statistics.median(times["plain"][1:])
    for k in ks:
        per_k[k]["step_ratio"] = statistics.median(times[k][1:]) / plain
    results[name] = {"exact_step_ratio": statistics.median(times[0][1:]) / plain, "k": per_k}
    print(name, json.dumps(results[name], indent=1))
if args.out:
    Path(args.out).write_text(json.dumps(results, indent=1))
