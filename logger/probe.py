"""Probes: a fixed sample measured without disturbing training (``GradientLogger.probe``); BatchNorm in probes.

A BatchNorm layer in train mode normalises each example with the mean and variance of the whole batch, so the
per-example gradient of a train-mode network is not defined by the example alone. The probe modes:

- ``"constant"`` (the default for models with such layers): every batch-statistics layer normalises with the
  statistics of the probe sample itself at the current parameters (mean and biased variance over the sample and the
  spatial positions, exactly what train mode would use on the sample as one batch), held constant: no gradient flows
  through the mean and variance. The probed function ``Σ_i ℓ(f(x_i; w, μ, σ²), y_i)`` is a sum of per-example terms,
  so its per-example gradients are exact gradients, the network is the network being trained (normalised with
  current batch statistics, not with running averages that lag behind), and dropout is off. ``statistics=`` takes
  other inputs to draw the statistics from (e.g. the current training batch).
- ``"eval"``: running statistics (what ``model.eval()`` does). Exact per example, but early in training the running
  averages (momentum 0.1 from mean 0, variance 1) describe another network than the one being trained.
- ``"train"``: batch statistics per micro-batch with the gradient through them: each example's *contribution* to the
  micro-batch gradient (they cancel through the mean subtraction), not a per-example gradient.

Models without batch-statistics layers are probed in eval mode whatever the mode (dropout off); ``"train"`` keeps
their train-mode behaviour (dropout on). Recalibrated running statistics ("precise BN", Wu & Johnson 2021, §3) and
the current training batch's statistics were measured against ``"constant"`` before it was chosen: the same readings
within noise, at the cost of a recalibration pass or of handing the training batch to every probe
(``docs/reproduction.md``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from .distributed import share
from .layers import uses_batch_stats
from .recorder import Recording

log = logging.getLogger(__name__)

PROBE_NOTES = {
    "constant": "Probes (stream 'probe', probe_mode='constant'): BatchNorm layers that use batch statistics in "
                "training are normalised with the statistics of the probe sample (or of the inputs passed as "
                "statistics=) at the probed step, held constant (no gradient through mean and variance): exact "
                "per-example gradients of the network as it normalises at that step, dropout off.",
    "eval": "Probes (stream 'probe', probe_mode='eval'): BatchNorm layers use their running statistics: exact "
            "per-example gradients of the eval-mode network, which early in training lags the trained one.",
    "train": "Probes (stream 'probe', probe_mode='train'): BatchNorm layers use each probe micro-batch's statistics "
             "with the gradient through them: per-example contributions to the micro-batch gradient, not "
             "per-example gradients.",
}
"""What the store's notes say about probes of batch-statistics layers, per ``probe_mode``."""


class ModelState:
    """Train/eval flags, buffers and RNG states of a model, saved before a probe and restored after it."""

    def __init__(self, modes: list, buffers: list, cpu_rng: torch.Tensor, cuda_rng: list | None) -> None:
        self.modes, self.buffers, self.cpu_rng, self.cuda_rng = modes, buffers, cpu_rng, cuda_rng

    @classmethod
    def save(cls, model: nn.Module) -> ModelState:
        """Snapshot ``model``'s modes and buffers and the global RNG states."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls([(m, m.training) for m in model.modules()],
                   [(b, b.detach().clone()) for b in model.buffers()], torch.get_rng_state(), cuda)

    def restore(self, model: nn.Module) -> None:
        """Put everything back exactly."""
        for m, training in self.modes:
            m.training = training
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def batch_stat_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules of ``model`` that normalise with batch statistics in its current mode."""
    return [m for m in model.modules() if uses_batch_stats(m)]


class _StopForwardError(Exception):
    """Ends a statistics pass at the layer being measured (nothing after it needs to run)."""


class _Moments:
    """Per-channel count, mean and sum of squared deviations in float64, merged over micro-batches (Chan et al.)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        dims = (0, *range(2, x.dim()))
        x = x.detach().to(torch.float64)
        n = x.numel() // x.shape[1]
        mean = x.mean(dims)
        m2 = ((x - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance (what train-mode BatchNorm normalises with)."""
        return self.mean, self.m2 / self.count


@contextlib.contextmanager
def _kept(layers: Iterable) -> Iterator[None]:
    """Restore each layer's mode and running-statistics buffers (the tensors, not their values) on exit."""
    saved = [(bn, bn.training, bn.running_mean, bn.running_var) for bn in layers]
    try:
        yield
    finally:
        for bn, training, mean, var in saved:
            bn.training, bn.running_mean, bn.running_var = training, mean, var


def _hold(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Make ``bn`` normalise with ``mean`` and ``var``: eval mode with them swapped in as its running statistics.

    The module's own buffers are replaced, never written to (what :class:`ModelState` restores stays untouched), and
    a layer without running statistics gets them only until :func:`_kept` puts ``None`` back.
    """
    dtype = next((t.dtype for t in (bn.running_mean, bn.weight) if t is not None), torch.get_default_dtype())
    bn.training = False
    bn.running_mean, bn.running_var = mean.to(dtype), var.to(dtype)


@contextlib.contextmanager
def _constant(stats: dict) -> Iterator[None]:
    """Each layer of ``stats = {layer: (mean, var)}`` normalises with its constants inside the block."""
    with _kept(stats):
        for bn, (mean, var) in stats.items():
            _hold(bn, mean, var)
        yield


def _once(calls: list, model: nn.Module) -> None:
    """Raise if a layer normalised more than one tensor in one forward pass (no single constant mean)."""
    twice = sorted({name for name, m in model.named_modules() if calls.count(m) > 1})
    if twice:
        raise ValueError(f"probe mode 'constant': BatchNorm layers {', '.join(twice)} normalise more than one tensor "
                         "per forward pass, so one constant mean and variance per layer is not defined; probe with "
                         "mode='eval' or mode='train' (gradcoh.logger.probe)")


@contextlib.contextmanager
def _pre_hooks(layers: list, hook: Callable) -> Iterator[None]:
    handles = [bn.register_forward_pre_hook(hook) for bn in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def sample_statistics(model: nn.Module, layers: list, inputs: torch.Tensor, batch_size: int,
                      device: torch.device) -> dict:
    """Mean and biased variance of each layer's input over all of ``inputs`` as one batch.

    Exactly what train-mode BatchNorm would normalise with on ``inputs`` as a single batch: each layer's statistics
    are taken with every earlier layer normalised by its own whole-sample statistics. One pass when the sample fits
    in one micro-batch; otherwise one partial pass per layer in call order (the memory of one micro-batch, at most
    ``len(layers)`` forward passes). Accumulated in float64; the caller restores modes, buffers and RNG states.

    Returns:
        ``{layer: (mean, var)}`` for the layers the forward pass calls (float64, ``[C]`` each).
    """
    model.eval()  # dropout off; measured layers switch to their constant statistics as they are done
    chunks = [inputs[s : s + batch_size].to(device) for s in range(0, inputs.shape[0], batch_size)]
    stats: dict = {}
    calls: list = []
    if len(chunks) == 1:
        def capture(mod: nn.Module, args: tuple) -> None:
            calls.append(mod)
            _once(calls, model)
            moments = _Moments()
            moments.add(args[0])
            stats[mod] = moments.value()
            _hold(mod, *stats[mod])  # normalise this call (and what follows) with the constants

        with _kept(layers), _pre_hooks(layers, capture):
            model(chunks[0])
        return stats
    with _pre_hooks(layers, lambda mod, args: calls.append(mod)):
        model(chunks[0])  # call order (and a check that each layer is called once)
    _once(calls, model)
    for bn in calls:
        moments = _Moments()

        def stop(mod: nn.Module, args: tuple, moments: _Moments = moments) -> None:
            moments.add(args[0])
            raise _StopForwardError

        with _pre_hooks([bn], stop), _constant(dict(stats)):
            for x in chunks:
                with contextlib.suppress(_StopForwardError):
                    model(x)
        stats[bn] = moments.value()
    return stats


def prepare(model: nn.Module, mode: str, statistics: torch.Tensor, batch_size: int,
            device: torch.device) -> contextlib.AbstractContextManager:
    """Put ``model`` into the state probed by ``mode`` (the caller saved and restores its state).

    Args:
        model: The model, in its training-time modes.
        mode: One of :data:`PROBE_MODES`.
        statistics: Inputs whose statistics the ``"constant"`` mode holds (the probe sample by default).
        batch_size: Micro-batch size of the statistics pass.
        device: Where the model takes its inputs.

    Returns:
        A context manager within which the probe's forward passes run.
    """
    layers = batch_stat_layers(model)
    if mode == "train" or not layers:
        model.train(mode == "train")
        return contextlib.nullcontext()
    if mode == "eval":
        model.eval()
        return contextlib.nullcontext()
    stats = sample_statistics(model, layers, statistics, batch_size, device)
    model.eval()
    return _constant(stats)


def describe(model: nn.Module) -> str | None:
    """What the ``"constant"`` mode does to ``model`` (for the log), or None when it has no batch statistics."""
    layers = set(batch_stat_layers(model))
    if not layers:
        return None
    names = [name for name, m in model.named_modules() if m in layers]
    shown = ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])}, ... ({len(names)} layers)"
    return (f"probes: BatchNorm layers {shown} normalise with batch statistics; probes normalise them "
            "with the probe sample's statistics held constant (mode='constant': exact per-example gradients of the "
            "network as it normalises now); pass mode='eval' for running statistics or mode='train' for "
            "per-micro-batch contributions")


class Announcer:
    """Says once (logging, on stderr) how the ``"constant"`` mode treats a model's batch-statistics layers."""

    def __init__(self) -> None:
        self.done = False

    def __call__(self, model: nn.Module, mode: str) -> None:
        """Log :func:`describe` of ``model`` the first time a probe runs in ``"constant"`` mode."""
        if mode == "constant" and not self.done:
            self.done = True
            text = describe(model)
            if text is not None:
                log.warning(text)


def measure(model: nn.Module, rec: Recording, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable,
            batch_size: int, device: torch.device) -> None:
    """Forward and ``torch.autograd.grad`` of the probe sample in micro-batches (``.grad`` is never touched)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        per = loss_fn(model(x), y)
        rec.loss(per)
        torch.autograd.grad(per.sum(), params, allow_unused=True)


def run(model: nn.Module, record: Callable[[dict], contextlib.AbstractContextManager[Recording]],
        inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable, *, mode: str, batch_size: int,
        statistics: torch.Tensor | None, meta: dict, rank: int, world_size: int, device: torch.device) -> None:
    """Probe a sample inside ``record(meta)``: this rank's share of it, the model's state restored exactly after.

    With several processes each rank measures its contiguous share of the sample once, while the ``"constant"``
    mode holds the statistics of the whole sample (or of ``statistics``) on every rank.
    """
    source = inputs if statistics is None else statistics
    if world_size > 1:
        rows = slice(*share(inputs.shape[0], rank, world_size))
        inputs, targets = inputs[rows], targets[rows]
        meta = {k: None if v is None else v[rows] for k, v in meta.items()}
    saved = ModelState.save(model)
    try:
        with prepare(model, mode, source, batch_size, device), record(meta) as rec:
            measure(model, rec, inputs, targets, loss_fn, batch_size, device)
    finally:
        saved.restore(model)
