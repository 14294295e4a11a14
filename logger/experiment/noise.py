"""Seeded label noise: re-draw a fixed fraction of the training labels uniformly from all classes.

Convention (as in the paper's "randomised labels", [MC] §3.1): a corrupted example gets a label drawn uniformly from
*all* ``num_classes`` classes, so with probability ``1 / num_classes`` it equals the true label again. The
``corrupted`` mask therefore means "this label was re-drawn", not "this label is wrong": at 100% noise on 10
classes about 10% of the labels are still right by chance. Compare ``labels != true_labels`` for the wrong ones.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

__all__ = ["corrupt_labels"]


def corrupt_labels(
    labels: torch.Tensor, num_classes: int, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-draw ``round(fraction · n)`` labels, chosen at random, uniformly from all classes.

    The chosen examples and their new labels depend only on ``(n, num_classes, fraction, seed)``: the same seed gives
    the same result on every platform (a CPU ``torch.Generator`` draws them).

    Args:
        labels: ``[n]`` integer true labels.
        num_classes: Number of classes C; new labels are drawn from ``0 … C-1``.
        fraction: Fraction of examples to corrupt, in ``[0, 1]``.
        seed: Seed of the draw (non-negative).

    Returns:
        ``(training_labels, corrupted)``: the ``[n]`` int64 labels to train on and the ``[n]`` bool mask of the
        examples whose label was re-drawn (it may have landed on the true label, see the module docstring).

    Raises:
        ValueError: ``fraction`` outside ``[0, 1]``, ``num_classes < 2``, a negative seed, labels that are not a 1-D
            integer tensor, or labels outside ``[0, num_classes)``.

    """
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"label noise fraction must lie in [0, 1], got {fraction!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)} {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    n = labels.numel()
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n, generator=gen)[: round(float(fraction) * n)]
    new = torch.randint(0, num_classes, (chosen.numel(),), generator=gen)
    out = labels.detach().cpu().to(torch.int64).clone()
    out[chosen] = new
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[chosen] = True
    log.debug("re-drew %d of %d labels (%d now differ from the truth)", chosen.numel(), n,
              int((out != labels.cpu()).sum()))
    return out, corrupted
