"""Convolutions ``nn.Conv1d/2d/3d`` (stride, padding incl. modes and 'same', dilation, groups).

``G_n = Σ_t δ_t [a_t, 1]ᵀ`` with ``a_t`` the im2col patch of output position ``t`` (factored), or the per-example
weight gradient computed directly in one kernel call (materialised: :func:`per_example_weight_grad`).

The ghost norm needs the Gram of the patches, ``⟨a_t, a_s⟩``. Each patch is the input at the positions its kernel
taps read, so ``⟨a_t, a_s⟩ = Σ_o M[p_t + o, p_s + o]`` over the taps ``o``, with ``M`` the Gram of the (zero-padded)
input map's positions: ``S²·C`` multiply-adds for the map's ``S`` positions and ``K·T²`` adds, instead of forming
the ``[T, C·K]`` patches and their ``T²·C·K`` Gram (:class:`Patches`, :class:`PatchFactored`; a stride-1 3×3
convolution: 9× fewer multiply-adds and no im2col copy).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ghost
from ..costs import kernel_costs
from ..grads import Dense, Factored, bias_grad, materialise_is_cheaper
from ..sketch import Projection, TensorSketchMean

ELEMENT_MACS = 20.0
"""An element read and written by a memory-bound op (the im2col copy, a shifted add of Gram entries) counted as this
many multiply-adds of a batched GEMM, in the choice between the factored routes (one CPU core: the im2col copy of
ResNet-18's layer2 patches 1.5 ns per element, a batched GEMM 0.025–0.04 ns per multiply-add; a fixed constant, so
the route depends on the shapes only; both routes give the same values to rounding)."""


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
    cols = math.prod(module.weight.shape[1:]) + has_bias  # (indexing the weight would dispatch an op)
    patches = Patches(x, tuple(module.kernel_size), tuple(module.dilation), tuple(padding), tuple(module.stride),
                      tuple(delta.shape[2:]))
    by_map = module.groups == 1 and patches.map_route(rows)
    if module.groups > 1 or materialise_is_cheaper(n, per_position.shape[1], rows, cols, delta.element_size(),
                                                   costs=kernel_costs(x.device, x.dtype),
                                                   factored=patches.map_macs(rows) if by_map else None):
        w = per_example_weight_grad(module, x, delta, padding)  # [n, C_out, C_in/g·k]
        return Dense(w, *bias_grad(per_position).blocks) if has_bias else Dense(w)
    if by_map:
        return PatchFactored(per_position, bias=has_bias, patches=patches)
    return Factored(per_position, patches.unfold(), bias=has_bias)  # v: [n, T, C_in·k]


@dataclass(frozen=True)
class Patches:
    """The im2col patches of one convolution call, described by its input and geometry (formed only on demand).

    Attributes:
        x: The input ``[n, C, *spatial]`` (non-zero padding modes and 'same' already applied).
        kernel: Kernel size per spatial axis.
        dilation: Dilation per axis.
        padding: Remaining zero padding per axis.
        stride: Stride per axis.
        out: Output size per axis (``T = prod(out)`` positions).
    """

    x: torch.Tensor
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    stride: tuple[int, ...]
    out: tuple[int, ...]

    @property
    def cols(self) -> int:
        """Columns of a patch, ``C·prod(kernel)``."""
        return self.x.shape[1] * math.prod(self.kernel)

    def unfold(self) -> torch.Tensor:
        """``[n, T, C·prod(kernel)]`` (:func:`unfold`)."""
        return unfold(self.x, self.kernel, self.dilation, self.padding, self.stride)

    def unfold_taps_last(self) -> torch.Tensor:
        """``[n, T, prod(kernel)·C]`` patches with columns ordered ``(tap, channel)`` (:meth:`unfold`: reversed).

        Formed from a channels-last copy of the (zero-padded) input: each patch is ``prod(kernel)`` contiguous runs of
        ``C`` entries, where :meth:`unfold`'s ``[n, T, C·prod(kernel)]`` is a transposed view whose contiguous copy
        moves every entry alone (ResNet-18's 3×3 convolutions at 4×4: 1.0 vs 3.6–8.5 ms for ``[32, 16, 2304]``, one
        CPU core). For a TensorSketch, which hashes each column on its own
        (:meth:`~gradcoh.logger.sketch.TensorSketchMean.factored_taps_last`).
        """
        x = _zero_pad(self.x, self.padding).movedim(1, -1).contiguous()  # [n, *padded, C]
        nd = len(self.kernel)
        for dim, (k, d, s) in enumerate(zip(self.kernel, self.dilation, self.stride, strict=True)):
            x = x.unfold(1 + dim, d * (k - 1) + 1, s)[..., ::d]  # appends a window axis: [n, *out, C, *k]
        perm = [0, *range(1, 1 + nd), *range(2 + nd, 2 + 2 * nd), 1 + nd]  # → [n, *out, *k, C]
        return x.permute(perm).reshape(x.shape[0], math.prod(self.out), -1)

    def map_macs(self, rows: int) -> float:
        """Multiply-adds per example of the ghost norm through the map's Gram (:meth:`gram`).

        The map's Gram and the row factor's full Gram, then (memory-bound elements weighted by
        :data:`ELEMENT_MACS`) padding the map's Gram, the shifted adds and the product of the two Grams.
        """
        s, t = math.prod(self.x.shape[2:]), math.prod(self.out)
        padded = math.prod(size + 2 * p for size, p in zip(self.x.shape[2:], self.padding, strict=True))
        gemm = s * s * self.x.shape[1] + t * t * rows
        elements = (padded * padded if any(self.padding) else 0) + (math.prod(self.kernel) + 1) * t * t
        return gemm + ELEMENT_MACS * elements

    def patch_macs(self, rows: int) -> float:
        """Multiply-adds per example of the ghost norm of the formed patches: the Gram blocks, the im2col copy."""
        t = math.prod(self.out)
        return ghost.ghost_macs(t, rows, self.cols) + ELEMENT_MACS * t * self.cols

    def map_route(self, rows: int) -> bool:
        """Whether :meth:`gram` is the cheaper way to the patches' Gram (from the shapes only).

        Never for kernel 1 without padding, whose patches are the input itself.
        """
        if math.prod(self.out) < 2 or (all(k == 1 for k in self.kernel) and not any(self.padding)):
            return False
        return self.map_macs(rows) < self.patch_macs(rows)

    def gram(self) -> torch.Tensor:
        """``[n, T, T]`` Gram of the patches, ``⟨a_t, a_s⟩ = Σ_o M[p_t + o, p_s + o]``, never forming them.

        ``M [n, *spatial, *spatial]`` is the Gram of the input's positions (one batched GEMM over the channels),
        zero-padded like the input; each kernel tap ``o`` adds the entries of the output positions' strided grid
        shifted by ``o·dilation`` (a view of ``M``).
        """
        x = self.x
        n, c, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
        flat = x.reshape(n, c, -1)
        m = torch.bmm(flat.transpose(1, 2), flat).reshape(n, *spatial, *spatial)
        if any(self.padding):
            m = _zero_pad(m, self.padding * 2)  # both position axes of the Gram, like the input's
        nd, st = len(self.out), m.stride()
        size = (n, *self.out, *self.out)
        steps = (st[0], *(st[1 + i] * s for i, s in enumerate(self.stride)),
                 *(st[1 + nd + i] * s for i, s in enumerate(self.stride)))
        acc = None
        for tap in itertools.product(*(range(k) for k in self.kernel)):  # the output grid shifted by the tap
            shift = sum(o * d * (st[1 + i] + st[1 + nd + i]) for i, (o, d) in enumerate(zip(tap, self.dilation,
                                                                                          strict=True)))
            view = m.as_strided(size, steps, m.storage_offset() + shift)
            if acc is None:
                acc = view.clone(memory_format=torch.contiguous_format)
            else:
                acc.add_(view)
        t = math.prod(self.out)
        return acc.reshape(n, t, t)

    def columns_dot(self, b: torch.Tensor) -> torch.Tensor:
        """``[n, T]`` products ``a_t · b`` (``b [C·prod(kernel)]``): one convolution with ``b`` as its kernel."""
        x, n = self.x, self.x.shape[0]
        kernel = b.to(x.dtype).reshape(1, x.shape[1], *self.kernel)
        out = _CONV[len(self.out)](x, kernel, None, stride=self.stride, padding=self.padding,
                                   dilation=self.dilation)
        return out.reshape(n, -1)


class PatchFactored(Factored):
    """A convolution's factors ``(δ, patches)`` whose patches are formed only when read (``v``, then kept).

    Its ghost norm takes the patches' Gram from the input map's Gram (:meth:`Patches.gram`) and the guard's
    ``a_t · b`` is a convolution (:meth:`Patches.columns_dot`): neither forms the patches. Sketches, group sums,
    inner products and materialising read ``v`` as for any :class:`~gradcoh.logger.grads.Factored`. A copy made by
    ``dataclasses.replace`` (concatenated calls, folded rows) carries ``v`` and no ``patches``: a plain form.
    """

    def __init__(self, u: torch.Tensor, v: torch.Tensor | None = None, rows_index: torch.Tensor | None = None,
                 n_rows: int = 0, bias: bool = False, *, patches: Patches | None = None) -> None:
        self.patches = patches
        super().__init__(u, v, rows_index, n_rows, bias)

    @property
    def v(self) -> torch.Tensor:
        """``[n, T, C·prod(kernel)]`` patches (formed at the first read)."""
        if self._v is None:
            self._v = self.patches.unfold()
        return self._v

    @v.setter
    def v(self, value: torch.Tensor | None) -> None:
        self._v = value

    @property
    def n_cols(self) -> int:
        """Columns of the matrix view."""
        return (self.patches.cols if self.patches is not None else self.v.shape[-1]) + self.bias

    def split_bias(self) -> tuple[Factored, Dense | None]:
        """The factors without the bias column (still unformed), and that column ``Σ_t δ_t``."""
        if not self.bias:
            return self, None
        return PatchFactored(self.u, self._v, bias=False, patches=self.patches), bias_grad(self.u)

    def sketch(self, projector: Projection) -> torch.Tensor:
        """``[n, k]`` sketches; a TensorSketch mean of unformed patches reads them channels-last.

        :meth:`Patches.unfold_taps_last` is a cheaper copy than :attr:`v`'s; the same projection to rounding.
        """
        if self._v is None and self.patches is not None and not self.bias and isinstance(projector, TensorSketchMean):
            return projector.factored_taps_last(self.u, self.patches.unfold_taps_last(), self.patches.x.shape[1])
        return super().sketch(projector)

    def norm_macs(self) -> float:
        """Multiply-adds per example of :meth:`sq_norms`."""
        if self.patches is None:
            return super().norm_macs()
        return self.patches.map_macs(self.n_rows)

    def sq_norms(self, grams: ghost.GramCache | None = None) -> torch.Tensor:
        """``[n]`` ``⟨δ δᵀ, A Aᵀ⟩`` with the patches' Gram ``A Aᵀ`` from the map's (``grams``: unused)."""
        factors, bias = self.split_bias()
        if bias is not None:
            return factors.sq_norms(grams) + bias.sq_norms()
        if self.patches is None or self.positions == 1:
            return super().sq_norms(grams)
        gu = torch.bmm(self.u, self.u.transpose(1, 2))
        return (gu * self.patches.gram()).sum((1, 2))

    def columns_dot(self, b: torch.Tensor) -> torch.Tensor:
        """``[n, T]`` products ``a_t · b``, by a convolution when the patches are not formed."""
        if self._v is not None or self.patches is None or self.bias:
            return super().columns_dot(b)
        return self.patches.columns_dot(b)


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
        if module.out_channels == module.groups and small_map(x.shape[2:], delta.shape[2:], padding, module.stride):
            return small_map_weight_grad(module, x, delta, padding)
        return correlation_weight_grad(module, x, delta, padding)
    return grouped_weight_grad(module, x, delta, padding)


def pointwise_weight_grad(x: torch.Tensor, delta: torch.Tensor, stride: tuple) -> torch.Tensor:
    """``[n, C_out, C_in]`` of a kernel-1 convolution without padding: ``δ_n · x_nᵀ`` over the (strided) positions."""
    n, x = x.shape[0], _strided(x, stride)
    return torch.bmm(delta.reshape(n, delta.shape[1], -1), x.reshape(n, x.shape[1], -1).transpose(1, 2))


SMALL_MAP_PAIRS = 64
"""Most (input position, output position) pairs per channel for :func:`small_map_weight_grad` (a depthwise
convolution on a map of at most 64 pairs: 2×2 → 2×2, 4×4 → 2×2)."""


def small_map(spatial: tuple[int, ...], spatial_out: tuple[int, ...], padding: tuple[int, ...],
              stride: tuple[int, ...]) -> bool:
    """Whether a depthwise convolution takes :func:`small_map_weight_grad` (from the shapes only).

    At most :data:`SMALL_MAP_PAIRS` position pairs, and padding as wide as the correlation's kernel on some axis
    (:func:`_padding_wider`: the correlation would pad the input first and run on oneDNN's slow path). One CPU core,
    batch 32, ms per call, correlation / small map (load 8, thread time): 320 channels 7×7 on 2×2 maps 6.4 / 0.7,
    1152 channels 5×5 on 2×2 9.6 / 2.1; where the correlation needs no padding first it wins (1152 channels 3×3 on
    2×2 0.4 / 2.3, 672 channels 5×5 stride 2 on 4×4 1.4 / 3.1).
    """
    return math.prod(spatial) * math.prod(spatial_out) <= SMALL_MAP_PAIRS and _padding_wider(padding, stride,
                                                                                              spatial_out)


def _padding_wider(padding: tuple, stride: tuple, spatial_out: tuple) -> bool:
    """Whether :func:`correlation_weight_grad` pads the input first: padding as wide as its kernel on some axis."""
    return any(p >= s * (size - 1) + 1 for p, s, size in zip(padding, stride, spatial_out, strict=True))


def small_map_weight_grad(module: nn.modules.conv._ConvNd, x: torch.Tensor, delta: torch.Tensor,
                          padding: tuple) -> torch.Tensor:
    """``[n, C, prod(k)]`` of a depthwise convolution (one input and one output channel per group) on a small map.

    ``G[n, c, o] = Σ_{p, q} x[n, c, p] · δ[n, c, q] · M[p, q, o]``, ``M[p, q, o] = 1`` when output position ``q``
    reads input position ``p`` at kernel tap ``o`` (:func:`_tap_matrix`, from the geometry): every pair's product
    once (``n·C·T_in·T_out``), then one GEMM with ``M``. On maps smaller than the kernel's reach most taps read only
    padding; the correlation kernel computes them all at a high fixed cost per (example, channel).
    """
    n, c = x.shape[0], x.shape[1]
    t_in, t_out = math.prod(x.shape[2:]), math.prod(delta.shape[2:])
    taps = _tap_matrix(tuple(x.shape[2:]), tuple(delta.shape[2:]), tuple(module.kernel_size),
                       tuple(module.stride), tuple(module.dilation), tuple(padding)).to(x.device, x.dtype)
    pairs = x.reshape(n * c, t_in, 1) * delta.reshape(n * c, 1, t_out)  # [n·C, T_in, T_out]
    out = pairs.reshape(n * c, t_in * t_out) @ taps  # [n·C, prod(k)]
    return out.reshape(n, c, -1)


@functools.lru_cache(maxsize=64)
def _tap_matrix(spatial: tuple[int, ...], spatial_out: tuple[int, ...], kernel: tuple[int, ...],
                stride: tuple[int, ...], dilation: tuple[int, ...], padding: tuple[int, ...]) -> torch.Tensor:
    """``[T_in·T_out, prod(k)]`` 0/1: entry ``(p·T_out + q, o)`` is 1 when output ``q`` reads input ``p`` at tap ``o``.

    Input position ``p = q·stride + o·dilation − padding`` per axis (row-major positions and taps), kept when inside
    the map (outside it reads zero padding).
    """
    t_out = math.prod(spatial_out)
    m = torch.zeros(math.prod(spatial) * t_out, math.prod(kernel))
    for qi, q in enumerate(itertools.product(*(range(s) for s in spatial_out))):
        for oi, o in enumerate(itertools.product(*(range(k) for k in kernel))):
            p = [qa * s + oa * d - pad for qa, oa, s, d, pad in zip(q, o, stride, dilation, padding, strict=True)]
            if all(0 <= pa < size for pa, size in zip(p, spatial, strict=True)):
                pi = 0
                for pa, size in zip(p, spatial, strict=True):
                    pi = pi * size + pa
                m[pi * t_out + qi, oi] = 1.0
    return m


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
    if _padding_wider(padding, module.stride, delta.shape[2:]):
        x, padding = _zero_pad(x, padding), (0,) * nd
    cg, spatial = x.shape[1] // g, x.shape[2:]
    inp = x.reshape(1, n * g, *spatial) if cg == 1 else x.reshape(n * g, cg, *spatial).transpose(0, 1)
    kernel = delta.reshape(delta.shape[0] * delta.shape[1], 1, *delta.shape[2:])
    out = _CONV[nd](inp, kernel, None, stride=tuple(module.dilation), padding=tuple(padding),
                    dilation=tuple(module.stride), groups=n * g)  # [C_in/g, n·C_out, ≥k per axis]
    out = out[(slice(None), slice(None), *(slice(0, k) for k in module.kernel_size))]
    return out.reshape(cg, n, module.out_channels, -1).permute(1, 2, 0, 3).reshape(n, module.out_channels, -1)


def _zero_pad(x: torch.Tensor, padding: tuple) -> torch.Tensor:
    """``x`` zero-padded by ``padding[i]`` on both sides of the ``i``-th of its last ``len(padding)`` axes."""
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
