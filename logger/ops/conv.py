"""Convolutions ``nn.Conv1d/2d/3d`` (stride, padding incl. modes and 'same', dilation, groups).

``G_n = Σ_t δ_t [a_t, 1]ᵀ`` with ``a_t`` the im2col patch of output position ``t`` (factored), or the per-example
weight gradient computed directly in one kernel call (materialised: :func:`per_example_weight_grad`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..costs import kernel_costs
from ..grads import Dense, Factored, bias_grad, materialise_is_cheaper


def conv(module: nn.modules.conv._ConvNd, x: torch.Tensor, delta: torch.Tensor) -> Dense | Factored:
    """Per-example gradients of one convolution call in the ``[W | b]`` view ``(C_out, C_in/g·prod(k) + bias)``.

    When :func:`~gradcoh.logger.grads.materialise_is_cheaper` (early convolutions with many positions) or the
    convolution is grouped (no factored route), the per-example weight gradients are computed in one kernel call
    (:func:`per_example_weight_grad`); otherwise im2col factors are returned for the ghost norm (a kernel-1
    convolution's input is its own factor, no copy).

    Args:
        module: The convolution (its hyper-parameters; the weight only for its shape).
        x: The call's input ``[n, C_in, *spatial]``.
        delta: The output gradient ``[n, C_out, *spatial_out]``.
    """
    n, rows = x.shape[0], module.out_channels
    has_bias = module.bias is not None and module.bias.requires_grad
    per_position = delta.reshape(n, rows, -1).transpose(1, 2)  # [n, T, C_out]
    if not module.weight.requires_grad:  # frozen weight: only the bias trains
        return bias_grad(per_position)
    x, padding = _explicit_padding(module, x)
    cols = module.weight[0].numel() + has_bias
    if module.groups > 1 or materialise_is_cheaper(n, per_position.shape[1], rows, cols, delta.element_size(),
                                                   costs=kernel_costs(x.device, x.dtype)):
        w = per_example_weight_grad(module, x, delta, padding)  # [n, C_out, C_in/g·k]
        return Dense(w, *bias_grad(per_position).blocks) if has_bias else Dense(w)
    a = unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # [n, T, C_in·k]
    return Factored(per_position, a, bias=has_bias)


def _explicit_padding(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Apply non-zero padding modes and 'same' explicitly; return the input and the remaining zero padding."""
    nd = x.dim() - 2
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * nd
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x, (0,) * nd
        pads: list[int] = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(module.padding)


def unfold(x: torch.Tensor, kernel: tuple, dilation: tuple, padding: tuple, stride: tuple) -> torch.Tensor:
    """im2col for 1-, 2- and 3-D convolutions: ``[n, C, *spatial] → [n, T, C·prod(kernel)]``.

    A kernel of 1 without padding needs no copy at stride 1: the input itself, viewed ``[n, T, C]``.
    """
    nd = x.dim() - 2
    if all(k == 1 for k in kernel) and not any(padding):
        return _strided(x, stride).reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)
    if nd == 2:
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    x = _zero_pad(x, padding)
    for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride, strict=True)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]  # appends a window axis
    n = x.shape[0]
    t = x.shape[2 : 2 + nd].numel()
    # [n, C, *out, *k] → [n, *out, C, *k] → [n, T, C·prod(k)]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(perm).reshape(n, t, -1)


def per_example_weight_grad(module: nn.modules.conv._ConvNd, x: torch.Tensor, delta: torch.Tensor,
                            padding: tuple) -> torch.Tensor:
    """``[n, C_out, C_in/g·prod(k)]`` in one kernel call, the route chosen from the shapes (no timing).

    Pointwise convolutions (kernel 1, no padding, one group) are one batched GEMM of the output gradient with the
    (strided) input, no im2col copy (:func:`pointwise_weight_grad`). Convolutions with one input channel per group
    (depthwise, with or without a channel multiplier) are one forward convolution of the input with the output
    gradient as its kernel (:func:`correlation_weight_grad`); the others one call of the convolution's weight-gradient
    kernel with the batch folded into the groups (:func:`grouped_weight_grad`). One CPU core, batch 32 (ms, grouped /
    correlation): depthwise 7×7 on 16×16 maps 25 / 1.0, 5×5 stride 2 7.3 / 1.6, 3×3 stride 2 3.6 / 4.7; dense 3×3
    with 64 input channels 9.2 / 24, a 3-channel stem 17 / 14.
    """
    if module.groups == 1 and all(k == 1 for k in module.kernel_size) and not any(padding):
        return pointwise_weight_grad(x, delta, module.stride)
    if x.shape[1] == module.groups:
        return correlation_weight_grad(module, x, delta, padding)
    return grouped_weight_grad(module, x, delta, padding)


def pointwise_weight_grad(x: torch.Tensor, delta: torch.Tensor, stride: tuple) -> torch.Tensor:
    """``[n, C_out, C_in]`` of a kernel-1 convolution without padding: ``δ_n · x_nᵀ`` over the (strided) positions."""
    n, x = x.shape[0], _strided(x, stride)
    return torch.bmm(delta.reshape(n, delta.shape[1], -1), x.reshape(n, x.shape[1], -1).transpose(1, 2))


def correlation_weight_grad(module: nn.modules.conv._ConvNd, x: torch.Tensor, delta: torch.Tensor,
                            padding: tuple) -> torch.Tensor:
    """``[n, C_out, C_in/g·prod(k)]`` as one forward convolution: the input correlated with the output gradient.

    ``G[n, o, c, i] = Σ_p δ[n, o, p] · x_pad[n, c, p·s + i·d]``: a convolution of ``x`` (its ``C_in/g`` channels of a
    group as the batch, the ``n·g`` (example, group) pairs as channels) with ``δ`` as a ``n·g``-group kernel, dilated
    by the stride and strided by the dilation; its first ``prod(k)`` outputs per axis are the taps. Padding as wide
    as that kernel (small maps, e.g. 2×2 with a 7×7 convolution) is applied beforehand: oneDNN refuses it and the
    fallback kernel is 5–10× slower.
    """
    n, g, nd = x.shape[0], module.groups, x.dim() - 2
    if any(p >= s * (size - 1) + 1 for p, s, size in zip(padding, module.stride, delta.shape[2:], strict=True)):
        x, padding = _zero_pad(x, padding), (0,) * nd
    cg, spatial = x.shape[1] // g, x.shape[2:]
    inp = x.reshape(1, n * g, *spatial) if cg == 1 else x.reshape(n * g, cg, *spatial).transpose(0, 1)
    kernel = delta.reshape(delta.shape[0] * delta.shape[1], 1, *delta.shape[2:])
    out = _CONV[nd](inp, kernel, None, stride=tuple(module.dilation), padding=tuple(padding),
                    dilation=tuple(module.stride), groups=n * g)  # [C_in/g, n·C_out, ≥k per axis]
    out = out[(slice(None), slice(None), *(slice(0, k) for k in module.kernel_size))]
    return out.reshape(cg, n, module.out_channels, -1).permute(1, 2, 0, 3).reshape(n, module.out_channels, -1)


def _zero_pad(x: torch.Tensor, padding: tuple) -> torch.Tensor:
    """``x`` zero-padded by ``padding[i]`` on both sides of spatial axis ``i``."""
    pads: list[int] = []
    for p in reversed(padding):
        pads += [p, p]
    return F.pad(x, pads)


def _strided(x: torch.Tensor, stride: tuple) -> torch.Tensor:
    """The input positions a kernel-1 convolution of this stride reads (a view)."""
    if all(s == 1 for s in stride):
        return x
    return x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def grouped_weight_grad(module: nn.modules.conv._ConvNd, x: torch.Tensor, delta: torch.Tensor,
                        padding: tuple) -> torch.Tensor:
    """``[n, C_out, C_in/g·prod(k)]``: the batch folded into the groups of one convolution-backward call."""
    n, g = x.shape[0], module.groups
    weight = module.weight.detach()
    stacked = weight.new_empty((n * weight.shape[0], *weight.shape[1:]))  # only its shape is used
    grad_w = torch.ops.aten.convolution_backward(
        delta.reshape(1, -1, *delta.shape[2:]), x.reshape(1, -1, *x.shape[2:]), stacked, None, list(module.stride),
        list(padding), list(module.dilation), False, [0] * len(padding), n * g, [False, True, False],
    )[1]
    return grad_w.reshape(n, module.out_channels, -1)
