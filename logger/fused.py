"""Fused mode: a Linear, convolution or ``Conv1D`` layer's batch weight gradient summed from its per-example ones.

Exact per-example statistics of a Linear layer with T positions per example cost either the ghost norm,
``n·T²·(rows + cols)`` multiply-adds, or the per-example gradients themselves, ``n·T·rows·cols`` — as much as the
weight gradient autograd computes anyway. In fused mode the logged forward runs chosen ``nn.Linear``, convolution
(``nn.Conv1d/2d/3d`` with numeric padding) and Hugging Face ``Conv1D`` (``torch.addmm(bias, x, weight)``) calls
through :class:`FusedLinear` / :class:`FusedConv` / :class:`FusedAddmm`, whose backward takes the weight gradient
from the layer's materialised per-example gradients (``Σ_n G_n``, ``rows·cols`` adds per example) instead of
computing the GEMM a second time; the per-example gradients are formed by the tracker while it processes the layer,
which happens in the output's gradient hook, before this backward runs.

Which calls (:func:`call_is_fused`, decided at the forward from the shapes with fixed constants: the same calls on
every machine; :func:`fill_slot` fills the slot of each of them in the backward):

- ``"auto"`` (the default): the calls whose per-example gradients the step materialises anyway — the rule's own
  materialised form or the route chosen for the weight's sketch projection (a CountSketch of a transformer Linear)
  — where the spared GEMM pays the Function's fixed Python cost and the slot's sum
  (:data:`~gradcoh.logger.costs.FUSED_CALL_NS`, :data:`~gradcoh.logger.costs.FUSED_SUM_NS`), except convolutions
  whose input needs a gradient (their backward forms the weight gradient at no extra time: :func:`call_is_fused`).
  It only removes work: nothing is materialised to fill a slot.
- True: also factored gradients materialised where the cost model says that is cheaper once the GEMM it spares is
  counted (:func:`fused_is_cheaper`); in whole steps that lost on the transformers' exact statistics.
- False: never (every ``.grad`` bitwise).

Whenever the gradients are not there (a module called twice, a weight also used elsewhere, a gradient too large to
materialise), the backward computes the GEMM as autograd would. Calls under autocast (the Function would
save float32 inputs and meet a low-precision output gradient) or under saved-tensor hooks (non-reentrant activation
checkpointing recomputes the forward outside the record and must save what it saved) keep autograd's op. A fused
weight's ``.grad`` equals the unfused path's to rounding (a sum of per-example products instead of one GEMM), not
bitwise; gradients still reach ``.grad`` through autograd, so parameter hooks and DDP see them as usual. A layer
the reconciliation guard checks at a step (every layer once every ``guard_every`` logged steps, :mod:`.guard`) is not
fused at that step: its ``.grad`` comes from autograd's GEMM, independent of the per-example gradients, so the guard
flags a wrong per-example gradient there exactly as without fused mode (a persistent error within ``guard_every``
logged steps); on the other steps a fused weight's ``.grad`` is the per-example sum and the guard cannot see such an
error there. Second derivatives through a fused call (``create_graph=True``) raise instead of being wrong.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .arguments import bind
from .costs import FUSED_CALL_NS, FUSED_SUM_NS, SKETCH_COSTS, KernelCosts
from .grads import Composite, Dense, Factored, LayerGrad, fits, materialise_is_cheaper, natural_view
from .layers import conv_rule, linear_rule, transposed_linear_rule
from .plan import LayerPlan
from .sketch import PROJECTIONS, Form, Projection


def _first_order(backward: Callable) -> Callable:
    """``once_differentiable``, raising a clear error when the backward pass builds a graph (``create_graph=True``).

    The fused weight gradient is a sum of per-example gradients, not a function of the graph: a second derivative
    through it cannot be formed (``once_differentiable`` alone would fail later, with torch's own message).
    """
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: torch.Tensor) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "gradcoh fused mode: a backward pass with create_graph=True (a second derivative, a gradient "
                "penalty) went through a fused Linear/convolution call, whose weight gradient is summed from the "
                "per-example gradients and cannot be differentiated again; log such a model with "
                "GradientLogger(..., fused=False)")
        return inner(ctx, *grads)

    return wrapper


class Slot:
    """Where the tracker leaves one call's batch weight gradient for the fused Function's backward.

    Attributes:
        weight_grad: ``Σ_n G_n`` (in the layer's ``(rows, cols)`` view), or None until the tracker has formed it.
        weight: ``id`` of the call's weight (only that module's call may fill it).
        planned: The forward fused the call because its route materialises the gradients anyway (level ``"auto"``):
            :func:`fill_slot` materialises factored ones without weighing again.
    """

    def __init__(self, weight: int = 0, planned: bool = False) -> None:
        self.weight_grad: torch.Tensor | None = None
        self.weight, self.planned = weight, planned


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
    @_first_order  # the slot's sum is not a function of the graph: a second derivative raises, never wrong
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
    @_first_order
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


class FusedAddmm(torch.autograd.Function):
    """Hugging Face ``Conv1D``'s ``torch.addmm(bias, x, weight)`` whose weight gradient comes from a :class:`Slot`.

    ``x [N, in]``, ``weight [in, out]``, a 1-D bias; the slot's sum is used when it is filled.
    """

    @staticmethod
    def forward(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, slot: Slot) -> torch.Tensor:
        """``torch.addmm(bias, x, weight)``; ``slot`` only travels to the backward."""
        return torch.addmm(bias, x, weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        """Save the input and weight (as ``addmm``'s own backward does) and the slot."""
        _, x, weight, slot = inputs
        ctx.save_for_backward(x, weight)
        ctx.slot = slot

    @staticmethod
    @_first_order
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        """Input and bias gradients as autograd's; the weight gradient from the slot when it is filled."""
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight.T if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[2]:
            summed, ctx.slot.weight_grad = ctx.slot.weight_grad, None
            grad_w = x.T @ grad if summed is None else summed.reshape(weight.shape).to(weight.dtype)
        return grad_b, grad_x, grad_w, None


def addmm_arguments(args: tuple, kwargs: dict) -> tuple | None:
    """``(bias, x, weight)`` of a ``Conv1D``-shaped ``torch.addmm`` call, else None (left to autograd).

    ``Conv1D``-shaped: a 1-D bias, 2-D operands, no ``beta`` or ``alpha``.
    """
    if kwargs or len(args) != 3 or not all(torch.is_tensor(a) for a in args):
        return None
    bias, x, weight = args
    if bias.dim() != 1 or x.dim() != 2 or weight.dim() != 2 or bias.shape[0] != weight.shape[1]:
        return None
    return bias, x, weight


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

FusedLevel = bool | str
"""Fused mode's level (:attr:`~gradcoh.logger.config.LoggerConfig.fused`): ``"auto"``, True or False."""

SketchKind = Callable[[int, Form], "tuple[str, int] | None"]
"""``(id(weight), form) -> (projection kind, k)`` of a fused weight's sketch (None without sketches)."""


def fusable_weights(plans: list[LayerPlan]) -> frozenset[int]:
    """Ids of the weights fused mode may take over: Linear, convolution, ``Conv1D`` layers covered by their rule alone.

    ``Conv1D``: the Hugging Face modules :func:`~gradcoh.logger.layers.transposed_linear_rule` covers.
    """
    out = set()
    for plan in plans:
        if len(plan.sources) != 1 or plan.loose_modules:
            continue
        source = plan.sources[0]
        module = source.module
        rule = _FUSABLE.get(type(module), transposed_linear_rule)
        if rule is source.rule and isinstance(getattr(module, "weight", None), nn.Parameter) and \
                module.weight.requires_grad and source.params[0] is module.weight:
            out.add(id(module.weight))
    return frozenset(out)


def fill_slot(grad: LayerGrad, slot: Slot, projector: Projection | None = None) -> LayerGrad:
    """Fused mode: leave the sum of a call's per-example weight gradients for its backward.

    Materialised gradients fill it as they are. Factored ones: at level ``"auto"`` the forward fused the call
    because the route materialises them anyway (:func:`call_is_fused`), so they are materialised here (if they
    :func:`fits`); at level True when :func:`fused_is_cheaper` with the weight's sketch ``projector`` (None without
    sketches). They are formed a few examples at a time, their norms, sum and sketch (``projector``) taken from
    each chunk (:meth:`~gradcoh.logger.grads.Factored.reduced`). Otherwise the slot stays empty and the backward
    computes autograd's GEMM. A Hugging Face ``Conv1D``'s :class:`~gradcoh.logger.grads.Composite` has its
    weight part first.
    """
    if isinstance(grad, Composite):
        (part, view), *rest = grad.parts
        return Composite([(fill_slot(part, slot, projector), view), *rest])
    if isinstance(grad, Dense):
        slot.weight_grad = grad.blocks[0].sum(0)
        return grad
    if not isinstance(grad, Factored) or grad.u is None:
        return grad
    if slot.planned:
        if not fits(grad.n, grad.n_rows, grad.n_cols, grad.v.element_size()):
            return grad
    elif not fused_is_cheaper(grad.n, grad.positions, grad.n_rows, grad.n_cols, grad.v.element_size(), projector):
        return grad
    dense, slot.weight_grad = grad.reduced(projector, summed=True)  # [rows, cols]: Σ_n G_n, the weight gradient
    return dense


def fused_is_cheaper(n: int, positions: int, rows: int, cols: int, element_size: int,
                     projector: Projection | None = None) -> bool:
    """Level True: whether to materialise a call's factored per-example gradients ``[n, rows, cols]`` for its slot.

    Materialising costs ``(T + 1)·rows·cols`` multiply-adds per example (:func:`~gradcoh.logger.grads.
    materialise_is_cheaper`) and spares autograd's weight-gradient GEMM, ``T·rows·cols``, less the slot's sum,
    ``rows·cols``; the factored route costs the ghost norm ``T²·(rows + cols)``, and with a sketch each route adds
    its projection's cost. Weighed with the fixed constants :data:`~gradcoh.logger.costs.SKETCH_COSTS`, never
    measured, so ``.grad``'s rounding is the same on every machine and every run for the same shapes. Measured on
    one CPU core (kernels alone, fused / unfused): Llama q_proj (n 8, T 128, 256 × 256) 0.50, its MLP (688 × 256)
    0.80, a ViT qkv (n 16, T 65, 576 × 192) 0.77, ResNet-18 layer1 conv (n 32, T 256, 64 × 576) 0.19, all chosen;
    ResNet-18 layer4 conv (T 4, 512 × 4608) 37 and a T = 1 Linear (256 × 256) 15.5, both refused. In the whole
    step these materialisations lost on the transformers' exact statistics (docs/benchmarks.md, 2026-12-03): level
    ``"auto"`` never materialises only to fill a slot.
    """
    return materialise_is_cheaper(n, positions, rows, cols, element_size, projector, SKETCH_COSTS,
                                  saved=(positions - 1) * rows * cols)


class _Planned:
    """A sketch projection not built yet, by kind: its :meth:`route_cost` for :func:`materialise_is_cheaper`."""

    def __init__(self, kind: str, view: tuple[int, int], dim: int) -> None:
        self.cls, self.view, self.dim = PROJECTIONS[kind], view, dim

    def route_cost(self, form: Form, costs: KernelCosts) -> float:
        """:meth:`~gradcoh.logger.sketch.Projection.route_cost` of the planned projection."""
        return self.cls.cost(self.view, self.dim, form, costs)


def materialised_anyway(n: int, positions: int, rows: int, cols: int, element_size: int, dense: bool,
                        view: tuple[int, int], sketch: tuple[str, int] | None) -> bool:
    """Whether the unfused step materialises a call's per-example weight gradients ``[n, rows, cols]`` anyway.

    ``dense``: the rule returns them materialised (grouped convolutions, convolutions whose materialising kernel
    is cheaper than the ghost norm). Otherwise the route choice (:func:`~gradcoh.logger.grads.choose_route`) with
    the weight's sketch projection of kind ``sketch[0]`` and dimension ``sketch[1]`` (None: no sketch), weighed
    with the fixed :data:`~gradcoh.logger.costs.SKETCH_COSTS` (the step itself may weigh measured costs; the two
    agree but for the sketch's scatter/GEMM ratio — a disagreement costs time, never a value).
    """
    if dense:
        return True
    planned = None if sketch is None else _Planned(sketch[0], view, sketch[1])
    return materialise_is_cheaper(n, positions, rows, cols, element_size, planned, SKETCH_COSTS)


def spares_enough(n: int, positions: int, rows: int, cols: int) -> bool:
    """Whether the weight-gradient GEMM a fused call spares pays for the fused call.

    The GEMM: ``n·T·rows·cols`` multiply-adds at ``SKETCH_COSTS.gemm``; the call: the Function's fixed cost
    :data:`~gradcoh.logger.costs.FUSED_CALL_NS` and the slot's sum over the examples, ``n·rows·cols`` elements at
    :data:`~gradcoh.logger.costs.FUSED_SUM_NS` (memory-bound: a call with few positions, e.g. ConvNeXt's and
    ResNet-18's last stages at T = 4–16, spares less than its sum costs).
    """
    size = n * rows * cols
    return SKETCH_COSTS.gemm * size * positions >= FUSED_CALL_NS + FUSED_SUM_NS * size


def saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (non-reentrant checkpointing, its recomputation, ``save_on_cpu``).

    A fused call is not made there: the recomputation runs outside the record's bookkeeping and would call autograd's
    own op, whose saved tensors differ from the fused Function's (checkpointing refuses the mismatch).
    """
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def call_shape(n: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               conv: tuple | None = None, transposed: bool = False) -> tuple[int, int, int, bool]:
    """``(positions T, rows, cols, dense)`` of a call's per-example weight gradients, as its rule forms them.

    ``cols`` counts the bias column where the rule keeps it in the weight's view (Linear, convolution; a
    ``Conv1D``'s bias is a part of its own); ``dense``: the rule returns them materialised
    (:func:`~gradcoh.logger.ops.conv.conv`: grouped, or materialising costs less than the ghost norm).
    """
    extra = int(bias is not None)
    if transposed:  # Conv1D: addmm(bias, x [n·T, in], weight [in, out])
        return max(x.shape[0] // max(n, 1), 1), weight.shape[0], weight.shape[1], False
    rows = weight.shape[0]
    if conv is None:
        positions = x.numel() // max(n * weight.shape[-1], 1)
        return max(positions, 1), rows, weight.shape[-1] + extra, False
    stride, padding, dilation, groups = conv[3:]
    positions = x.numel() // max(n * x.shape[1], 1)  # the input's positions per example, then the output's
    for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True):
        positions = positions // size * ((size + 2 * p - d * (k - 1) - 1) // s + 1)
    positions, cols = max(positions, 1), math.prod(weight.shape[1:]) + extra  # (indexing would dispatch an op)
    dense = groups > 1 or materialise_is_cheaper(n, positions, rows, cols, weight.element_size())
    return positions, rows, cols, dense


def conv_spares_nothing(level: FusedLevel, x: Any) -> bool:
    """Whether a convolution call on input ``x`` is left unfused below level True: its input needs a gradient.

    ``convolution_backward`` then forms the weight gradient in the pass that forms the input's, at no measurable
    extra time (:func:`call_is_fused`), so fusing would spare nothing. The use tracker asks before binding the call's
    arguments (every interior convolution), :func:`call_is_fused` for any caller.
    """
    return level is not True and isinstance(x, torch.Tensor) and x.requires_grad


def call_is_fused(n: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  conv: tuple | None = None, *, level: FusedLevel = "auto", sketch: SketchKind | None = None,
                  transposed: bool = False) -> bool:
    """Whether a Linear, convolution (``conv``) or ``Conv1D`` (``transposed``) call runs through its fused Function.

    Decided at the forward from the shapes; :func:`fill_slot` fills the slot of every call fused here (it may stay
    empty only where the gradient does not :func:`fits`), so no call pays the Function's cost for nothing.

    - ``"auto"``: exactly the calls whose per-example weight gradients the unfused step materialises anyway
      (:func:`materialised_anyway`, with the weight's sketch projection: ``sketch(id(weight), form)`` gives its
      kind — chosen at the first step from the rule's form, so predicted here from the same form), and only where
      the spared GEMM pays the Function (:func:`spares_enough`). Only removes work. A convolution whose input needs
      a gradient is not fused: ``convolution_backward`` forms the weight gradient in the pass that forms the
      input's, at no measurable extra time (one CPU core, oneDNN, interleaved medians of 25: 3×3 64→64 at 16×16,
      all 14.9 ms / input and bias only 14.2; 1×1 40→160 5.05 / 5.35; depthwise 7×7 19.8 / 19.4; weight alone
      2.5–18 ms), so fusing it would add the slot's sum and the Function's cost and spare nothing; a first
      convolution (its input an image) is fused, its whole weight-gradient kernel spared.
    - True: also where materialising costs less once the spared GEMM is counted (:func:`fused_is_cheaper`, without
      the sketch; :func:`fill_slot` then decides with it). Grouped convolutions are always fused.
    - False: never.
    """
    if not level or n <= 0 or not torch.is_grad_enabled() or saved_tensors_hooked() or torch.is_autocast_enabled(
            x.device.type):  # (no grad: the no-grad forward of reentrant checkpointing has no backward to spare)
        return False  # (autocast: the op would compute in low precision from inputs the Function saved unconverted)
    if conv is not None and conv_spares_nothing(level, x):
        return False
    positions, rows, cols, dense = call_shape(n, x, weight, bias, conv, transposed)
    if level is True:
        return (conv is not None and conv[6] > 1) or fused_is_cheaper(n, positions, rows, cols,
                                                                       weight.element_size())
    if not spares_enough(n, positions, rows, cols):
        return False
    form = ("dense", 1) if dense else ("factored", positions)
    return materialised_anyway(n, positions, rows, cols, weight.element_size(), dense, natural_view(weight.shape),
                               None if sketch is None else sketch(id(weight), form))
