"""Affine maps ``y = x Wᵀ + b`` (``nn.Linear``, ``F.linear``) and ``y = x W + b`` (``addmm``, ``x @ W``, HF ``Conv1D``).

With ``T`` positions per example (any leading dimensions between the batch and the features) the per-example
gradient is ``G_n = Σ_t δ_t [x_t, 1]ᵀ``: kept factored (``u = δ``, ``v = x``) and never materialised here; the bias
column ``Σ_t δ_t`` is the ``bias`` flag of :class:`~gradcoh.logger.grads.Factored`, formed only by
:func:`~gradcoh.logger.grads.bias_grad`.
"""

from __future__ import annotations

import torch

from ..grads import Composite, Dense, Factored, MatrixView, bias_grad


def positions(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, ..., c] → [n, T, c]``: every leading dimension after the batch is a position."""
    return t.reshape(n, -1, t.shape[-1])


def linear(x: torch.Tensor, delta: torch.Tensor, *, weight: bool = True, bias: bool = False) -> Dense | Factored:
    """``y = x Wᵀ + b``, ``W: [out, in]``: ``G_n = Σ_t δ_t [x_t, 1]ᵀ`` in the ``[W | b]`` view ``(out, in + bias)``.

    Args:
        x: Inputs ``[n, ..., in]``.
        delta: Output gradients ``[n, ..., out]``.
        weight: The weight trains (False: only the bias does, ``[n, out, 1]``).
        bias: The bias trains.
    """
    n = x.shape[0]
    d = positions(delta, n)
    if not weight:
        return bias_grad(d)
    return Factored(d, positions(x, n), bias=bias)


def transposed_linear(x: torch.Tensor, delta: torch.Tensor, *, weight_shape: tuple[int, ...] | None,
                      bias_shape: tuple[int, ...] | None) -> Composite:
    """``y = x W + b``, ``W: [in, out]`` (stored transposed): ``G_W = Σ_t x_t δ_tᵀ`` and ``g_b = Σ_t δ_t``.

    Weight and bias have different leading dimensions, so they are separate parts of a
    :class:`~gradcoh.logger.grads.Composite`.

    Args:
        x: Inputs ``[n, ..., in]``.
        delta: Output gradients ``[n, ..., out]``.
        weight_shape: The weight's shape, or None when it does not train.
        bias_shape: The bias's shape, or None when there is none or it does not train.
    """
    n = x.shape[0]
    d = positions(delta, n)
    parts: list = []
    if weight_shape is not None:
        parts.append((Factored(positions(x, n), d), MatrixView.of([weight_shape])))
    if bias_shape is not None:
        parts.append((bias_grad(d), MatrixView.of([bias_shape])))
    return Composite(parts)
