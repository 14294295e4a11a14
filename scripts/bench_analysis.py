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

``--long`` (issue 28, long runs): one base store of ``--base-steps`` real steps is written through the writer, then
stores of ``--long-steps`` steps are assembled from it: arrays whose stored chunk holds fewer steps than the base
(the sketch, ``sq_norm``) get hard links to the base's chunk files, repeated (the real layout and file count, logical
size without the disk); the small arrays, whose one chunk holds many steps, are written for real, tiled from the base.
Every measurement runs in a fresh process (``--measure``), ``--repeat`` times, and the median is reported: open,
graph build, compute, tasks, peak RSS of exact m-coherence (whole batch and by group), the raw ``zarr`` read of the
same arrays, and the analysis as a percentage of that raw read; values are checked against NumPy.

Example::

    python scripts/bench_analysis.py --ms 256,1024,4096,16384 --examples 32768 --out docs/bench_analysis.json
    python scripts/bench_analysis.py --long --long-steps 800,10000,40000 --dir /work/tmp-bench
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

# make_synthetic_store (which imports torch) is imported where stores are written, so that a --measure process
# holds only what an analysis needs (its peak RSS is the analysis's).


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


# --- long runs (--long) -------------------------------------------------------------------------------------
def _link_store(base: Path, dst: Path, steps: int) -> None:
    """A ``steps``-step store from ``base`` (see ``--long`` in the module docstring)."""
    import numpy as np

    shutil.copytree(base, dst, ignore=shutil.ignore_patterns("c"))  # metadata and static arrays' folders
    for static in (p for p in base.rglob("c") if p.is_dir()):
        shutil.copytree(static, dst / static.relative_to(base))  # (replaced below for per-step arrays)
    src = zarr.open_group(str(base), mode="r")[schema.STREAM_BATCH]
    out = zarr.open_group(str(dst), mode="r+")[schema.STREAM_BATCH]
    committed = src.attrs[schema.COMMITTED_KEY]
    for name in [n for n in schema.VARIABLES if n in src]:
        arr, new = src[name], out[name]
        per = arr.chunks[0]
        new.resize((steps, *arr.shape[1:]))  # (deletes nothing we need: the chunks are rebuilt below)
        folder = dst / schema.STREAM_BATCH / name / "c"
        shutil.rmtree(folder, ignore_errors=True)
        full = committed // per
        if full >= 2:  # hard links to the base's whole chunks, cyclically
            files = [base / schema.STREAM_BATCH / name / "c" / str(i) for i in range(full)]
            for i in range(-(-steps // per)):
                target = folder / str(i)
                source = files[i % full]
                if source.is_dir():
                    for f in source.rglob("*"):
                        if f.is_file():
                            (target / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                            os.link(f, target / f.relative_to(source))
                else:
                    folder.mkdir(parents=True, exist_ok=True)
                    os.link(source, target)
        else:  # one chunk holds many steps: write the values for real
            values = np.arange(steps) if name == schema.STEP else np.resize(arr[:committed], (steps, *arr.shape[1:]))
            new[:] = values
    out.attrs[schema.COMMITTED_KEY] = steps


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (VmHWM: unlike ``ru_maxrss``, not carried over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(path: str, by: str | None) -> dict:
    """One fresh-process measurement of exact m-coherence on ``path`` (``--measure``)."""
    import numpy as np

    t0 = time.perf_counter()
    ds = analysis.open_store(path)
    t1 = time.perf_counter()
    coh = analysis.m_coherence(ds, by=by)
    t2 = time.perf_counter()
    tasks = len(coh.data.__dask_graph__())
    values = coh.values
    t3 = time.perf_counter()
    rss = _peak_rss_mb()
    group = zarr.open_group(path, mode="r")[schema.STREAM_BATCH]
    names = ([schema.SUM_SQ_NORM, schema.SQ_NORM_TOTAL] if by is None else [schema.GROUP_GRAM, schema.GROUP_SQ_NORM,
                                                                            schema.GROUP_COUNT])
    names += [schema.N_EXAMPLES, schema.FINITE, schema.RECONCILED]
    t4 = time.perf_counter()
    raw = {n: group[n][:] for n in names}
    t5 = time.perf_counter()
    sq = np.nan_to_num(group[schema.SQ_NORM][: min(200, values.shape[0])])  # NumPy check on the first steps
    k = sq.shape[0]
    if by is None:
        want = raw[schema.SUM_SQ_NORM][:k].sum(1) / sq.sum((1, 2))
    else:
        grp, gram = group[schema.GROUP][:k], raw[schema.GROUP_GRAM][:k]
        want = np.stack([gram[:, :, a, a].sum(1) / np.where((grp == a)[:, :, None], sq, 0).sum((1, 2))
                         for a in range(gram.shape[2])], axis=-1)
    return {"steps": ds.sizes[schema.DIM_STEP], "by": by, "open_s": t1 - t0, "build_s": t2 - t1,
            "compute_s": t3 - t2, "tasks": tasks, "peak_rss_MB": rss, "raw_read_s": t5 - t4,
            "raw_bytes": int(sum(v.nbytes for v in raw.values())),
            "max_rel_err": float(np.nanmax(np.abs(values[:k] - want) / np.abs(want)))}


def bench_cluster_ratio(path: str, repeat: int, steps: int | None = None) -> dict:
    """LocalCluster (2 worker processes × 1 thread, 4 GB each) against the threaded scheduler, interleaved.

    Each analysis runs alternately on both, ``repeat`` times after a warm-up; medians and their ratio. ``steps``:
    only the first steps of the store.
    """
    import statistics

    from distributed import Client, LocalCluster

    analyses = {"exact": {}, "by_group": {"by": "group"}, "sketch": {"source": "sketch"}}
    ds = analysis.open_store(path).isel(step=slice(0, steps)) if steps else analysis.open_store(path)
    times: dict[str, dict[str, list[float]]] = {name: {"threads": [], "cluster": []} for name in analyses}
    with (LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="4GB", dashboard_address="127.0.0.1:0")
          as cluster, Client(cluster, set_as_default=False) as client):
        for name, kw in analyses.items():
            for scheduler in ("threads", client):  # warm-up: imports on the workers, page cache
                analysis.m_coherence(ds, **kw).compute(scheduler=scheduler)
            for _ in range(repeat):
                for label, scheduler in (("threads", "threads"), ("cluster", client)):
                    start = time.perf_counter()
                    analysis.m_coherence(ds, **kw).compute(scheduler=scheduler)
                    times[name][label].append(time.perf_counter() - start)
    out = {}
    for name, t in times.items():
        threads, clus = statistics.median(t["threads"]), statistics.median(t["cluster"])
        out[name] = {"threads_s": threads, "cluster_s": clus, "cluster_over_threads": clus / threads}
    return out


def bench_long(workdir: Path, step_counts: list[int], base_steps: int, repeat: int, spec) -> list[dict]:
    """Stores of ``step_counts`` steps from one ``base_steps`` base; medians of ``repeat`` fresh processes."""
    import statistics
    import subprocess

    from make_synthetic_store import Spec, make_synthetic_store

    base = workdir / f"base-{base_steps}.zarr"
    if not base.exists():
        make_synthetic_store(str(base), Spec(**{**spec.__dict__, "steps": base_steps}))
    rows = []
    for steps in step_counts:
        path = workdir / f"long-{steps}.zarr"
        if not path.exists():
            _link_store(base, path, steps)
        for by in (None, "group"):
            runs = [json.loads(subprocess.run(
                [sys.executable, __file__, "--measure", str(path), "--by", by or "none"], check=True,
                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
                for _ in range(repeat)]
            row = {k: (statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k])
                   for k in runs[0]}
            row["logical_GB"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
            row["analysis_pct_of_raw_read"] = 100 * row["raw_read_s"] / row["compute_s"]
            row["runs"] = [{k: r[k] for k in ("open_s", "build_s", "compute_s")} for r in runs]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default="256,1024,4096,16384")
    parser.add_argument("--examples", type=int, default=32768, help="examples per store (steps = examples / m)")
    parser.add_argument("--pair-steps", type=int, default=2)
    parser.add_argument("--cluster-m", type=int, default=4096, help="m of the store used for 1 vs 2 workers")
    parser.add_argument("--sketch-dim", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where stores go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--long", action="store_true", help="long runs: steps up to 40k from hard-linked chunks")
    parser.add_argument("--long-steps", default="800,10000,40000")
    parser.add_argument("--base-steps", type=int, default=64)
    parser.add_argument("--long-m", type=int, default=512)
    parser.add_argument("--long-layers", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per measurement (median)")
    parser.add_argument("--cluster-ratio", default=None, metavar="STORE",
                        help="LocalCluster against the threaded scheduler on STORE (medians, interleaved)")
    parser.add_argument("--cluster-steps", type=int, default=None, help="--cluster-ratio on the first steps only")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--by", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, None if args.by == "none" else args.by)))
        return
    if args.cluster_ratio:
        print(json.dumps(bench_cluster_ratio(args.cluster_ratio, args.repeat, args.cluster_steps), indent=1))
        return
    from make_synthetic_store import Spec, make_synthetic_store

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="gradcoh-bench-"))
    if args.long:
        spec = Spec(m=args.long_m, layers=((4, 4),) * args.long_layers, sketch_dim=args.sketch_dim)
        rows = bench_long(workdir, [int(x) for x in args.long_steps.split(",")], args.base_steps, args.repeat, spec)
        if args.out:
            Path(args.out).write_text(json.dumps({"long": rows}, indent=1))
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
        return
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
