"""The learning-rate schedule of the experiments: Goyal et al. 2017, the one the paper trained with.

Chatterjee & Zielinski (arXiv:2008.01217, §3) train ResNet-18 on ImageNet with SGD, momentum 0.9 and "the
learning-rate schedule of Goyal et al. 2017" (*Accurate, Large Minibatch SGD*, §2.2 and §5.1): a gradual warmup over
the first 5 epochs, then the rate divided by 10 at epochs 30, 60 and 80. The warmup here rises linearly from
``lr / warmup_steps`` at step 0 to ``lr`` (Goyal et al. start from the batch-256 rate, 1/16 of the peak at the
paper's batch of 4096; a batch of 64 has no such reference, so the ramp starts near 0).

An epoch is ``ceil(n / batch_size)`` steps, as the experiment's batch stream draws a fresh permutation per epoch with
a short last batch: 24 steps for ``digits`` (1500 training images) at batch 64, 4 for ``synthetic`` (256).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GOYAL_DECAY_EPOCHS", "GOYAL_WARMUP_EPOCHS", "LRSchedule", "steps_per_epoch"]

GOYAL_WARMUP_EPOCHS = 5.0
"""Goyal et al. 2017, §2.2: gradual warmup over the first 5 epochs."""

GOYAL_DECAY_EPOCHS = (30.0, 60.0, 80.0)
"""Goyal et al. 2017, §5.1: the learning rate divided by 10 at these epochs (of 90)."""


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps of one pass over ``n`` examples at ``batch_size`` (the last batch may be short)."""
    return math.ceil(n / batch_size)


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate per step: linear warmup over ``warmup_steps``, divided by 10 at each of ``decay_steps``.

    Attributes:
        lr: Peak learning rate.
        warmup_steps: Steps of the linear warmup (0: none); step ``t < warmup_steps`` gets ``lr * (t + 1) /
            warmup_steps``.
        decay_steps: Steps from which the rate is divided by 10 (once per step passed).

    """

    lr: float
    warmup_steps: int = 0
    decay_steps: tuple[int, ...] = ()

    @classmethod
    def from_epochs(cls, lr: float, epoch_steps: int, warmup_epochs: float,
                    decay_epochs: tuple[float, ...]) -> LRSchedule:
        """The schedule with its epochs converted to steps (``round(epochs * epoch_steps)``)."""
        return cls(lr, round(warmup_epochs * epoch_steps), tuple(round(e * epoch_steps) for e in decay_epochs))

    def at(self, step: int) -> float:
        """The learning rate of optimisation step ``step`` (0-based)."""
        rate = self.lr * 0.1 ** sum(step >= d for d in self.decay_steps)
        if step < self.warmup_steps:
            rate *= (step + 1) / self.warmup_steps
        return rate

    def describe(self) -> str:
        """One line for the run's log."""
        warm = f"linear warmup over {self.warmup_steps} steps" if self.warmup_steps else "no warmup"
        decay = f"/10 at steps {', '.join(map(str, self.decay_steps))}" if self.decay_steps else "no decay"
        return f"lr {self.lr:g}: {warm}, {decay}"
