"""How probes of BatchNorm networks read: probe m-coherence under each probe mode, against a GroupNorm twin.

ResNet-18 (torchvision, CIFAR stem) and ``resnet18_gn`` (every BatchNorm a GroupNorm(32, C): no batch statistics) on
scikit-learn digits and on the synthetic set, with 0%, 50% and 100% of the labels re-drawn, several seeds. Each run
trains once with the ``gradcoh train`` defaults (SGD lr 0.02, momentum 0.9, batch 64, no augmentation, the paper's
Goyal et al. 2017 schedule: linear warmup over 5 epochs, /10 at epochs 30, 60, 80; ``--warmup-epochs 0`` for a
constant rate) and probes the
same fixed sample of m training examples at each probe step under every mode: ``constant`` (the probe sample's
BatchNorm statistics held constant, the default), ``eval`` (running statistics) and ``train`` (per-micro-batch
statistics with the gradient through them: contributions). Probes never disturb training, so the modes see the same
network at the same steps. The GroupNorm twin has one semantics (its probes are exact in any mode).

Writes ``docs/NAME.json`` (every value, after each run: an interrupted study resumes where it stopped),
``docs/figures/NAME.png`` and prints the markdown table and the verdicts used in ``docs/reproduction.md``
(NAME: ``--name``, default ``bn_probe_study_goyal``). The earlier 12-step constant-rate study is
``--name bn_probe_study --warmup-epochs 0 --steps 12 --datasets digits synthetic`` (its figure was saved as
``bn_probe_modes.png``). Sized for a shared 2-core CPU:

    OMP_NUM_THREADS=1 python scripts/bn_probe_study.py
    python scripts/bn_probe_study.py --seeds 0 --steps 8 --probe-size 32 --datasets synthetic --name smoke  # smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from gradcoh.logger import GradientLogger
from gradcoh.logger.config import PROBE_MODES
from gradcoh.logger.experiment.datasets import load_dataset
from gradcoh.logger.experiment.models import build_model
from gradcoh.logger.experiment.noise import corrupt_labels
from gradcoh.logger.experiment.schedule import GOYAL_DECAY_EPOCHS, GOYAL_WARMUP_EPOCHS, LRSchedule, steps_per_epoch

log = logging.getLogger("bn_probe_study")

NOISE = (0.0, 0.5, 1.0)
LABELS = {0.0: "real", 0.5: "50%", 1.0: "random"}
GN = "resnet18_gn"


@dataclass(frozen=True)
class Study:
    out: str = "runs/bn_probe_study"
    docs: str = "docs"
    name: str = "bn_probe_study_goyal"
    datasets: tuple[str, ...] = ("digits",)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 48
    probe_steps: tuple[int, ...] = (0, 3, 6, 12, 24, 47, 96, 144, 192)  # those before the last step, and the last
    probe_size: int = 48
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    warmup_epochs: float = GOYAL_WARMUP_EPOCHS
    lr_decay_epochs: tuple[float, ...] = GOYAL_DECAY_EPOCHS


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def one_run(study: Study, dataset: str, model_name: str, noise: float, seed: int) -> dict:
    """Train once; probe under every mode at each probe step. Returns {mode: [m-coherence per probe step]}."""
    torch.manual_seed(seed)
    data = load_dataset(dataset, None, seed=seed)
    labels, corrupted = corrupt_labels(data.targets, data.num_classes, noise, 1000 + seed)
    gen = torch.Generator().manual_seed(2000 + seed)
    probe = torch.randperm(len(data), generator=gen)[: study.probe_size].sort().values
    px, py, group = data.batch(probe), labels[probe], corrupted[probe].long()
    torch.manual_seed(3000 + seed)
    model = build_model(model_name, data.input_shape, data.num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=study.lr, momentum=study.momentum)
    schedule = LRSchedule.from_epochs(study.lr, steps_per_epoch(len(data), study.batch_size), study.warmup_epochs,
                                      study.lr_decay_epochs)
    modes = PROBE_MODES if model_name != GN else ("constant",)
    name = f"{dataset}-{model_name}-{100 * noise:.0f}-{seed}"
    loggers = {mode: GradientLogger(model, Path(study.out) / name / f"{mode}.zarr", every=10**9, mode="overwrite",
                                    probe_mode=mode, groups=("clean", "corrupted")) for mode in modes}
    order = torch.Generator().manual_seed(4000 + seed)
    batches = torch.randperm(len(data), generator=order).split(study.batch_size)
    values: dict[str, list[float]] = {mode: [] for mode in modes}
    for step in range(study.steps):
        idx = batches[step % len(batches)]
        F.cross_entropy(model(data.batch(idx)), labels[idx]).backward()
        for param_group in opt.param_groups:
            param_group["lr"] = schedule.at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in study.probe_steps:
            for mode, glog in loggers.items():
                glog.probe(step, px, py, ce, labels=py, group=group)
                values[mode].append(glog.last_coherence("probe"))
    for glog in loggers.values():
        glog.close()
    return {"values": values, "layers": layer_peaks(Path(study.out) / name / "constant.zarr")}


def layer_peaks(store: Path) -> dict[str, float]:
    """Peak probe m-coherence of the first convolution, a middle one and the classifier (constant mode)."""
    ds = xr.open_zarr(store, group="probe", consolidated=False)
    per_layer = ds.sum_sq_norm / ds.sq_norm.sum("example")
    return {layer: float(per_layer.sel(layer=layer).max()) for layer in ("conv1", "layer3.0.conv1", "fc")}


def summary(values: list[float], steps: tuple[int, ...]) -> dict:
    v = np.asarray(values)
    return {"step0": float(v[0]), "peak": float(v.max()), "peak_step": int(steps[int(v.argmax())]),
            "late": float(v[-1])}


def series_name(model: str, mode: str) -> str:
    return "GroupNorm twin" if model == GN else f"BatchNorm, {mode}"


def run_all(study: Study, results: Path) -> tuple[list[dict], float]:
    """Every run, saved to ``results`` after each one; runs already saved there for this study are kept (resume)."""
    saved = json.loads(results.read_text()) if results.exists() else {}
    rows = saved.get("rows", []) if saved.get("study") == json.loads(json.dumps(asdict(study))) else []
    wall = saved.get("wall_s", 0) if rows else 0
    done = {(r["dataset"], r["model"], r["noise"], r["seed"]) for r in rows}
    for dataset, model, noise, seed in itertools.product(study.datasets, ("resnet18", GN), NOISE, study.seeds):
        if (dataset, model, noise, seed) in done:
            continue
        start = time.perf_counter()
        res = one_run(study, dataset, model, noise, seed)
        for mode, vals in res["values"].items():
            rows.append({"dataset": dataset, "model": model, "mode": mode, "noise": noise, "seed": seed,
                         "values": vals, "layers": res["layers"], **summary(vals, study.probe_steps)})
        wall += time.perf_counter() - start
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({"study": asdict(study), "wall_s": round(wall), "rows": rows}, indent=1) + "\n")
        log.info("%s %s %.0f%% seed %d: %s (%.0f s)", dataset, model, 100 * noise, seed,
                 {k: round(v[-1], 2) for k, v in res["values"].items()}, time.perf_counter() - start)
    return rows, wall


def table(rows: list[dict]) -> str:
    """Markdown: one line per dataset × series × labels; each cell holds the seeds' values ``a / b / c``."""
    out = ["| data | network, probe mode | labels | step 0 | peak (step) | late |", "|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["dataset"], r["model"], r["mode"], r["noise"]) for r in rows)
    for dataset, model, mode, noise in keys:
        sel = [r for r in rows if (r["dataset"], r["model"], r["mode"], r["noise"]) == (dataset, model, mode, noise)]
        step0, late = (" / ".join(f"{r[key]:.2f}" for r in sel) for key in ("step0", "late"))
        peaks = " / ".join(f"{r['peak']:.2f} ({r['peak_step']})" for r in sel)
        out.append(f"| {dataset} | {series_name(model, mode)} | {LABELS[noise]} | {step0} | {peaks} | {late} |")
    return "\n".join(out)


def verdicts(rows: list[dict], study: Study) -> list[str]:
    """The paper's findings, checked per dataset × series over the seeds."""
    out = []
    early = [i for i, s in enumerate(study.probe_steps) if 0 < s <= 8]
    for key in dict.fromkeys((r["dataset"], r["model"], r["mode"]) for r in rows):
        sel = {(r["noise"], r["seed"]): r for r in rows if (r["dataset"], r["model"], r["mode"]) == key}
        real_above = sum(np.mean([sel[(0.0, s)]["values"][i] for i in early])
                         > np.mean([sel[(1.0, s)]["values"][i] for i in early]) for s in study.seeds)
        peak_above = sum(sel[(0.0, s)]["peak"] > 1.3 * sel[(1.0, s)]["peak"] for s in study.seeds)
        transient = sum(sel[(0.0, s)]["step0"] >= 2 * min(sel[(0.0, s)]["values"][1:]) for s in study.seeds)
        rise = sum(sel[(1.0, s)]["peak"] >= 2 * sel[(1.0, s)]["step0"] and sel[(1.0, s)]["peak_step"] > 0
                   for s in study.seeds)
        n = len(study.seeds)
        out.append(f"| {key[0]} | {series_name(key[1], key[2])} | {real_above}/{n} | {peak_above}/{n} | "
                   f"{transient}/{n} | {rise}/{n} |")
    head = ["| data | network, probe mode | real > random, mean of steps 1-8 | real peak ≥ 1.3 × random peak | "
            "initial transient (step 0 ≥ 2 × a later value, real) | random rises (peak ≥ 2 × step 0, later) |",
            "|---|---|---|---|---|---|"]
    return head + out


def layer_table(rows: list[dict]) -> str:
    out = ["| data | network | labels | conv1 | layer3.0.conv1 | fc |", "|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["dataset"], r["model"], r["noise"]) for r in rows if r["mode"] == "constant"):
        sel = [r for r in rows if (r["dataset"], r["model"], r["noise"]) == key and r["mode"] == "constant"]
        cells = [" / ".join(f"{r['layers'][layer]:.1f}" for r in sel) for layer in ("conv1", "layer3.0.conv1", "fc")]
        net = "GroupNorm twin" if key[1] == GN else "BatchNorm (constant)"
        out.append(f"| {key[0]} | {net} | {LABELS[key[2]]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def figure(rows: list[dict], study: Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(len(study.datasets), len(NOISE), figsize=(12, 3.6 * len(study.datasets)), sharex=True,
                             squeeze=False)
    styles = {("resnet18", "constant"): ("tab:blue", "-"), ("resnet18", "eval"): ("tab:orange", "--"),
              ("resnet18", "train"): ("tab:green", ":"), (GN, "constant"): ("tab:red", "-")}
    for i, dataset in enumerate(study.datasets):
        for j, noise in enumerate(NOISE):
            ax = axes[i][j]
            for (model, mode), (color, ls) in styles.items():
                sel = [r["values"] for r in rows if (r["dataset"], r["model"], r["mode"], r["noise"])
                       == (dataset, model, mode, noise)]
                if not sel:
                    continue
                v = np.asarray(sel)
                ax.plot(study.probe_steps, np.median(v, 0), color=color, ls=ls, marker="o", ms=3,
                        label=series_name(model, mode))
                ax.fill_between(study.probe_steps, v.min(0), v.max(0), color=color, alpha=0.15)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_title(f"{dataset}, {LABELS[noise]} labels", fontsize="medium")
            if j == 0:
                ax.set_ylabel(f"probe m-coherence (m = {study.probe_size})")
            if i == len(study.datasets) - 1:
                ax.set_xlabel("training step")
    axes[0][0].legend(fontsize="small")
    rate = f"lr warmup over {study.warmup_epochs:g} epochs" if study.warmup_epochs else "constant lr"
    fig.suptitle(f"ResNet-18 probes under each BatchNorm probe mode vs a GroupNorm twin ({rate}; median and range "
                 f"of {len(study.seeds)} seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(Study.datasets))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(Study.seeds))
    ap.add_argument("--steps", type=int, default=Study.steps)
    ap.add_argument("--probe-size", type=int, default=Study.probe_size)
    ap.add_argument("--out", default=Study.out)
    ap.add_argument("--docs", default=Study.docs)
    ap.add_argument("--name", default=Study.name, help="results docs/NAME.json, figure docs/figures/NAME.png")
    ap.add_argument("--warmup-epochs", type=float, default=Study.warmup_epochs)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    probe_steps = (*(s for s in Study.probe_steps if s < args.steps - 1), args.steps - 1)
    study = Study(out=args.out, docs=args.docs, name=args.name, datasets=tuple(args.datasets),
                  seeds=tuple(args.seeds), steps=args.steps, probe_steps=probe_steps, probe_size=args.probe_size,
                  warmup_epochs=args.warmup_epochs)
    docs = Path(study.docs)
    rows, wall = run_all(study, docs / f"{study.name}.json")
    figure(rows, study, docs / "figures" / f"{study.name}.png")
    print(f"wall time of the runs {wall:.0f} s\n\n{table(rows)}\n\n" + "\n".join(verdicts(rows, study))
          + f"\n\n{layer_table(rows)}")


if __name__ == "__main__":
    main()
