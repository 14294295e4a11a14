"""m-coherence of a store on a local Dask cluster: the pattern to copy into your own scripts.

    python scripts/cluster_example.py runs/exp.zarr --workers 2

Dask's worker processes start with the ``spawn`` method and re-import the main module, so code that starts a
``LocalCluster`` (or ``gradcoh.analysis.connect(workers=N)``) must live in a file, under an
``if __name__ == "__main__":`` guard; piped into ``python -`` (a heredoc) it fails.
"""

from __future__ import annotations

import argparse

from gradcoh import analysis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stream", default="batch")
    args = parser.parse_args()
    with analysis.session(workers=args.workers):
        ds = analysis.open_store(args.store, stream=args.stream)
        result = analysis.m_coherence(ds).compute()
    for step, value in zip(result["step"].values, result.values, strict=True):
        print(int(step), f"{float(value):.6g}")


if __name__ == "__main__":
    main()
