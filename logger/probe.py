"""Probes: a fixed sample measured without disturbing training (``GradientLogger.probe``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .recorder import Recording


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
