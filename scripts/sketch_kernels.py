"""The kernel floor of the sketches on one core: scattered adds and the projection routes at the zoo's shapes.

Times (CPU time of this thread, best of ``--reps``: robust to other processes on a shared machine) of

* ``--scatter``: the ways PyTorch offers to add ``n·P`` values into ``2k`` buckets per example (a CountSketch of a
  materialised gradient): ``scatter_add_`` with the hash broadcast over examples (what
  :class:`~gradcoh.logger.sketch.CountSketch` runs), ``index_add_`` along the entries, one flat ``index_add_``,
  ``put_(accumulate=True)``, a ``bincount`` per example, and a CSR matrix times the transposed gradients (with and
  without the transpose it needs);
* ``--routes``: each projection class's factored route and the CountSketch's dense route at the factored shapes of the
  zoo (``n, T, rows, cols``), next to the cost model (:meth:`~gradcoh.logger.sketch.Projection.cost` with the fixed
  :data:`~gradcoh.logger.costs.SKETCH_COSTS`).

    python scripts/sketch_kernels.py --scatter --routes --k 256,1024
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from gradcoh.logger.sketch import CountSketch, TensorSketchMean

ZOO_SHAPES = [(32, 16, 640, 160), (32, 4, 320, 1280), (32, 64, 80, 320),  # ConvNeXt-atto MLPs
              (16, 65, 768, 192), (16, 65, 576, 192), (16, 65, 192, 192),  # ViT-tiny fc1, qkv, proj
              (8, 128, 1024, 256), (8, 128, 256, 768),  # GPT-2 d256 MLP, attention
              (32, 16, 256, 2304), (32, 4, 512, 4608), (32, 64, 128, 1152)]  # ResNet-18 layer3, 4, 2 convs
"""``(n, T, rows, cols)`` of factored per-example gradients the zoo's logged steps sketch."""


def cpu_ms(fn: Callable[[], object], reps: int) -> float:
    """Best CPU time of this thread over ``reps`` calls after one warm-up, in ms."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best * 1e3


def scatter_row(n: int, p: int, k: int, reps: int, gen: torch.Generator) -> list[float]:
    """ns per added value of each way (the columns of :func:`scatter_table`) for one ``(n, P, k)``."""
    m = torch.randn(n, p, generator=gen)
    idx = torch.randint(0, 2 * k, (p,), generator=gen)
    flat = (idx + 2 * k * torch.arange(n).unsqueeze(1)).reshape(-1)
    sign = torch.where(idx < k, 1.0, -1.0)
    csr = torch.sparse_coo_tensor(torch.stack([idx % k, torch.arange(p)]), sign, (k, p)).to_sparse_csr()
    mt = m.T.contiguous()
    runs = [
        lambda: m.new_zeros((n, 2 * k)).scatter_add_(1, idx.expand(n, -1), m),
        lambda: m.new_zeros((n, 2 * k)).index_add_(1, idx, m),
        lambda: m.new_zeros(n * 2 * k).index_add_(0, flat, m.reshape(-1)),
        lambda: m.new_zeros(n * 2 * k).put_(flat, m.reshape(-1), accumulate=True),
        lambda: [torch.bincount(idx, weights=m[i], minlength=2 * k) for i in range(n)],
        lambda: csr @ mt,
        lambda: m.T.contiguous(),
    ]
    return [cpu_ms(fn, reps) * 1e6 / (n * p) for fn in runs]


def scatter_table(ks: list[int], reps: int) -> None:
    """ns per added value of each way to count ``n·P`` values into ``2k`` buckets per example."""
    print("| n | P | k | scatter_add_ | index_add_ (dim 1) | flat index_add_ | put_ | bincount per example "
          "| CSR @ Mᵀ (Mᵀ given) | transpose alone |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for n, p in [(32, 102400), (8, 262144), (16, 147456), (1024, 1024)]:
        for k in ks:
            cells = " | ".join(f"{value:.2f}" for value in scatter_row(n, p, k, reps, gen))
            print(f"| {n} | {p} | {k} | {cells} |", flush=True)


def route_row(shape: tuple[int, int, int, int], k: int, reps: int, gen: torch.Generator) -> str:
    """One row of :func:`routes_table`."""
    n, t, rows, cols = shape
    u, v = torch.randn(n, t, rows, generator=gen), torch.randn(n, t, cols, generator=gen)
    m = torch.bmm(u.transpose(1, 2), v)
    count, tensor = CountSketch(0, "w", (rows, cols), k), TensorSketchMean(0, "w", (rows, cols), k)
    model = [cls.cost((rows, cols), k, ("factored", t)) * n * 1e-6 for cls in (CountSketch, TensorSketchMean)]
    return (f"| {k} | {n}, {t}, {rows}, {cols} | {cpu_ms(lambda: count.factored(u, v), reps):.2f} ({model[0]:.2f}) "
            f"| {cpu_ms(lambda: count.dense(m), reps):.2f} "
            f"| {cpu_ms(lambda: tensor.factored(u, v), reps):.2f} ({model[1]:.2f}) |")


def routes_table(ks: list[int], reps: int) -> None:
    """ms of the factored routes of both classes and of the CountSketch's dense route, measured and modelled."""
    print("| k | n, T, rows, cols | CountSketch factored (model) | of which dense "
          "| TensorSketch mean factored (model) |")
    print("|---:|---|---:|---:|---:|")
    gen = torch.Generator().manual_seed(1)
    for k in ks:
        for shape in ZOO_SHAPES:
            print(route_row(shape, k, reps, gen), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scatter", action="store_true", help="ways to count n·P values into 2k buckets")
    ap.add_argument("--routes", action="store_true", help="projection routes at the zoo's factored shapes")
    ap.add_argument("--k", default="256,1024", help="comma list of sketch dimensions")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    ks = [int(k) for k in args.k.split(",")]
    if args.scatter or not args.routes:
        scatter_table(ks, args.reps)
    if args.routes:
        routes_table(ks, args.reps)


if __name__ == "__main__":
    main()
