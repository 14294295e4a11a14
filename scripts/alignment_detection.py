"""How well per-example alignment separates corrupted from clean examples over training (docs/reproduction.md).

Trains on digits with label noise, logging every step with ``alignment=True`` and a clean held-out reference set
(the same as ``gradcoh train --label-noise 0.3 --alignment --reference-size 256 --log-every 1``), then computes, per
epoch, the ROC AUC of three detectors of the corrupted examples (the store's ``group``) over every (step, example)
of that epoch in the batch stream:

* ``-alignment``: minus the cosine of g_i with the batch gradient G (low alignment → corrupted);
* ``-ref_alignment``: minus the cosine of g_i with the reference gradient R;
* ``loss``: the per-example training loss (the usual noisy-label heuristic).

    python scripts/alignment_detection.py --model mlp --epochs 30 --out runs/detect --markdown detect.md

Writes the store, a JSON of the table and the figure of ``gradcoh plot --kind alignment``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
from gradcoh import analysis
from gradcoh.analysis import plots
from gradcoh.logger.experiment import ExperimentConfig, run_experiment
from gradcoh.logger.experiment.datasets import DIGITS_TRAIN
from sklearn.metrics import roc_auc_score

DETECTORS = ("-alignment", "-ref_alignment", "loss")


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    ok = np.isfinite(score)
    truth, score = truth[ok], score[ok]
    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < truth.size else math.nan


def detection_table(store: Path, steps_per_epoch: int) -> list[dict]:
    """Per epoch: examples, corrupted share and the AUROC of each detector (batch stream)."""
    ds = analysis.open_store(store, stream="batch").load()
    scores = {
        "-alignment": -analysis.example_alignment(ds, per_layer=False).values,
        "-ref_alignment": -analysis.example_alignment(ds, per_layer=False, reference=True).values,
        "loss": ds["loss"].values.astype(np.float64),
    }
    valid = analysis.valid_examples(ds).values
    corrupted = ds["group"].values == 1
    epoch = ds["step"].values // steps_per_epoch
    rows = []
    for e in np.unique(epoch):
        sel = (epoch == e)[:, None] & valid
        truth = corrupted[sel]
        row = {"epoch": int(e), "examples": int(sel.sum()), "corrupted": float(truth.mean())}
        row |= {name: _auc(truth, s[sel]) for name, s in scores.items()}
        rows.append(row)
    return rows


def markdown(rows: list[dict], command: str, seconds: float) -> str:
    head = "| epoch | examples | corrupted | AUROC −alignment (batch G) | AUROC −alignment (reference R) | AUROC loss |"
    lines = [f"`{command}` ({seconds:.0f} s, {platform.processor() or platform.machine()})", "", head,
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['epoch']} | {r['examples']} | {r['corrupted']:.2f} | "
                     + " | ".join(f"{r[d]:.3f}" for d in DETECTORS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--label-noise", type=float, default=0.3)
    ap.add_argument("--reference-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/detect"))
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / f"{args.model}.zarr"
    cfg = ExperimentConfig(out=str(store), model=args.model, label_noise=args.label_noise, steps=None,
                           epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=0, lr_decay_epochs=(),
                           probe_size=0, log_every=1,
                           alignment=True, reference_size=args.reference_size, seed=args.seed, threads=1,
                           overwrite=True)
    start = time.perf_counter()
    run_experiment(cfg)
    seconds = time.perf_counter() - start
    rows = detection_table(store, math.ceil(DIGITS_TRAIN / args.batch_size))
    command = (f"python scripts/alignment_detection.py --model {args.model} --epochs {args.epochs:g} "
               f"--label-noise {args.label_noise:g} --reference-size {args.reference_size} --seed {args.seed}")
    text = markdown(rows, command, seconds)
    print(text)
    (args.out / f"{args.model}_detection.json").write_text(json.dumps(rows, indent=1))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    ds = analysis.open_store(store, stream="batch")
    data = {"with the batch gradient G": analysis.example_alignment(ds, per_layer=False),
            "with the reference gradient R": analysis.example_alignment(ds, per_layer=False, reference=True)}
    fig = plots.plot_alignment(analysis.compute(data), groups=[str(g) for g in ds["group_i"].values],
                               title=f"per-example alignment, {args.model} on digits, "
                                     f"{100 * args.label_noise:.0f}% label noise", stream="batch")
    plots.save_figure(fig, args.out / f"{args.model}_alignment.png")


if __name__ == "__main__":
    main()
