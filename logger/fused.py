"""Fused mode (``GradientLogger(fused=True)``): a Linear layer's batch weight gradient summed from its per-example ones.

Exact per-example statistics of a Linear layer with T positions per example cost either the ghost norm,
``n·T²·(rows + cols)`` multiply-adds, or the per-example gradients themselves, ``n·T·rows·cols`` — as much as the
weight gradient autograd computes anyway. In fused mode the logged forward runs eligible ``nn.Linear`` calls through
:class:`FusedLinear`, whose backward takes the weight gradient from the layer's materialised per-example gradients
(``Σ_n G_n``, ``rows·cols`` adds per example) instead of computing the GEMM a second time; the per-example gradients
are formed by the tracker while it processes the layer, which happens in the output's gradient hook, before this
backward runs. Whenever they are not there (a module called twice, a weight also used elsewhere, a gradient too
large to materialise), the backward computes the GEMM as autograd would. ``.grad`` then equals the default path's
to rounding (a sum of per-example products instead of one GEMM), not bitwise; gradients still reach ``.grad``
through autograd, so parameter hooks and DDP see them as usual. Second derivatives through a fused call
(``create_graph=True``) raise instead of being wrong.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .layers import linear_rule
from .plan import LayerPlan


class Slot:
    """Where the tracker leaves one call's batch weight gradient for :class:`FusedLinear`'s backward.

    Attributes:
        weight_grad: ``Σ_n G_n`` in the layer's weight shape, or None until the tracker has formed it.
    """

    def __init__(self) -> None:
        self.weight_grad: torch.Tensor | None = None


class FusedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight gradient comes from a :class:`Slot` when it is filled."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot: Slot) -> torch.Tensor:
        """``F.linear(x, weight, bias)``; ``slot`` only travels to the backward."""
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        """Save the input and weight (as ``F.linear``'s own backward does) and the slot."""
        x, weight, bias, slot = inputs
        ctx.save_for_backward(x, weight)
        ctx.slot, ctx.has_bias = slot, bias is not None

    @staticmethod
    @once_differentiable  # the slot's sum is not a function of the graph: a second derivative raises, never wrong
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        """Input and bias gradients as autograd's; the weight gradient from the slot when it is filled."""
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            summed, ctx.slot.weight_grad = ctx.slot.weight_grad, None
            grad_w = flat.T @ x.reshape(-1, x.shape[-1]) if summed is None else summed.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b, None


def fusable_weights(plans: list[LayerPlan]) -> frozenset[int]:
    """Ids of the weights fused mode may take over: ``nn.Linear`` layers covered by the Linear rule alone."""
    out = set()
    for plan in plans:
        if len(plan.sources) != 1 or plan.loose_modules:
            continue
        source = plan.sources[0]
        module = source.module
        if type(module) is nn.Linear and source.rule is linear_rule and module.weight.requires_grad:
            out.add(id(module.weight))
    return frozenset(out)
