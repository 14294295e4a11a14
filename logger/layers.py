"""Layer rules: small pure functions from a module call's inputs and output gradient to per-example gradients.

A rule has the signature ``rule(module, args, kwargs, grad_outputs) -> Dense | Factored`` where ``args``/``kwargs`` are
the (detached) inputs of one forward call, ``grad_outputs`` the gradients of the loss with respect to the call's tensor
outputs (``None`` for outputs that received none), and the batch is on dimension 0. Rules live in a
:class:`LayerRules` instance (no global registry); :func:`default_rules` returns one with the built-in rules. The
parameters of modules without a rule are observed op by op (:mod:`gradcoh.logger.uses`) unless the fallback is
disabled; :func:`functional_rule` (``torch.func`` vmap of a module's vjp) is the generic rule a user may register
for a module, and what the attention rule falls back to for configurations it does not factor.

BatchNorm: in eval mode (or without batch statistics) the rule is exact per example. In train mode the batch
statistics couple the examples; the rule then returns each example's *contribution* to the batch gradient (the
contributions sum exactly to ``.grad``), and the logger records this in the store's notes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .costs import fastest, kernel_costs
from .grads import Composite, Dense, Factored, MatrixView, materialise_is_cheaper
from .recurrent import recurrent_rule

Rule = Callable[[nn.Module, tuple, dict, tuple], "Dense | Factored"]

_FORWARD_METHODS = ("forward", "_conv_forward")
"""Methods a subclass must not override to inherit its parent's rule."""


class LayerRules:
    """A registry of layer rules keyed by module type (looked up along the MRO).

    Example:
        >>> rules = default_rules()
        >>> rules.register(MyLayer, my_rule)  # doctest: +SKIP
    """

    def __init__(self, rules: dict[type[nn.Module], Rule] | None = None,
                 subtree: set[type[nn.Module]] | None = None) -> None:
        self._rules: dict[type[nn.Module], Rule] = dict(rules or {})
        self._subtree: set[type[nn.Module]] = set(subtree or ())

    def register(self, module_type: type[nn.Module], rule: Rule, *, subtree: bool = False) -> None:
        """Use ``rule`` for ``module_type`` and its subclasses (unless they have their own).

        Args:
            module_type: The module class.
            rule: The rule.
            subtree: The rule covers the parameters of the module's children too (in ``named_parameters()``
                order), e.g. because the module uses their weights without calling them.
        """
        self._rules[module_type] = rule
        if subtree:
            self._subtree.add(module_type)

    def _registered(self, module: nn.Module) -> type | None:
        """The registered class whose rule applies to ``module``, or None.

        A rule is chosen by what the module computes, not only by its base class: a subclass inherits its parent's
        rule only when it keeps the parent's forward (``forward`` and the ``_conv_forward`` it calls). timm's
        ``LayerNorm2d`` (an ``nn.LayerNorm`` that permutes NCHW in its forward), ``StdConv2d`` (standardises its
        weight) and ``BatchNormAct2d`` (adds an activation) therefore get no rule and are observed op by op.
        """
        for cls in type(module).__mro__:
            if cls in self._rules:
                same = all(getattr(type(module), m, None) is getattr(cls, m, None) for m in _FORWARD_METHODS)
                return cls if same or type(module) is cls else None
        return None

    def owns_subtree(self, module: nn.Module) -> bool:
        """Whether the rule found for ``module`` covers its whole subtree."""
        cls = self._registered(module)
        return cls is not None and cls in self._subtree

    def lookup(self, module: nn.Module) -> Rule | None:
        """The rule for ``module``, or None (no registered class, or a subclass with its own forward)."""
        cls = self._registered(module)
        return None if cls is None else self._rules[cls]


def linear_rule(module: nn.Linear, args: tuple, kwargs: dict, grad_outputs: tuple) -> Factored:
    """``nn.Linear`` with any leading dimensions: ``G_n = Σ_t δ_t [x_t, 1]ᵀ``."""
    x, go = args[0], grad_outputs[0]
    n = x.shape[0]
    bias = module.bias is not None and module.bias.requires_grad
    u = go.reshape(n, -1, go.shape[-1])  # [n, T, out]
    if not module.weight.requires_grad:  # frozen weight: only the bias trains
        return Dense(u.sum(1).unsqueeze(2))  # [n, out, 1]
    return Factored(u, x.reshape(n, -1, x.shape[-1]), bias=bias)  # v: [n, T, in]


def _conv_padding(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
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


def conv_rule(module: nn.modules.conv._ConvNd, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense | Factored:
    """``nn.Conv1d/2d/3d`` (stride, padding incl. modes and 'same', dilation, groups).

    When :func:`~gradcoh.logger.grads.materialise_is_cheaper` (early convolutions with many positions) or the
    convolution is grouped, the per-example weight gradients are computed in one call of the convolution's own
    weight-gradient kernel, with the batch folded into the groups (2× faster than im2col + bmm on CPU); otherwise
    im2col factors are returned for the ghost norm.
    """
    x, go = args[0], grad_outputs[0]
    n, g = x.shape[0], module.groups
    has_bias = module.bias is not None and module.bias.requires_grad
    if not module.weight.requires_grad:  # frozen weight: only the bias trains
        return Dense(go.reshape(n, module.out_channels, -1).sum(2, keepdim=True))
    x, padding = _conv_padding(module, x)
    t = go[0, 0].numel()
    rows, cols = module.out_channels, module.weight[0].numel() + has_bias
    if g > 1 or materialise_is_cheaper(n, t, rows, cols, go.element_size(), costs=kernel_costs(x.device, x.dtype)):
        w = _per_example_conv_weight_grad(module, x, go, padding)  # [n, C_out, C_in/g·k]
        return Dense(w, go.reshape(n, rows, -1).sum(2, keepdim=True)) if has_bias else Dense(w)
    a = unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # [n, T, C_in·k]
    b = go.reshape(n, go.shape[1], -1).transpose(1, 2)  # [n, T, C_out]
    return Factored(b, a, bias=has_bias)


def _per_example_conv_weight_grad(module: nn.modules.conv._ConvNd, x: torch.Tensor, go: torch.Tensor,
                                  padding: tuple) -> torch.Tensor:
    """``[n, C_out, C_in/g·prod(k)]`` by the fastest exact route on this device for these shapes.

    Depthwise 2-D convolutions (one input channel per output channel) have a second route, one shifted product
    per kernel tap (:func:`_depthwise_weight_grad`), which CPU kernels run up to 3× faster on large feature maps
    and slower on small ones; :func:`~gradcoh.logger.costs.fastest` measures both at first use per shape.
    """
    routes = [lambda: _grouped_weight_grad(module, x, go, padding)]
    if x.dim() == 4 and module.weight.shape[1] == 1 and module.out_channels == module.in_channels:
        routes.append(lambda: _depthwise_weight_grad(module, x, go, padding))
    key = ("conv-weight-grad", str(x.device), x.dtype, tuple(x.shape), tuple(go.shape), module.kernel_size,
           module.stride, module.dilation, padding, module.groups)
    return fastest(key, x.device, routes)


def _depthwise_weight_grad(module: nn.Conv2d, x: torch.Tensor, go: torch.Tensor, padding: tuple) -> torch.Tensor:
    """``[n, C, kh·kw]`` of a depthwise convolution: ``Σ_{h,w} δ[n,c,h,w] · x_pad[n,c,h·s+i·d, w·s+j·d]`` per tap."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    h, w = go.shape[2], go.shape[3]
    out = go.new_empty(x.shape[0], x.shape[1], kh, kw)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dh : i * dh + sh * (h - 1) + 1 : sh, j * dw : j * dw + sw * (w - 1) + 1 : sw]
            out[:, :, i, j] = (window * go).sum((2, 3))
    return out.reshape(x.shape[0], x.shape[1], -1)


def _grouped_weight_grad(module: nn.modules.conv._ConvNd, x: torch.Tensor, go: torch.Tensor,
                         padding: tuple) -> torch.Tensor:
    """``[n, C_out, C_in/g·prod(k)]``: the batch folded into the groups of one convolution-backward call."""
    n, g = x.shape[0], module.groups
    weight = module.weight.detach()
    stacked = weight.new_empty((n * weight.shape[0], *weight.shape[1:]))  # only its shape is used
    grad_w = torch.ops.aten.convolution_backward(
        go.reshape(1, -1, *go.shape[2:]), x.reshape(1, -1, *x.shape[2:]), stacked, None, list(module.stride),
        list(padding), list(module.dilation), False, [0] * len(padding), n * g, [False, True, False],
    )[1]
    return grad_w.reshape(n, module.out_channels, -1)


def transposed_linear_rule(module: nn.Module, args: tuple, kwargs: dict, grad_outputs: tuple) -> Composite | Dense:
    """Hugging Face ``Conv1D`` (GPT-2): a Linear whose weight is stored transposed, ``y = x W + b``, ``W: [in, out]``.

    ``G_W = Σ_t x_t δ_tᵀ`` (factored, rows = inputs) and ``g_b = Σ_t δ_t``; weight and bias have different leading
    dimensions, so the two are separate parts.
    """
    x, go = args[0], grad_outputs[0]
    n = x.shape[0]
    u = x.reshape(n, -1, x.shape[-1])
    d = go.reshape(n, -1, go.shape[-1])
    parts = []
    if module.weight.requires_grad:
        parts.append((Factored(u, d), MatrixView.of([tuple(module.weight.shape)])))
    if module.bias is not None and module.bias.requires_grad:
        parts.append((Dense(d.sum(1).unsqueeze(2)), MatrixView.of([tuple(module.bias.shape)])))
    return Composite(parts)


def embedding_rule(module: nn.Embedding, args: tuple, kwargs: dict, grad_outputs: tuple) -> Factored:
    """``nn.Embedding``: ``G_n = Σ_t e_{x_t} δ_tᵀ``, rows addressed by token id."""
    x, go = args[0], grad_outputs[0]
    n = x.shape[0]
    idx = x.reshape(n, -1)
    v = go.reshape(n, idx.shape[1], -1)
    if module.padding_idx is not None:
        v = v * (idx != module.padding_idx).unsqueeze(-1).to(v.dtype)
    if module.scale_grad_by_freq:  # the batch gradient divides by each token's count in the whole batch, which
        # couples the examples: as for train-mode BatchNorm, each example's contribution to the batch gradient
        counts = torch.bincount(idx.reshape(-1), minlength=module.num_embeddings).to(v.dtype)
        v = v / counts[idx].unsqueeze(-1)
    return Factored(None, v, rows_index=idx, n_rows=module.num_embeddings)


def _affine_grads(
    module: nn.Module, xhat: torch.Tensor, go: torch.Tensor, reduce_dims: tuple[int, ...]
) -> Dense:
    """Per-example gradients of ``y = x̂·w + b``; the matrix view is built by the tracker's ``MatrixView``."""
    grads = []
    for name, p in module.named_parameters(recurse=False):
        if not p.requires_grad:
            continue
        term = xhat * go if name == "weight" else go
        grads.append(term.sum(reduce_dims) if reduce_dims else term)
    n = go.shape[0]
    rows = MatrixView.of([tuple(g.shape[1:]) for g in grads]).rows
    return Dense(*(g.reshape(n, rows, -1) for g in grads))


def layer_norm_rule(module: nn.LayerNorm, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense:
    """``nn.LayerNorm`` over its normalised trailing dimensions (exact per example).

    ``x̂`` comes from the op's own kernel without the affine part (one fused pass, the forward's rounding).
    """
    x, go = args[0], grad_outputs[0]
    nd = len(module.normalized_shape)
    xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _affine_grads(module, xhat, go, tuple(range(1, x.dim() - nd)))


def rms_norm_rule(module: nn.RMSNorm, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense:
    """``nn.RMSNorm`` over its normalised trailing dimensions (exact per example): ``y = x / rms(x) · w``."""
    x, go = args[0], grad_outputs[0]
    nd = len(module.normalized_shape)
    xhat = F.rms_norm(x, module.normalized_shape, None, module.eps)  # eps None: the dtype's, as the module
    return _affine_grads(module, xhat, go, tuple(range(1, x.dim() - nd)))


def group_norm_rule(module: nn.GroupNorm, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense:
    """``nn.GroupNorm`` (exact per example): per-channel sums over spatial positions."""
    x, go = args[0], grad_outputs[0]
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine_grads(module, xhat, go, tuple(range(2, x.dim())))


def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense:
    """``nn.BatchNorm1d/2d/3d``: exact with running statistics; per-example contributions with batch statistics."""
    x, go = args[0], grad_outputs[0]
    if uses_batch_stats(module):  # no running statistics passed: nothing is updated
        xhat = F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
    else:
        xhat = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    return _affine_grads(module, xhat, go, tuple(range(2, x.dim())))


def uses_batch_stats(module: nn.Module) -> bool:
    """True when a BatchNorm module normalises with the statistics of the current batch."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


def functional_rule(module: nn.Module, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense:
    """Generic fallback: ``torch.func.vmap`` over examples of the module's vjp with respect to its parameters.

    The fallback covers the module's whole subtree (all its trainable parameters, in ``named_parameters`` order).

    The module's forward is recomputed per example, so it must be free of randomness (dropout inside the module
    must be 0 or the module in eval mode) and take the batch on dimension 0.
    """
    named = [(k, p.detach()) for k, p in module.named_parameters() if p.requires_grad]
    names = [k for k, _ in named]
    params = tuple(p for _, p in named)
    n = next(g for g in grad_outputs if g is not None).shape[0]
    flat_in, spec_in = pytree.tree_flatten((args, kwargs))
    batched = [torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n for a in flat_in]
    used = [i for i, g in enumerate(grad_outputs) if g is not None]
    cotangents = tuple(grad_outputs[i] for i in used)

    def per_example(batch_leaves: tuple, cot: tuple) -> tuple:
        leaves = list(flat_in)
        it = iter(batch_leaves)
        for i, is_batched in enumerate(batched):
            if is_batched:
                leaves[i] = next(it).unsqueeze(0)
        a, kw = pytree.tree_unflatten(leaves, spec_in)

        def call(*p: torch.Tensor) -> tuple:
            out = torch.func.functional_call(module, dict(zip(names, p, strict=True)), a, kw)
            tensors = [o for o in pytree.tree_leaves(out) if torch.is_tensor(o)]
            return tuple(tensors[i] for i in used)

        _, vjp_fn = torch.func.vjp(call, *params)
        return vjp_fn(tuple(c.unsqueeze(0) for c in cot))

    batch_leaves = tuple(a for a, b in zip(flat_in, batched, strict=True) if b)
    try:
        grads = torch.func.vmap(per_example, randomness="same")(batch_leaves, cotangents)
    except RuntimeError as err:
        raise RuntimeError(
            f"the torch.func fallback cannot compute per-example gradients of {type(module).__name__} "
            f"({str(err).splitlines()[0]}); exclude it with layers=... or register a rule with LayerRules.register"
        ) from err
    rows = MatrixView.of([tuple(p.shape) for p in params]).rows
    return Dense(*(g.reshape(n, rows, -1) for g in grads))


for _rule in (linear_rule, transposed_linear_rule, embedding_rule, layer_norm_rule, rms_norm_rule):
    _rule.positionwise = True  # acts on each position alone: a batch on any leading axis is moved to the front


def default_rules() -> LayerRules:
    """A fresh registry with the built-in rules (and Hugging Face ``Conv1D`` when transformers is loaded)."""
    conv: Any = conv_rule
    rules = LayerRules(
        {
            nn.Linear: linear_rule,
            nn.Conv1d: conv,
            nn.Conv2d: conv,
            nn.Conv3d: conv,
            nn.Embedding: embedding_rule,
            nn.LayerNorm: layer_norm_rule,
            nn.RMSNorm: rms_norm_rule,
            nn.GroupNorm: group_norm_rule,
            nn.modules.batchnorm._BatchNorm: batch_norm_rule,
            nn.RNN: recurrent_rule,
            nn.LSTM: recurrent_rule,
            nn.GRU: recurrent_rule,
        },
    )
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and hasattr(hf, "Conv1D"):  # not imported here: only when the model uses transformers
        rules.register(hf.Conv1D, transposed_linear_rule)
    return rules
