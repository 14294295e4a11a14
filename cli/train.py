"""``gradcoh train``: one training run with label noise, logged to a store (calls ``run_experiment``)."""

from __future__ import annotations

import enum
import logging
from typing import Annotated

import typer
from gradcoh.cli.errors import reported
from gradcoh.cli.options import ProgressOpt, want_progress

__all__ = ["Dataset", "Model", "Optimizer", "ProbeMode", "train"]

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130


class Dataset(enum.StrEnum):
    """Datasets (torchvision ones are read from --data-dir, never downloaded)."""

    digits = "digits"
    synthetic = "synthetic"
    mnist = "mnist"
    cifar10 = "cifar10"
    imagefolder = "imagefolder"


class Model(enum.StrEnum):
    """Models (random initialisation)."""

    mlp = "mlp"
    cnn = "cnn"
    resnet18 = "resnet18"
    resnet18_gn = "resnet18_gn"
    efficientnet_b0 = "efficientnet_b0"


class ProbeMode(enum.StrEnum):
    """How probes treat normalisation layers with batch statistics (``GradientLogger.probe(mode=...)``)."""

    constant = "constant"
    eval = "eval"
    train = "train"


PROBE_MODE_HELP = ("How probes normalise BatchNorm layers: constant (the probe sample's statistics held constant: "
                   "exact per-example gradients of the network as it trains), eval (running statistics) or train "
                   "(per-micro-batch statistics: contributions, not per-example gradients). Models without "
                   "BatchNorm are probed in eval mode either way (train: dropout on).")


PROBE_EVERY_HELP = ("Probe cadence in steps, or auto: about 40 probes over the run (every step for runs of up to "
                    "59 steps, then round(steps / 40)), so a short run gets a curve, not just its first and last "
                    "step. The last step is always probed.")


def probe_every_value(value: str) -> int | str:
    """``--probe-every``: ``"auto"`` or a positive integer (a usage error otherwise)."""
    if value == "auto":
        return value
    try:
        every = int(value)
    except ValueError:
        every = 0
    if every < 1:
        raise typer.BadParameter(f"{value!r} is neither auto nor an integer of at least 1")
    return every


WARMUP_HELP = ("Epochs of linear learning-rate warmup, from lr/W at step 0 to --lr at step W (W = the epochs in "
               "steps; an epoch is ceil(examples / batch size) steps: 24 for digits, 4 for synthetic at batch 64). "
               "Default 5: the schedule of Goyal et al. 2017 that the paper trained with; 0 starts at full --lr.")

DECAY_HELP = ("Epochs at which the learning rate is divided by 10, comma-separated, or none. Default 30,60,80: Goyal "
              "et al. 2017, the paper's schedule (runs shorter than 30 epochs never reach it).")


def decay_epochs_value(value: str) -> tuple[float, ...]:
    """``--lr-decay-epochs``: ``none`` or comma-separated non-negative epochs (a usage error otherwise)."""
    if value.strip().lower() in ("none", ""):
        return ()
    try:
        epochs = tuple(float(part) for part in value.split(","))
    except ValueError:
        epochs = (-1.0,)
    if any(e < 0 for e in epochs):
        raise typer.BadParameter(f"{value!r} is neither none nor comma-separated non-negative epochs (e.g. 30,60,80)")
    return epochs


class Optimizer(enum.StrEnum):
    """Optimizers."""

    sgd = "sgd"
    adam = "adam"


def train(
    out: Annotated[str, typer.Option("--out", "-o", help="Store to write (PATH.zarr).")],
    dataset: Annotated[Dataset, typer.Option("--dataset", help="Training data.")] = Dataset.digits,
    data_dir: Annotated[
        str | None, typer.Option("--data-dir", help="Root of mnist/cifar10/imagefolder data (nothing is downloaded).")
    ] = None,
    model: Annotated[Model, typer.Option("--model", help="Architecture.")] = Model.mlp,
    label_noise: Annotated[
        float, typer.Option("--label-noise", min=0.0, max=1.0, help="Fraction of labels re-drawn uniformly.")
    ] = 0.0,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Training steps (default 600).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Train this many epochs instead of --steps.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 0.02,
    optimizer: Annotated[Optimizer, typer.Option("--optimizer")] = Optimizer.sgd,
    momentum: Annotated[float, typer.Option("--momentum", min=0.0, help="SGD momentum.")] = 0.9,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", min=0.0, help=WARMUP_HELP)] = 5.0,
    lr_decay_epochs: Annotated[
        str, typer.Option("--lr-decay-epochs", parser=decay_epochs_value, metavar="E1,E2,...|none", help=DECAY_HELP)
    ] = "30,60,80",
    width: Annotated[int, typer.Option("--width", min=1, help="MLP hidden width (CNN channels: width/8).")] = 256,
    probe_size: Annotated[int, typer.Option("--probe-size", min=0, help="m of the fixed probe sample (0: off).")] = 512,
    probe_every: Annotated[
        str, typer.Option("--probe-every", parser=probe_every_value, metavar="auto|N", help=PROBE_EVERY_HELP)
    ] = "auto",
    probe_mode: Annotated[ProbeMode, typer.Option("--probe-mode", help=PROBE_MODE_HELP)] = ProbeMode.constant,
    log_every: Annotated[int, typer.Option("--log-every", min=0, help="Batch-stream cadence (0: off).")] = 10,
    sketch_dim: Annotated[int, typer.Option("--sketch-dim", min=0, help="Sketch width per layer (0: none).")] = 0,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="torch CPU threads (1 is fastest for tiny models).")
    ] = None,
    alignment: Annotated[bool, typer.Option(
        "--alignment", help="Store each example's alignment with its batch gradient (gradcoh examples).")] = False,
    reference_size: Annotated[int, typer.Option(
        "--reference-size", min=0, help="Clean held-out reference examples (test split) to align with (0: none).")
    ] = 0,
    reference_every: Annotated[int, typer.Option(
        "--reference-every", min=1, help="Recompute the reference gradient every N steps.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store.")] = False,
    progress: ProgressOpt = None,
) -> None:
    """Train a model with label noise and log per-example gradient statistics (batch and probe streams).

    Training follows the paper's recipe (Chatterjee & Zielinski §3): SGD with momentum 0.9, no augmentation, no
    weight decay, and the learning-rate schedule of Goyal et al. 2017 (linear warmup over 5 epochs, then divided by
    10 at epochs 30, 60, 80).
    """
    with reported():
        from gradcoh.logger.experiment import ExperimentConfig, run_experiment
        from gradcoh.logger.store import StoreError

        if steps is not None and epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        length = {"steps": None, "epochs": epochs} if epochs is not None else {"steps": steps or 600}
        config = ExperimentConfig(
            out=out, dataset=dataset.value, data_dir=data_dir, model=model.value, width=width,
            label_noise=label_noise, batch_size=batch_size, lr=lr, optimizer=optimizer.value, momentum=momentum,
            warmup_epochs=warmup_epochs, lr_decay_epochs=lr_decay_epochs,
            probe_size=probe_size, probe_every=probe_every, probe_mode=probe_mode.value, log_every=log_every,
            sketch_dim=sketch_dim, seed=seed,
            device=device, threads=threads, overwrite=overwrite, progress=want_progress(progress),
            alignment=alignment, reference_size=reference_size, reference_every=reference_every, **length,
        )
        try:
            path = run_experiment(config)
        except StoreError as err:  # e.g. the store exists: a bad-input error, not a bug
            raise ValueError(str(err)) from err
        except KeyboardInterrupt:
            typer.echo(f"Interrupted: the logged steps are committed in {out}", err=True)
            raise typer.Exit(code=EXIT_INTERRUPTED) from None
    typer.echo(f"wrote {path}")
