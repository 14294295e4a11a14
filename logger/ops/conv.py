"""Convolutions ``nn.Conv1d/2d/3d`` (stride, padding incl. modes and 'same', dilation, groups).

``G_n = Σ_t δ_t [a_t, 1]ᵀ`` with ``a_t`` the im2col patch of output position ``t`` (factored), or the per-example
weight gradient computed directly by the fastest exact kernel on this device (materialised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..costs import fastest, kernel_costs
from ..grads import Dense, Factored, bias_grad, materialise_is_cheaper


def conv(module: nn.modules.conv._ConvNd, x: torch.Tensor, delta: torch.Tensor) -> Dense | Factored:
    """Per-example gradients of one convolution call in the ``[W | b]`` view ``(C_out, C_in/g·prod(k) + bias)``.

    When :func:`~gradcoh.logger.grads.materialise_is_cheaper` (early convolutions with many positions) or the
    convolution is grouped (no factored route), the per-example weight gradients are computed in one call of the
    convolution's own weight-gradient kernel, with the batch folded into the groups; otherwise im2col factors are
    returned for the ghost norm. The kernel is chosen by :func:`~gradcoh.logger.costs.fastest`, which times the
    candidates once per shape and device and caches the choice for the process.

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
    """im2col for 1-, 2- and 3-D convolutions: ``[n, C, *spatial] → [n, T, C·prod(kernel)]``."""
    nd = x.dim() - 2
    if nd == 2:
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    pads: list[int] = []
    for p in reversed(padding):
        pads += [p, p]
    x = F.pad(x, pads)
    for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride, strict=True)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]  # appends a window axis
    n = x.shape[0]
    t = x.shape[2 : 2 + nd].numel()
    # [n, C, *out, *k] → [n, *out, C, *k] → [n, T, C·prod(k)]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    return x.permute(perm).reshape(n, t, -1)


def per_example_weight_grad(module: nn.modules.conv._ConvNd, x: torch.Tensor, delta: torch.Tensor,
                            padding: tuple) -> torch.Tensor:
    """``[n, C_out, C_in/g·prod(k)]`` by the fastest exact route on this device for these shapes.

    Depthwise 2-D convolutions (one input channel per output channel) have a second route, one shifted product
    per kernel tap (:func:`depthwise_weight_grad`), which CPU kernels run up to 3× faster on large feature maps
    and slower on small ones; :func:`~gradcoh.logger.costs.fastest` measures both at first use per shape.
    """
    routes = [lambda: grouped_weight_grad(module, x, delta, padding)]
    if x.dim() == 4 and module.weight.shape[1] == 1 and module.out_channels == module.in_channels:
        routes.append(lambda: depthwise_weight_grad(module, x, delta, padding))
    key = ("conv-weight-grad", str(x.device), x.dtype, tuple(x.shape), tuple(delta.shape), module.kernel_size,
           module.stride, module.dilation, padding, module.groups)
    return fastest(key, x.device, routes)


def depthwise_weight_grad(module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor, padding: tuple) -> torch.Tensor:
    """``[n, C, kh·kw]`` of a depthwise convolution: ``Σ_{h,w} δ[n,c,h,w] · x_pad[n,c,h·s+i·d, w·s+j·d]`` per tap."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    h, w = delta.shape[2], delta.shape[3]
    out = delta.new_empty(x.shape[0], x.shape[1], kh, kw)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dh : i * dh + sh * (h - 1) + 1 : sh, j * dw : j * dw + sw * (w - 1) + 1 : sw]
            out[:, :, i, j] = (window * delta).sum((2, 3))
    return out.reshape(x.shape[0], x.shape[1], -1)


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
