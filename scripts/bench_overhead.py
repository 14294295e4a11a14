"""Step-time and memory overhead of gradcoh's logger against plain training and peer per-example-gradient tools.

One process, one model, batch and data per model for every method; repetitions are interleaved across methods after
a warm-up; we report the median step time, its ratio to the plain forward+backward, and the peak memory added by one
step, measured in a separate pass after all timings (CPU: RSS sampled by a thread; before that pass glibc's mmap
threshold is pinned with ``mallopt`` and the heap trimmed before each call, so freed tensors leave RSS; CUDA: the
caching allocator's peak). Timings run with the default allocator settings. The gradcoh step includes the whole
``record`` block (hooks, the packing, the one device→host copy and the queue put); the Zarr writing itself runs on
the logger's background thread.

    python scripts/bench_overhead.py --models cnn --batch 64 --json out.json   # overhead table
    python scripts/bench_overhead.py --writer                                    # writer throughput
    python scripts/bench_overhead.py --probe                                     # exact m-coherence, m=4096
    python scripts/bench_overhead.py --tiny                                      # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from gradcoh.logger import GradientLogger
from torch import nn

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the bench extra
    psutil = None

ALL_METHODS = ("plain", "gradcoh_exact", "gradcoh_k256", "gradcoh_k1024", "opacus_hooks", "opacus_ghost",
               "backpack_l2", "backpack_grad", "vmap", "naive_loop")
SLOW = {"opacus_hooks", "backpack_grad", "vmap", "naive_loop"}


# --- models ------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """3 conv + 2 linear, 32×32×3 input, 321,290 parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class SmallTransformer(nn.Module):
    """Linear input projection, ``nn.TransformerEncoder`` (batch_first, dropout 0), mean pool, linear head."""

    def __init__(self, d_in: int = 32, d: int = 128, layers: int = 2, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)).mean(1))


def resnet18(norm: str) -> nn.Module:
    """torchvision resnet18 (10 classes) with BatchNorm ("bn") or GroupNorm(32) ("gn"), no in-place ReLU."""
    layer = (lambda c: nn.GroupNorm(min(32, c), c)) if norm == "gn" else nn.BatchNorm2d
    model = torchvision.models.resnet18(num_classes=10, norm_layer=layer)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


def make_case(name: str, batch: int, seq: int, device: str, seed: int = 0) -> dict:
    """Model variants (the same weights where they share an architecture) and one fixed batch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "cnn":
        base = SmallCNN()
        x = torch.randn(batch, 3, 32, 32, generator=g)
        models = {"default": base, "peer": base}
        note = ""
    elif name == "resnet18":
        bn, gn = resnet18("bn"), resnet18("gn")
        bn.eval()  # gradcoh with running statistics: exact per example (train-mode BN couples the examples)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        models = {"default": bn, "peer": gn}
        note = ("plain and gradcoh use BatchNorm in eval mode (exact per-example values); Opacus, BackPACK, vmap and "
                "the naive loop use the GroupNorm(32) variant (the ratio is to a plain step of that variant)")
    elif name == "transformer":
        base = SmallTransformer()
        x = torch.randn(batch, seq, 32, generator=g)
        models = {"default": base, "peer": base}
        note = ""
    else:
        raise ValueError(f"unknown model {name!r}")
    y = torch.randint(0, 10, (batch,), generator=g)
    return {"models": {k: m.to(device) for k, m in models.items()}, "x": x.to(device), "y": y.to(device), "note": note}


# --- methods -----------------------------------------------------------------------------------------------
def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return step


class GradcohMethod:
    """One GradientLogger on its own store; each call is one recorded step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, store: Path, k: int,
                 drop_writes: bool = False) -> None:
        self.model, self.x, self.y = model, x, y
        self.glog = GradientLogger(model, store, every=1, sketch_dim=k, seed=0, loss_reduction="mean",
                                   mode="overwrite")
        if drop_writes:
            self.glog._writer.put = lambda stream, record: None
        self.step_no = 0
        self.index = torch.arange(x.shape[0])

    def __call__(self) -> None:
        self.model.zero_grad(set_to_none=True)
        with self.glog.record(self.step_no, index=self.index, labels=self.y):
            F.cross_entropy(self.model(self.x), self.y).backward()
        self.step_no += 1

    def close(self) -> None:
        self.glog.close()


def opacus_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ghost: bool) -> Callable[[], None]:
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    if ghost:
        gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=1.0,
                                                   use_ghost_clipping=True, loss_reduction="mean")

        def step() -> None:
            gsm.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y).backward()
            gsm.get_norm_sample()  # per-example norms (one backward; clipping would need a second one)
    else:
        gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")

        def step() -> None:
            gsm.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y).backward()
            torch.stack([p.grad_sample.flatten(1).pow(2).sum(1) for p in gsm.parameters()]).sum(0)

    step()  # fail here (not mid-timing) on unsupported models
    return step


def backpack_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: bool) -> Callable[[], None]:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, BatchL2Grad

    m = copy.deepcopy(model)
    try:
        m = extend(m)
        m(x)
    except Exception:  # residual connections etc. need the torch.fx converter
        m = extend(copy.deepcopy(model), use_converter=True)
    lossfunc = extend(nn.CrossEntropyLoss())
    ext = BatchGrad() if grad else BatchL2Grad()

    def step() -> None:
        m.zero_grad(set_to_none=True)
        with backpack(ext):
            lossfunc(m(x), y).backward()
        # Parameters of modules BackPACK does not support (e.g. GroupNorm) get no attribute: those are skipped.
        if grad:
            torch.stack([p.grad_batch.flatten(1).pow(2).sum(1) for p in m.parameters() if hasattr(p, "grad_batch")])
        else:
            torch.stack([p.batch_l2 for p in m.parameters() if hasattr(p, "batch_l2")]).sum(0)

    step()
    attr = "grad_batch" if grad else "batch_l2"
    missing = sum(p.numel() for p in m.parameters() if not hasattr(p, attr))
    step.note = f"{missing:,} parameters not covered (unsupported modules)" if missing else ""
    return step


def vmap_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))

    def step() -> None:
        g = per_sample(params, x, y)
        torch.stack([v.flatten(1).pow(2).sum(1) for v in g.values()]).sum(0)

    step()
    return step


def naive_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        sq = []
        for i in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            sq.append(sum(p.grad.pow(2).sum() for p in params))
        torch.stack(sq)

    return step


def build_method(name: str, case: dict, tmp: Path) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """(step, close) for one method; raises if the method does not support the model."""
    x, y = case["x"], case["y"]
    default, peer = case["models"]["default"], case["models"]["peer"]
    if name == "plain":
        return plain_step(default, x, y), None
    if name == "plain_peer":
        return plain_step(peer, x, y), None
    if name.startswith("gradcoh"):
        k = {"gradcoh_exact": 0, "gradcoh_k256": 256, "gradcoh_k1024": 1024}[name]
        method = GradcohMethod(default, x, y, tmp / f"{name}.zarr", k)
        return method, method.close
    if name.startswith("opacus"):
        return opacus_step(peer, x, y, ghost=name == "opacus_ghost"), None
    if name.startswith("backpack"):
        return backpack_step(peer, x, y, grad=name == "backpack_grad"), None
    if name == "vmap":
        return vmap_step(peer, x, y), None
    if name == "naive_loop":
        return naive_step(peer, x, y), None
    raise ValueError(f"unknown method {name!r}")


# --- measurement -------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class PeakRSS:
    """Samples the process RSS on a thread; ``peak - base`` is the memory one call added (CPU)."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def pin_malloc() -> None:
    """glibc: fixed mmap threshold (large blocks are unmapped on free, so RSS follows live memory)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def trim_malloc() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_memory_mb(fn: Callable[[], None], device: str) -> float | None:
    """Extra memory at the peak of one call, relative to just before it (gradients set to None first)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if psutil is None:
        return None
    trim_malloc()
    with PeakRSS() as p:
        fn()
    return (p.peak - p.base) / 2**20


def bench_model(model_name: str, methods: list[str], args: argparse.Namespace, tmp: Path) -> dict:
    batch = args.batch or {"cnn": 64, "resnet18": 32, "transformer": 32}[model_name]
    case = make_case(model_name, batch, args.seq, args.device)
    names = list(methods)
    if model_name == "resnet18" and any(m not in ("plain",) and not m.startswith("gradcoh") for m in names):
        names.insert(1, "plain_peer")
    steps, closers, results = build_steps(model_name, names, case, args, tmp)
    times = time_steps(steps, args)
    if args.device == "cpu" and sys.platform.startswith("linux"):
        pin_malloc()
    for name, step in steps.items():  # memory: one extra call per method, after timing
        step()  # settle allocations under the pinned allocator settings
        mem = peak_memory_mb(step, args.device)
        ts = times[name]
        results[name] = {"status": "ok", "median_s": statistics.median(ts), "min_s": min(ts), "reps": len(ts),
                         "peak_extra_mb": mem, "note": getattr(step, "note", "")}
    for close in closers:
        close()
    add_ratios(names, results)
    results = {n: results[n] for n in names}  # table order = method order, failures included
    n_params = sum(p.numel() for p in case["models"]["default"].parameters())
    return {"model": model_name, "batch": batch, "params": n_params, "note": case["note"], "methods": results}


def build_steps(model_name: str, names: list[str], case: dict, args: argparse.Namespace,
                tmp: Path) -> tuple[dict[str, Callable[[], None]], list, dict[str, dict]]:
    """Each method's step (warmed up), their closers, and the failures (a peer not supporting a model)."""
    steps: dict[str, Callable[[], None]] = {}
    closers = []
    results: dict[str, dict] = {}
    for name in names:
        try:
            step, close = build_method(name, case, tmp)
            for _ in range(args.warmup):
                step()
            steps[name] = step
            if close:
                closers.append(close)
        except Exception as err:  # record and go on: a peer not supporting a model is a result
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
            results[name] = {"status": f"failed: {reason}"}
            print(f"[{model_name}] {name}: failed: {reason}", file=sys.stderr, flush=True)
    return steps, closers, results


def time_steps(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Interleaved repetitions of every method's step."""
    times: dict[str, list[float]] = {n: [] for n in steps}
    budget = args.slow_reps if args.slow_reps else args.reps
    for rep in range(args.reps):
        for name, step in steps.items():
            if name in SLOW and rep >= budget:
                continue
            times[name].append(timed(step, args.device))
            if isinstance(step, GradcohMethod):
                # Let the background writer finish outside the timed region, so that its compression does not
                # land in the next method's step (the writer's own cost is measured by --writer).
                step.glog.flush()
    return times


def add_ratios(names: list[str], results: dict[str, dict]) -> None:
    """Time and memory ratios against the plain step (peers against their own plain model where needed)."""
    ref = {n: results.get("plain_peer" if n in PEER_METHODS and "plain_peer" in results else "plain") for n in names}
    for name in names:
        r, base = results[name], ref[name]
        if r["status"] == "ok" and base and base.get("status") == "ok":
            r["ratio"] = r["median_s"] / base["median_s"]
            if r["peak_extra_mb"] is not None and base["peak_extra_mb"]:
                r["mem_ratio"] = r["peak_extra_mb"] / base["peak_extra_mb"]


PEER_METHODS = {"opacus_hooks", "opacus_ghost", "backpack_l2", "backpack_grad", "vmap", "naive_loop", "plain_peer"}


# --- writer throughput ------------------------------------------------------------------------------------
def bench_writer(args: argparse.Namespace, tmp: Path) -> dict:
    """Batch 256 × 20 Linear layers × k=256 float16 sketches every step: real writer vs dropping the records."""
    torch.manual_seed(0)
    width, depth = args.writer_width, 20
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).to(args.device)
    x = torch.randn(args.writer_batch, width, device=args.device)
    y = torch.randint(0, 10, (args.writer_batch,), device=args.device)
    methods = {
        "plain": plain_step(model, x, y),
        "gradcoh_k256_write": GradcohMethod(model, x, y, tmp / "writer_on.zarr", 256),
        "gradcoh_k256_drop": GradcohMethod(model, x, y, tmp / "writer_drop.zarr", 256, drop_writes=True),
    }
    captured = {}
    on = methods["gradcoh_k256_write"]
    real_put = on.glog._writer.put

    def put(stream: str, record: object) -> None:
        captured.setdefault("record", record)
        real_put(stream, record)

    on.glog._writer.put = put
    for fn in methods.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(args.writer_steps):
        for name, fn in methods.items():
            times[name].append(timed(fn, args.device))
    t0 = time.perf_counter()
    on.glog.flush()
    drain_s = time.perf_counter() - t0
    for m in methods.values():
        if isinstance(m, GradcohMethod):
            m.close()
    rec = captured["record"]
    rec_bytes = sum(v.nbytes for v in vars(rec).values() if hasattr(v, "nbytes"))
    qsize = on.glog.config.queue_size
    med = {n: statistics.median(t) for n, t in times.items()}
    total_write_s = sum(times["gradcoh_k256_write"]) + drain_s
    return {
        "batch": args.writer_batch, "layers": depth, "width": width, "sketch_dim": 256, "steps": args.writer_steps,
        "median_s": med,
        "added_pct_vs_drop": 100 * (med["gradcoh_k256_write"] / med["gradcoh_k256_drop"] - 1),
        "ratio_write_to_plain": med["gradcoh_k256_write"] / med["plain"],
        "ratio_drop_to_plain": med["gradcoh_k256_drop"] / med["plain"],
        "final_flush_s": drain_s,
        "record_mb": rec_bytes / 2**20, "sketch_mb": rec.sketch.nbytes / 2**20, "queue_size": qsize,
        "queue_max_mb": qsize * rec_bytes / 2**20,
        "writer_mb_per_s": args.writer_steps * rec_bytes / 2**20 / total_write_s,
    }


# --- probe: exact m-coherence on m examples -----------------------------------------------------------------
def bench_probe(args: argparse.Namespace, tmp: Path) -> dict:
    from torch.func import functional_call, grad, vmap

    m, chunk = args.probe_m, 256
    torch.manual_seed(0)
    model = SmallCNN().to(args.device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, 3, 32, 32, generator=g).to(args.device)
    y = torch.randint(0, 10, (m,), generator=g).to(args.device)

    # gradcoh
    t0 = time.perf_counter()
    glog = GradientLogger(model, tmp / "probe.zarr", every=1, sketch_dim=0, loss_reduction="sum", mode="overwrite")
    captured = {}
    real_put = glog._writer.put

    def put(stream: str, record: object) -> None:
        captured[stream] = record
        real_put(stream, record)

    glog._writer.put = put
    if hasattr(glog, "probe"):
        api = "glog.probe"
        glog.probe(0, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"), batch_size=chunk, mode="eval")
    else:
        api = "emulated: glog.record(step, stream='probe') over micro-batches of 256, sum-reduced loss"
        with glog.record(0, index=torch.arange(m), labels=y, stream="probe"):
            for i in range(0, m, chunk):
                F.cross_entropy(model(x[i : i + chunk]), y[i : i + chunk], reduction="sum").backward()
    glog.close()
    t_gradcoh = time.perf_counter() - t0
    rec = captured.get("probe") or next(iter(captured.values()))
    coh_gradcoh = float(rec.sum_sq_norm.sum() / rec.sq_norm.sum())
    model.zero_grad(set_to_none=True)

    # vmap streaming reference
    t0 = time.perf_counter()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    S = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in params.items()}
    Q = torch.zeros((), dtype=torch.float64, device=args.device)
    for i in range(0, m, chunk):
        gs = per_sample(params, x[i : i + chunk], y[i : i + chunk])
        for k, gk in gs.items():
            gk = gk.to(torch.float64)
            S[k] += gk.sum(0)
            Q += gk.pow(2).sum()
    coh_ref = float(sum(s.pow(2).sum() for s in S.values()) / Q)
    _sync(args.device)
    t_ref = time.perf_counter() - t0
    return {"m": m, "chunk": chunk, "api": api, "gradcoh_s": t_gradcoh, "vmap_s": t_ref,
            "speedup": t_ref / t_gradcoh, "m_coherence_gradcoh": coh_gradcoh, "m_coherence_vmap": coh_ref,
            "rel_diff": abs(coh_gradcoh - coh_ref) / abs(coh_ref)}


# --- output ------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = []
    for res in report.get("overhead", []):
        lines += [f"### {res['model']} (batch {res['batch']}, {res['params']:,} params)", ""]
        if res["note"]:
            lines += [f"Note: {res['note']}.", ""]
        lines += ["| Method | Median step (ms) | × plain | Peak extra memory (MB) | Memory × plain | Reps |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in res["methods"].items():
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status'][:110]} | | | | |")
                continue
            mem = "n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
            lines.append(f"| {name} | {1e3 * r['median_s']:.1f} | {r.get('ratio', float('nan')):.2f} | {mem} | "
                         f"{r.get('mem_ratio', float('nan')):.2f} | {r['reps']} |"
                         + (f" {r['note']} |" if r.get("note") else ""))
        lines.append("")
    if "writer" in report:
        w = report["writer"]
        lines += ["### Writer throughput", "",
                  f"Batch {w['batch']} × {w['layers']} Linear({w['width']}) layers × k={w['sketch_dim']} float16 "
                  f"sketches every step, {w['steps']} steps.", "",
                  "| Variant | Median step (ms) |", "|---|---:|"]
        lines += [f"| {n} | {1e3 * t:.1f} |" for n, t in w["median_s"].items()]
        lines += ["", f"- added by the writer vs dropping the records: {w['added_pct_vs_drop']:+.1f}%",
                  f"- k=256 with writer / plain: {w['ratio_write_to_plain']:.2f}×; dropping / plain: "
                  f"{w['ratio_drop_to_plain']:.2f}×",
                  f"- record {w['record_mb']:.2f} MB/step (sketches {w['sketch_mb']:.2f} MB); queue_size "
                  f"{w['queue_size']} → at most {w['queue_max_mb']:.1f} MB queued",
                  f"- writer sustained ≥ {w['writer_mb_per_s']:.1f} MB/s (steps + final flush "
                  f"{w['final_flush_s']:.2f} s)", ""]
    if "probe" in report:
        p = report["probe"]
        lines += ["### Probe: exact m-coherence", "",
                  f"m = {p['m']} examples of the small CNN, chunks of {p['chunk']}; gradcoh via {p['api']}.", "",
                  "| Method | Wall (s) | m-coherence |", "|---|---:|---:|",
                  f"| gradcoh | {p['gradcoh_s']:.2f} | {p['m_coherence_gradcoh']:.6f} |",
                  f"| vmap streaming (float64 S, Q) | {p['vmap_s']:.2f} | {p['m_coherence_vmap']:.6f} |", "",
                  f"gradcoh is {p['speedup']:.2f}× faster; relative difference {p['rel_diff']:.1e}.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", default="cnn,resnet18,transformer")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--batch", type=int, default=0, help="batch for every model (default: cnn 64, others 32)")
    ap.add_argument("--seq", type=int, default=64, help="transformer sequence length")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--slow-reps", type=int, default=0, help="reps for the slow materialising methods (0: --reps)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--overhead", action="store_true", help="run the overhead table (default if no mode is given)")
    ap.add_argument("--writer", action="store_true", help="writer throughput mode")
    ap.add_argument("--writer-batch", type=int, default=256)
    ap.add_argument("--writer-width", type=int, default=64)
    ap.add_argument("--writer-steps", type=int, default=30)
    ap.add_argument("--probe", action="store_true", help="probe-mode m-coherence comparison")
    ap.add_argument("--probe-m", type=int, default=4096)
    ap.add_argument("--tiny", action="store_true", help="smoke run: cnn, batch 4, one rep")
    args = ap.parse_args(argv)
    if args.tiny:
        args.models, args.batch, args.reps, args.warmup, args.slow_reps = "cnn", 4, 1, 1, 1
        args.writer_batch, args.writer_steps, args.probe_m = 8, 2, 64
    if not (args.writer or args.probe):
        args.overhead = True
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    methods = [m for m in args.methods.split(",") if m]
    if args.tiny:
        have = {"opacus_hooks": "opacus", "opacus_ghost": "opacus", "backpack_l2": "backpack",
                "backpack_grad": "backpack"}
        methods = [m for m in methods if m not in have or _importable(have[m])]
    report: dict = {
        "argv": sys.argv, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": os.getloadavg(), "git": _git_state(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    with tempfile.TemporaryDirectory(prefix="gradcoh-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if args.overhead:
            report["overhead"] = []
            for model_name in [m for m in args.models.split(",") if m]:
                t0 = time.perf_counter()
                res = bench_model(model_name, methods, args, tmp)
                res["wall_s"] = time.perf_counter() - t0
                report["overhead"].append(res)
                print(markdown({"overhead": [res]}), flush=True)
        if args.writer:
            report["writer"] = bench_writer(args, tmp)
            print(markdown({"writer": report["writer"]}), flush=True)
        if args.probe:
            report["probe"] = bench_probe(args, tmp)
            print(markdown({"probe": report["probe"]}), flush=True)
    report["loadavg_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(report))
    return report


def _git_state() -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "logger"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (logger/ has uncommitted changes)" if dirty else "")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
