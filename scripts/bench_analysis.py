"""Analysis scaling on synthetic stores: O(m) m-coherence vs O(m²) pairwise metrics, throughput, 1 vs 2 workers.

For each m (examples per step) a synthetic store is written through the real writer path
(:mod:`make_synthetic_store`, fewer steps for larger m) and timed:

* ``mcoh_exact`` / ``mcoh_sketch``: :func:`gradcoh.analysis.m_coherence` (exact numerators; sketch numerators, which
  read the whole sketch array), per step;
* ``pairwise``: :func:`~gradcoh.analysis.pair_statistics` (the kernel behind stiffness and gradient confusion:
  every pair i<j, block-wise) on ``--pair-steps`` steps, per step;
* throughput: uncompressed bytes of the arrays an analysis reads, divided by its time, against plain
  zarr ``arr[:]`` read+decompress of the same arrays;
* 1 vs 2 local worker processes (``LocalCluster(threads_per_worker=1)``) on the largest store whose pairwise step
  fits ``--cluster-max-m``.

Example::

    python scripts/bench_analysis.py --ms 256,1024,4096,16384 --examples 32768 --out docs/bench_analysis.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dask
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gradcoh import analysis
from gradcoh.logger import schema
from make_synthetic_store import Spec, make_synthetic_store


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _raw_read(path: str, names: list[str]) -> tuple[float, int]:
    group = zarr.open_group(path, mode="r")[schema.STREAM_BATCH]
    committed = group.attrs[schema.COMMITTED_KEY]
    nbytes = sum(group[n][:committed].nbytes for n in names)
    return _timed(lambda: [group[n][:committed] for n in names]), nbytes


def bench_store(path: str, m: int, steps: int, pair_steps: int) -> dict:
    ds = analysis.open_store(path)
    exact_vars = [schema.SQ_NORM, schema.SUM_SQ_NORM, schema.N_EXAMPLES]
    sketch_vars = [schema.SQ_NORM, schema.SKETCH, schema.N_EXAMPLES]
    t_exact = _timed(lambda: analysis.m_coherence(ds).compute())
    t_sketch = _timed(lambda: analysis.m_coherence(ds, source="sketch").compute())
    raw_exact, bytes_exact = _raw_read(path, exact_vars)
    raw_sketch, bytes_sketch = _raw_read(path, sketch_vars)
    sub = ds.isel(step=slice(0, pair_steps))
    t_pair = _timed(lambda: analysis.pair_statistics(sub).compute(), repeat=1)
    mb = 2**20
    return {
        "m": m, "steps": steps, "pair_steps": pair_steps,
        "mcoh_exact_s_per_step": t_exact / steps,
        "mcoh_sketch_s_per_step": t_sketch / steps,
        "pairwise_s_per_step": t_pair / pair_steps,
        "exact_MBps": bytes_exact / t_exact / mb, "exact_raw_MBps": bytes_exact / raw_exact / mb,
        "sketch_MBps": bytes_sketch / t_sketch / mb, "sketch_raw_MBps": bytes_sketch / raw_sketch / mb,
        "exact_ratio": raw_exact / t_exact, "sketch_ratio": raw_sketch / t_sketch,
    }


def bench_workers(path: str, pair_steps: int) -> dict:
    from distributed import Client, LocalCluster

    out = {}
    ds = analysis.open_store(path)
    sub = ds.isel(step=slice(0, pair_steps))
    with dask.config.set({"distributed.worker.daemon": True}):
        for n in (1, 2):
            with (
                LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address="127.0.0.1:0") as cluster,
                Client(cluster),
            ):
                analysis.m_coherence(ds, source="sketch").compute()  # warm-up (imports on the workers)
                out[n] = {
                    "mcoh_sketch_s": _timed(lambda: analysis.m_coherence(ds, source="sketch").compute()),
                    "pairwise_s": _timed(lambda: analysis.pair_statistics(sub).compute(), repeat=1),
                }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default="256,1024,4096,16384")
    parser.add_argument("--examples", type=int, default=32768, help="examples per store (steps = examples / m)")
    parser.add_argument("--pair-steps", type=int, default=2)
    parser.add_argument("--cluster-m", type=int, default=4096, help="m of the store used for 1 vs 2 workers")
    parser.add_argument("--sketch-dim", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where stores go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="gradcoh-bench-"))
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "zarr": zarr.__version__, "dask": dask.__version__}, "stores": [], "workers": None}
    for m in (int(x) for x in args.ms.split(",")):
        steps = max(2, args.examples // m)
        path = str(workdir / f"syn-m{m}.zarr")
        spec = Spec(steps=steps, m=m, alpha=0.01, sketch_dim=args.sketch_dim, sketch_dtype="float16")
        write = make_synthetic_store(path, spec)
        row = bench_store(path, m, steps, min(args.pair_steps, steps))
        row["write_s"] = write["seconds"]
        row["mcoh_expected"] = write["m_coherence"]
        row["mcoh_measured"] = float(analysis.m_coherence(analysis.open_store(path)).mean())
        results["stores"].append(row)
        print(json.dumps(row), flush=True)
        if m == args.cluster_m:
            results["workers"] = bench_workers(path, min(args.pair_steps, steps))
            print(json.dumps(results["workers"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
