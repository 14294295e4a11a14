"""Fused mode: a Linear or convolution layer's batch weight gradient summed from its per-example ones.

Exact per-example statistics of a Linear layer with T positions per example cost either the ghost norm,
``n·T²·(rows + cols)`` multiply-adds, or the per-example gradients themselves, ``n·T·rows·cols`` — as much as the
weight gradient autograd computes anyway. In fused mode the logged forward runs eligible ``nn.Linear`` and
convolution calls (``nn.Conv1d/2d/3d`` with numeric padding) through :class:`FusedLinear` / :class:`FusedConv`,
whose backward takes the weight gradient from the layer's materialised per-example gradients (``Σ_n G_n``,
``rows·cols`` adds per example) instead of computing the GEMM a second time; the per-example gradients are formed by
the tracker while it processes the layer, which happens in the output's gradient hook, before this backward runs.
A call's slot is filled where the per-example gradients are materialised anyway (grouped convolutions, the routes
that materialise), and factored ones are materialised for it where the cost model says that is cheaper once the
GEMM it spares is counted (:func:`fused_is_cheaper`, fixed constants: the same choice on every machine). Whenever
they are not there (a module called twice, a weight also used elsewhere, a gradient too large to materialise, the
factored route cheaper), the backward computes the GEMM as autograd would. Calls under autocast (the Function would
save float32 inputs and meet a low-precision output gradient) or under saved-tensor hooks (non-reentrant activation
checkpointing recomputes the forward outside the record and must save what it saved) keep autograd's op. A fused
weight's ``.grad`` equals the unfused path's to rounding (a sum of per-example products instead of one GEMM), not
bitwise; gradients still reach ``.grad`` through autograd, so parameter hooks and DDP see them as usual. The
reconciliation guard cannot see a wrong per-example sum on a fused weight (it is that weight's ``.grad``), only
gradients from outside it. Second derivatives through a fused call (``create_graph=True``) raise instead of being
wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .arguments import bind
from .costs import SKETCH_COSTS
from .grads import Dense, Factored, LayerGrad, materialise_is_cheaper
from .layers import conv_rule, linear_rule
from .plan import LayerPlan
from .sketch import Projection


class Slot:
    """Where the tracker leaves one call's batch weight gradient for the fused Function's backward.

    Attributes:
        weight_grad: ``Σ_n G_n`` (in the layer's ``(rows, cols)`` view), or None until the tracker has formed it.
    """

    def __init__(self) -> None:
        self.weight_grad: torch.Tensor | None = None


class FusedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose weight gradient comes from a :class:`Slot` when it is filled."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot: Slot) -> torch.Tensor:
        """``F.linear(x, weight, bias)``; ``slot`` only travels to the backward.

        On 3-D input ``F.linear`` returns a view of a 2-D product; a custom Function's output may not be a view that
        the caller then modifies in place (``ReLU(inplace=True)``), so such an output is returned as a copy.
        """
        out = F.linear(x, weight, bias)
        return out if out._base is None else out.clone()

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
            grad_w = flat.T @ x.reshape(-1, x.shape[-1]) if summed is None else summed.reshape(weight.shape).to(
                weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b, None


class FusedConv(torch.autograd.Function):
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` with the weight gradient of a Slot.

    The :class:`Slot`'s sum is used when it is filled; numeric padding only.
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot: Slot, stride: tuple,
                padding: tuple, dilation: tuple, groups: int) -> torch.Tensor:
        """The convolution; ``slot`` only travels to the backward."""
        return _CONV[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        """Save the input and weight (as the convolution's own backward does), the slot and the hyper-parameters."""
        x, weight, bias, slot, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight)
        ctx.slot, ctx.has_bias, ctx.conv = slot, bias is not None, (stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        """Input and bias gradients by ``convolution_backward``; the weight gradient from the slot when filled."""
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        summed, ctx.slot.weight_grad = ctx.slot.weight_grad, None
        need_w = ctx.needs_input_grad[1] and summed is None
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False,
            [0] * len(stride), groups, [ctx.needs_input_grad[0], need_w, need_b])
        if ctx.needs_input_grad[1] and summed is not None:
            grad_w = summed.reshape(weight.shape).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_FUNCTIONS = frozenset(_CONV.values())
"""The functional convolutions fused mode intercepts."""


def conv_arguments(func: Callable, args: tuple, kwargs: dict) -> tuple | None:
    """``(x, weight, bias, stride, padding, dilation, groups)`` of an ``F.conv*d`` call, hyper-parameters as lists.

    None when it cannot be fused (string padding).
    """
    bound = bind(func.__name__, func, args, kwargs)
    if bound is None or isinstance(bound["padding"], str):
        return None
    nd = bound["weight"].dim() - 2

    def ints(v: Any) -> list[int]:
        return [int(v)] * nd if isinstance(v, int) else [int(i) for i in v]

    return (bound["input"], bound["weight"], bound["bias"], ints(bound["stride"]), ints(bound["padding"]),
            ints(bound["dilation"]), int(bound["groups"]))


_FUSABLE = {nn.Linear: linear_rule, nn.Conv1d: conv_rule, nn.Conv2d: conv_rule, nn.Conv3d: conv_rule}


def fusable_weights(plans: list[LayerPlan]) -> frozenset[int]:
    """Ids of the weights fused mode may take over: Linear and convolution layers covered by their rule alone."""
    out = set()
    for plan in plans:
        if len(plan.sources) != 1 or plan.loose_modules:
            continue
        source = plan.sources[0]
        module = source.module
        if _FUSABLE.get(type(module)) is source.rule and module.weight.requires_grad:
            out.add(id(module.weight))
    return frozenset(out)


def fill_slot(grad: LayerGrad, slot: Slot, projector: Projection | None = None) -> LayerGrad:
    """Fused mode: leave the sum of a call's per-example weight gradients for its backward.

    Materialised gradients fill it as they are; factored ones are materialised first when :func:`fused_is_cheaper`
    (with the weight's sketch ``projector``, None without sketches), otherwise left to autograd's own kernel (slot
    empty).
    """
    if isinstance(grad, Dense):
        slot.weight_grad = grad.blocks[0].sum(0)
        return grad
    if not isinstance(grad, Factored) or grad.u is None or not fused_is_cheaper(
            grad.n, grad.positions, grad.n_rows, grad.n_cols, grad.v.element_size(), projector):
        return grad
    dense = grad.materialise()
    slot.weight_grad = dense.blocks[0].sum(0)  # [out, in]: Σ_n G_n, the batch weight gradient
    return dense


def fused_is_cheaper(n: int, positions: int, rows: int, cols: int, element_size: int,
                     projector: Projection | None = None) -> bool:
    """Whether to materialise a call's factored per-example weight gradients ``[n, rows, cols]`` to fill its slot.

    Materialising costs ``(T + 1)·rows·cols`` multiply-adds per example (:func:`~gradcoh.logger.grads.
    materialise_is_cheaper`) and spares autograd's weight-gradient GEMM, ``T·rows·cols``, less the slot's sum,
    ``rows·cols``; the factored route costs the ghost norm ``T²·(rows + cols)``, and with a sketch each route adds
    its projection's cost. Weighed with the fixed constants :data:`~gradcoh.logger.costs.SKETCH_COSTS`, never
    measured, so ``.grad``'s rounding is the same on every machine and every run for the same shapes. Measured on
    one CPU core (kernels alone, fused / unfused): Llama q_proj (n 8, T 128, 256 × 256) 0.50, its MLP (688 × 256)
    0.80, a ViT qkv (n 16, T 65, 576 × 192) 0.77, ResNet-18 layer1 conv (n 32, T 256, 64 × 576) 0.19, all chosen;
    ResNet-18 layer4 conv (T 4, 512 × 4608) 37 and a T = 1 Linear (256 × 256) 15.5, both refused.
    """
    return materialise_is_cheaper(n, positions, rows, cols, element_size, projector, SKETCH_COSTS,
                                  saved=(positions - 1) * rows * cols)


def saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (non-reentrant checkpointing, its recomputation, ``save_on_cpu``).

    A fused call is not made there: the recomputation runs outside the record's bookkeeping and would call autograd's
    own op, whose saved tensors differ from the fused Function's (checkpointing refuses the mismatch).
    """
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def call_is_fused(n: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv: tuple | None = None) -> bool:
    """Whether a Linear (``conv`` None) or convolution call of ``n`` examples runs through its fused Function.

    Decided at the forward from the shapes, as :func:`fill_slot` will decide without a sketch: a call whose slot
    would stay empty keeps autograd's own op (no Python Function, no extra cost). Grouped convolutions (their
    per-example gradients are always materialised) are always fused.
    """
    if n <= 0 or saved_tensors_hooked() or torch.is_autocast_enabled(x.device.type):
        return False  # (autocast: the op would compute in low precision from inputs the Function saved unconverted)
    rows, extra = weight.shape[0], int(bias is not None)
    if conv is None:
        positions = x.numel() // max(n * weight.shape[-1], 1)
        return fused_is_cheaper(n, max(positions, 1), rows, weight.shape[-1] + extra, weight.element_size())
    stride, padding, dilation, groups = conv[3:]
    if groups > 1:
        return True
    positions = x.numel() // max(n * x.shape[1], 1)  # the input's positions per example, then the output's
    for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True):
        positions = positions // size * ((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return fused_is_cheaper(n, max(positions, 1), rows, weight[0].numel() + extra, weight.element_size())
