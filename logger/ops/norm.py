"""Normalisations ``y = x̂·w + b`` (LayerNorm, RMSNorm, GroupNorm, BatchNorm, InstanceNorm).

``g_w = Σ x̂·δ`` and ``g_b = Σ δ`` per example, summed over every axis but the batch and the parameter's own axes.
``x̂`` comes from the op's own kernel without the affine part (one fused pass, the forward's rounding), with the
statistics the op itself used: with batch statistics (train-mode BatchNorm) the examples are coupled and each
example's gradient is its *contribution* to the batch gradient (the contributions sum exactly to ``.grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grads import Dense


def affine(xhat: torch.Tensor, delta: torch.Tensor, reduce_dims: tuple[int, ...], *, weight: bool,
           bias: bool) -> Dense:
    """Per-example gradients of ``y = x̂·w + b`` as column blocks ``[n, rows, ·]`` (weight, then bias).

    Args:
        xhat: The normalised input, batch on dimension 0.
        delta: The output gradient, same shape.
        reduce_dims: The axes the parameters broadcast along (all but the batch and the parameters' own axes).
        weight: The weight trains.
        bias: The bias trains.

    Returns:
        The blocks in the stacked view of ``[w | b]``: rows are the parameters' first axis.
    """
    terms = ([xhat * delta] if weight else []) + ([delta] if bias else [])
    return _blocks(terms, reduce_dims, delta.shape[0])


def _blocks(terms: list[torch.Tensor], reduce_dims: tuple[int, ...], n: int) -> Dense:
    """The terms summed over ``reduce_dims``, as ``[n, rows, ·]`` blocks."""
    grads = [t.sum(reduce_dims) if reduce_dims else t for t in terms]  # [n, *param shape]
    return Dense(*(g.reshape(n, g.shape[1] if g.dim() > 1 else 1, -1) for g in grads))


def layer_norm_affine(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, delta: torch.Tensor,
                      reduce_dims: tuple[int, ...], *, weight: bool, bias: bool) -> Dense:
    """:func:`affine` of ``F.layer_norm`` from the mean and ``1/σ`` its forward kernel saved (:func:`forward_stats`).

    ``x̂·δ = (x - mean)·rstd·δ`` in one temporary (the kernel's own ``x̂``, to the last bit on CPU), instead of
    running the normalisation again: a second ``native_layer_norm`` costs about five times the two multiplies (its
    row moments), and its ``x̂`` is a second ``[n, ..., d]`` temporary.

    Args:
        x: The norm's input, batch on dimension 0.
        mean: The saved mean (the input's leading shape, trailing axes of size 1).
        rstd: The saved ``1/σ``, same shape.
        delta: The output gradient, shape of ``x``.
        reduce_dims: As :func:`affine`.
        weight: The weight trains.
        bias: The bias trains.
    """
    terms = ([torch.sub(x, mean).mul_(rstd).mul_(delta)] if weight else []) + ([delta] if bias else [])
    return _blocks(terms, reduce_dims, delta.shape[0])


def forward_stats(out: torch.Tensor, inputs: list) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """``(position in inputs, mean, rstd)`` that the ``F.layer_norm`` kernel which made ``out`` saved for backward.

    None unless ``out`` comes from ATen's ``native_layer_norm`` on one of ``inputs`` itself (not a converted copy,
    as under autocast) with float32 statistics. Read in the forward (the kernel's node frees them once it has run);
    the tensors are the ones autograd holds anyway.
    """
    node = out.grad_fn
    if type(node).__name__ != "NativeLayerNormBackward0":
        return None
    x = node._saved_input
    pos = next((i for i, t in enumerate(inputs) if t is x), None)
    mean, rstd = node._saved_result1, node._saved_result2
    if pos is None or x.dtype != torch.float32 or mean.dtype != torch.float32 or rstd.dtype != torch.float32:
        return None
    return pos, mean.detach(), rstd.detach()


def stats_fit(x: torch.Tensor, delta: torch.Tensor, mean: torch.Tensor, dims: int) -> bool:
    """Whether statistics from :func:`forward_stats` belong to ``x`` normalised over its last ``dims`` axes.

    The saved mean has the input's leading shape and ``dims`` trailing axes of size 1, and ``delta`` is shaped like
    ``x``; otherwise the caller normalises again.
    """
    return delta.shape == x.shape and tuple(mean.shape) == (*x.shape[:x.dim() - dims], *(1,) * dims)


def running_affine(x: torch.Tensor, delta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float, *,
                   weight: bool, bias: bool) -> Dense:
    """:func:`affine` of a channel norm with running statistics (eval-mode BatchNorm), ``x̂`` never materialised.

    Each (example, channel) pair is made a channel of one batch-norm backward (``[1, n·C, *spatial]``, the
    statistics repeated per example): ATen's kernel returns ``Σ (x - mean)·δ · invstd`` and ``Σ δ`` per pair in one
    fused pass, the same values as ``Σ x̂·δ`` to float32 rounding (``x - mean`` is formed before any sum, so no
    cancellation), at a fraction of the cost of normalising, multiplying and summing.

    Args:
        x: The norm's input ``[n, C, ...]`` (batch on 0, channels on 1).
        delta: The output gradient, same shape.
        mean: The running mean ``[C]``.
        var: The running variance ``[C]``.
        eps: The op's ``eps``.
        weight: The weight trains.
        bias: The bias trains.
    """
    n, c = x.shape[:2]
    flat = (1, n * c, *x.shape[2:])
    _, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
        delta.reshape(flat), x.reshape(flat), None, mean.repeat(n), var.repeat(n), None, None, False, eps,
        [False, weight, bias])
    grads = ([g_w] if weight else []) + ([g_b] if bias else [])
    return Dense(*(g.reshape(n, c, 1) for g in grads))


RUNNING_MIN_POSITIONS = 16
"""Positions per channel from which :func:`running_affine` is the cheaper route (its kernel costs about 50 ns per
(example, channel) pair; below 16 positions, EfficientNet-B0's 2×2 maps, normalising and summing is cheaper). A
function of the shapes only, so the route is the same on every machine."""


def runs_fused(x: torch.Tensor, delta: torch.Tensor, mean: object, var: object) -> bool:
    """Whether an eval-mode channel norm of ``x`` takes :func:`running_affine` (``nn.BatchNorm``'s rule, uses).

    It does with float32 running statistics of its channels and at least :data:`RUNNING_MIN_POSITIONS` positions per
    channel.
    """
    if x.dim() < 2 or x.shape != delta.shape:
        return False
    return all(isinstance(s, torch.Tensor) and s.dtype == torch.float32 and tuple(s.shape) == (x.shape[1],)
               for s in (mean, var)) and x.shape[2:].numel() >= RUNNING_MIN_POSITIONS  # (shape: no select ops)


def layer_norm(x: torch.Tensor, shape: tuple[int, ...], eps: float) -> torch.Tensor:
    """``x̂`` of ``F.layer_norm`` over the trailing ``shape``."""
    return F.layer_norm(x, shape, None, None, eps)


def rms_norm(x: torch.Tensor, shape: tuple[int, ...], eps: float | None) -> torch.Tensor:
    """``x̂ = x / rms(x)`` of ``F.rms_norm`` (``eps`` None: the dtype's, as the module)."""
    return F.rms_norm(x, shape, None, eps)


def group_norm(x: torch.Tensor, num_groups: int, eps: float) -> torch.Tensor:
    """``x̂`` of ``F.group_norm``."""
    return F.group_norm(x, num_groups, None, None, eps)


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               batch_stats: bool, eps: float) -> torch.Tensor:
    """``x̂`` of ``F.batch_norm``: batch statistics when ``batch_stats`` or without running ones (none updated)."""
    if batch_stats or running_mean is None:
        return F.batch_norm(x, None, None, None, None, True, 0.0, eps)
    return F.batch_norm(x, running_mean, running_var, None, None, False, 0.0, eps)


def instance_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                  use_input_stats: bool, eps: float) -> torch.Tensor:
    """``x̂`` of ``F.instance_norm``: each example's own statistics, or the running ones (none updated)."""
    if use_input_stats or running_mean is None:
        return F.instance_norm(x, None, None, None, None, True, 0.0, eps)
    return F.instance_norm(x, running_mean, running_var, None, None, False, 0.0, eps)


def normalised(name: str, x: torch.Tensor, bound: dict) -> torch.Tensor:
    """``x̂`` of the functional op ``name`` called with the arguments ``bound`` (by the op's parameter names)."""
    eps = bound["eps"]
    if name == "layer_norm":
        shape = bound["normalized_shape"]
        return layer_norm(x, (shape,) if isinstance(shape, int) else tuple(shape), eps)
    if name == "rms_norm":
        shape = bound["normalized_shape"]
        return rms_norm(x, (shape,) if isinstance(shape, int) else tuple(shape), eps)
    if name == "group_norm":
        return group_norm(x, bound["num_groups"], eps)
    if name == "batch_norm":
        return batch_norm(x, bound["running_mean"], bound["running_var"], bound["training"], eps)
    return instance_norm(x, bound["running_mean"], bound["running_var"], bound["use_input_stats"], eps)


OPS = frozenset({"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"})
"""The functional normalisation ops :func:`normalised` knows."""

TRAILING = frozenset({"layer_norm", "rms_norm"})
"""Ops whose parameters cover the trailing axes (the others: the channel axis 1)."""
