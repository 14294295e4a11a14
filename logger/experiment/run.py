"""``run_experiment``: a small supervised training run with label noise, logged by :class:`GradientLogger`.

The run logs two streams into one store: ``batch`` (every ``log_every`` steps, the training mini-batch) and
``probe`` (a fixed seeded sample of ``probe_size`` training examples with their training labels, measured without
disturbing training every ``probe_every`` steps (``"auto"``: about :data:`AUTO_PROBES` probes over the run, see
:func:`probe_cadence`), at each of the first ``probe_early`` steps and at the last step;
BatchNorm layers as ``probe_mode`` says, by default normalised with the sample's statistics held constant).
Training follows the paper's recipe: SGD with momentum 0.9, no augmentation, no weight decay, and the learning-rate
schedule of Goyal et al. 2017 (:mod:`.schedule`). Examples are grouped ``("clean", "corrupted")`` from the label-noise
mask; per-example losses and true labels are stored too.

Interrupting with Ctrl-C closes the logger (every logged step is flushed and committed) and re-raises
``KeyboardInterrupt`` after logging where the store is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import schema
from ..config import PROBE_MODES
from ..hook import GradientLogger
from ..probe import ModelState, prepare
from .datasets import DATASETS, ImageData, load_dataset
from .models import MODELS, build_model
from .noise import corrupt_labels
from .schedule import GOYAL_DECAY_EPOCHS, GOYAL_WARMUP_EPOCHS, LRSchedule, steps_per_epoch

log = logging.getLogger(__name__)

__all__ = ["AUTO_PROBES", "GROUPS", "ExperimentConfig", "ProbeReport", "probe_cadence", "run_experiment"]

GROUPS = ("clean", "corrupted")
"""Example groups of every experiment store: position 1 marks an example whose label was re-drawn."""

AUTO_PROBES = 40
"""Probes over a run with ``probe_every="auto"``: a curve for any run length at a cost bounded in probe passes."""


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one run (stored in the store's logger config under ``extra["experiment"]``)."""

    out: str = "runs/exp.zarr"  # the Zarr store to write
    dataset: str = "digits"  # one of datasets.DATASETS
    data_dir: str | None = None  # root of the on-disk torchvision datasets; nothing is downloaded
    model: str = "mlp"  # one of models.MODELS
    width: int = 256  # hidden width of the MLP (channel base of the CNN is width // 8)
    label_noise: float = 0.0  # fraction of training labels re-drawn uniformly from all classes
    steps: int | None = 600  # optimisation steps; None: use epochs
    epochs: float | None = None  # used when steps is None: steps = ceil(epochs * n / batch_size)
    batch_size: int = 64
    lr: float = 0.02  # peak rate; at a constant 0.02, momentum 0.9 fits digits (MLP) in ~200 steps, random in ~2000
    optimizer: str = "sgd"  # "sgd" or "adam"
    momentum: float = 0.9  # SGD momentum (paper: 0.9, no weight decay, no augmentation)
    warmup_epochs: float = GOYAL_WARMUP_EPOCHS  # linear lr warmup (the paper's Goyal et al. 2017 schedule); 0: none
    lr_decay_epochs: tuple[float, ...] = GOYAL_DECAY_EPOCHS  # lr divided by 10 at each (Goyal et al.); (): constant
    probe_size: int = 512  # m of the probe sample; 0 disables the probe stream
    probe_every: int | str = "auto"  # probe cadence in steps, or "auto": probe_cadence(), ~AUTO_PROBES over the run
    probe_early: int = 0  # also probe every one of the first probe_early steps (resolves the initial transient)
    probe_batch_size: int = 256  # micro-batch of the probe pass (bounds memory only)
    probe_mode: str = "constant"  # how BatchNorm layers with batch statistics are probed (gradcoh.logger.probe)
    log_every: int = 10  # batch stream cadence; 0 disables the batch stream
    sketch_dim: int = 0
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto"
    overwrite: bool = False  # replace an existing store instead of refusing
    progress: bool = False  # tqdm progress bar on stderr: probe_mcoh (probe m-coherence), probe_fit (fraction of
    # probe examples predicted as their training label), loss and batch_acc (accuracy on the training batch)
    synthetic_size: int = 256  # examples of the synthetic dataset
    threads: int | None = None  # torch intra-op threads (process-wide); 1 is much faster for tiny models on CPU
    alignment: bool = False  # store each example's alignment with the batch gradient (GradientLogger(alignment=))
    reference_size: int = 0  # clean held-out reference examples (from the test split); 0: no reference set
    reference_every: int = 1  # recompute the reference gradient when this many steps passed since the last one

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_numbers()
        if not self.probe_size and not self.log_every:
            raise ValueError("nothing to log: probe_size and log_every are both 0")

    def _check_choices(self) -> None:
        for name, allowed in (("dataset", tuple(DATASETS)), ("model", tuple(MODELS)), ("optimizer", ("sgd", "adam")),
                              ("probe_mode", PROBE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; use one of {', '.join(allowed)}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")

    def _check_numbers(self) -> None:
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise must lie in [0, 1], got {self.label_noise}")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise ValueError(f"steps/epochs must be positive, got steps={self.steps}, epochs={self.epochs}")
        if self.probe_every != "auto" and (isinstance(self.probe_every, (str, bool)) or self.probe_every < 1):
            raise ValueError(f'probe_every must be "auto" or an integer of at least 1, got {self.probe_every!r}')
        at_least = {"batch_size": 1, "probe_batch_size": 1, "width": 1, "probe_size": 0,
                    "probe_early": 0, "log_every": 0, "sketch_dim": 0, "seed": 0, "reference_size": 0,
                    "reference_every": 1}
        if self.threads is not None:
            at_least["threads"] = 1
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_epochs < 0 or any(e < 0 for e in self.lr_decay_epochs):
            raise ValueError(f"warmup_epochs and lr_decay_epochs must not be negative, got {self.warmup_epochs} and "
                             f"{self.lr_decay_epochs}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProbeReport:
    """What a probe step reports to ``on_probe`` (and the progress bar)."""

    step: int
    m: int  # probe examples
    m_coherence: float  # whole-network probe m-coherence at this step
    fit: float  # fraction of probe examples whose prediction equals their training label
    fit_corrupted: float  # the same over the probe examples with a re-drawn label (NaN if none)
    train_loss: float  # mean training loss of the last mini-batch


def _seed_everything(seed: int) -> np.random.SeedSequence:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.SeedSequence(seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def _total_steps(cfg: ExperimentConfig, n: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * n / cfg.batch_size))


def _batches(n: int, batch_size: int, seed: np.random.SeedSequence):
    """Endless stream of index batches: a fresh seeded permutation every epoch (last batch may be short)."""
    gen = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
    while True:
        order = torch.randperm(n, generator=gen)
        yield from order.split(batch_size)


def _optimizer(cfg: ExperimentConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example ``[n]`` (``reduction="none"``): the loss of both training and probe."""
    return F.cross_entropy(outputs, targets, reduction="none")


class _Probe:
    """The fixed probe sample (on the device) and its bookkeeping."""

    def __init__(self, data: ImageData, labels: torch.Tensor, corrupted: torch.Tensor, size: int,
                 seed: np.random.SeedSequence, device: torch.device) -> None:
        if size > len(data):
            raise ValueError(f"probe_size={size} exceeds the {len(data)} training examples")
        gen = torch.Generator().manual_seed(int(seed.generate_state(1)[0]))
        self.index = torch.randperm(len(data), generator=gen)[:size].sort().values  # [m]
        self.x = data.batch(self.index).to(device)  # [m, C, H, W]
        self.y = labels[self.index].to(device)  # training (possibly corrupted) labels
        self.group = corrupted[self.index].long()
        self.true = data.targets[self.index]

    @torch.no_grad()
    def fit(self, model: nn.Module, mode: str, batch_size: int) -> tuple[float, float]:
        """Fraction of probe examples predicted as their training label (all, and the corrupted ones).

        The network is the one the probe measured (``mode``: BatchNorm statistics as in the probe); the model's
        modes, buffers and RNG states are restored afterwards.
        """
        saved = ModelState.save(model)
        try:
            with prepare(model, mode, self.x, batch_size, self.x.device):
                hit = torch.cat([model(x).argmax(1) for x in self.x.split(batch_size)]).eq(self.y).cpu()
        finally:
            saved.restore(model)
        bad = self.group.bool()
        return hit.float().mean().item(), hit[bad].float().mean().item() if bad.any() else float("nan")


def run_experiment(config: ExperimentConfig, on_probe: Callable[[ProbeReport], None] | None = None) -> Path:
    """Train ``config.model`` on ``config.dataset`` with label noise and log per-example gradient statistics.

    Args:
        config: The run.
        on_probe: Called after every probe step with a :class:`ProbeReport` (e.g. to keep a history).

    Returns:
        The path of the written store.

    Raises:
        ValueError: Bad configuration (also ``DatasetNotFoundError``, an ``OSError``, for missing data).
        KeyboardInterrupt: Re-raised after the logger has flushed and committed every logged step.

    """
    cfg = config
    seeds = _seed_everything(cfg.seed).spawn(4)  # [noise, probe sample, batch order, model init]
    device = _device(cfg.device)
    if cfg.threads is not None:
        # Tiny models on few cores: extra intra-op threads only contend with the writer thread (10x slower seen).
        torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.dataset, cfg.data_dir, synthetic_size=cfg.synthetic_size, seed=cfg.seed)
    labels, corrupted = corrupt_labels(data.targets, data.num_classes, cfg.label_noise,
                                       int(seeds[0].generate_state(1)[0]))
    torch.manual_seed(int(seeds[3].generate_state(1)[0]))
    model = build_model(cfg.model, data.input_shape, data.num_classes, width=cfg.width).to(device)
    opt = _optimizer(cfg, model)
    probe = _Probe(data, labels, corrupted, cfg.probe_size, seeds[1], device) if cfg.probe_size else None
    total = _total_steps(cfg, len(data))
    schedule = LRSchedule.from_epochs(cfg.lr, steps_per_epoch(len(data), cfg.batch_size), cfg.warmup_epochs,
                                      tuple(cfg.lr_decay_epochs))
    log.info("%s on %s (%d examples, %d classes, %.0f%% label noise, %d re-drawn): %d steps, %s, probes every %d "
             "-> %s", cfg.model, cfg.dataset, len(data), data.num_classes, 100 * cfg.label_noise,
             int(corrupted.sum()), total, schedule.describe(), probe_cadence(cfg.probe_every, total), cfg.out)
    glog = GradientLogger(model, cfg.out, every=cfg.log_every or total + 1, sketch_dim=cfg.sketch_dim,
                          seed=cfg.seed, loss_reduction="mean", groups=GROUPS,
                          mode="overwrite" if cfg.overwrite else "create", extra={"experiment": cfg.to_dict()},
                          alignment=cfg.alignment, reference=_reference(cfg, seeds[1], device),
                          reference_every=cfg.reference_every, probe_mode=cfg.probe_mode)
    with glog:
        try:
            _train(cfg, model, (opt, schedule), glog, data, labels, corrupted, probe, total, seeds[2], device,
                   on_probe)
        except KeyboardInterrupt:
            log.warning("interrupted; closing the logger (logged steps are flushed and kept in %s)", cfg.out)
            glog.close()
            raise
    return Path(cfg.out)


def _reference(cfg: ExperimentConfig, seed: np.random.SeedSequence,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Callable] | None:
    """``reference_size`` clean examples of the test split (held out, true labels), or None."""
    if not cfg.reference_size:
        return None
    test = load_dataset(cfg.dataset, cfg.data_dir, train=False, synthetic_size=cfg.synthetic_size, seed=cfg.seed)
    if cfg.reference_size > len(test):
        raise ValueError(f"reference_size={cfg.reference_size} exceeds the {len(test)} examples of the "
                         f"{cfg.dataset} test split")
    gen = torch.Generator().manual_seed(int(seed.generate_state(2)[1]))
    index = torch.randperm(len(test), generator=gen)[: cfg.reference_size].sort().values
    return test.batch(index).to(device), test.targets[index].to(device), per_example_loss


def probe_cadence(probe_every: int | str, total: int) -> int:
    """Steps between probes: ``probe_every``, or for ``"auto"`` ``max(1, round(total / AUTO_PROBES))``.

    ``"auto"`` probes every step of a run of up to 59 steps and gives a longer run about 30 to 50 probes, so a short run
    gets a curve rather than its first and last step (a fixed cadence of 50 probes a 48-step run twice), and a long
    run no more probe passes than a run of a few hundred steps.

    Args:
        probe_every: An integer cadence (returned as is) or ``"auto"``.
        total: Optimisation steps of the run.

    Returns:
        The cadence in steps (at least 1).

    """
    if probe_every == "auto":
        return max(1, round(total / AUTO_PROBES))
    return int(probe_every)


def _probe_due(cfg: ExperimentConfig, step: int, total: int) -> bool:
    every = probe_cadence(cfg.probe_every, total)
    return step % every == 0 or step < cfg.probe_early or step == total - 1


def _train(cfg: ExperimentConfig, model: nn.Module, optim: tuple[torch.optim.Optimizer, LRSchedule],
           glog: GradientLogger,
           data: ImageData, labels: torch.Tensor, corrupted: torch.Tensor, probe: _Probe | None, total: int,
           seed: np.random.SeedSequence, device: torch.device,
           on_probe: Callable[[ProbeReport], None] | None) -> None:
    from tqdm.auto import tqdm

    opt, schedule = optim
    bar = tqdm(range(total), desc=f"{cfg.model}/{cfg.dataset} {100 * cfg.label_noise:.0f}% noise",
               disable=not cfg.progress, dynamic_ncols=True)
    postfix: dict[str, str] = {}
    batches = _batches(len(data), cfg.batch_size, seed)
    model.train()
    for step in bar:
        idx = next(batches)  # [B] dataset positions
        x, y = data.batch(idx).to(device), labels[idx].to(device)
        with glog.record(step, index=idx, labels=labels[idx], group=corrupted[idx].long(),
                         true_labels=data.targets[idx]) as rec:
            out = model(x)  # [B, classes]
            per = per_example_loss(out, y)  # [B]
            rec.loss(per)
            per.mean().backward()
        for group in opt.param_groups:
            group["lr"] = schedule.at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if probe is not None and _probe_due(cfg, step, total):
            glog.probe(step, probe.x, probe.y, per_example_loss, batch_size=cfg.probe_batch_size,
                       index=probe.index, labels=probe.y, group=probe.group, true_labels=probe.true)
            coh, m = glog.last_coherence(schema.STREAM_PROBE), len(probe.index)
            fit, fit_bad = probe.fit(model, cfg.probe_mode, cfg.probe_batch_size)
            report = ProbeReport(step, m, coh, fit, fit_bad, per.mean().item())
            postfix.update(probe_mcoh=f"{coh:.3g}", probe_fit=f"{fit:.2f}")
            if on_probe is not None:
                on_probe(report)
        if step % 10 == 0 or step == total - 1:
            acc = (out.argmax(1) == y).float().mean().item()  # host sync, only every 10 steps
            postfix.update(loss=f"{per.mean().item():.3f}", batch_acc=f"{acc:.2f}")
            bar.set_postfix(postfix, refresh=False)
