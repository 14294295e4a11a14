"""Layer rules: functions from a module call's inputs and output gradient to per-example gradients.

A rule has the signature ``rule(module, args, kwargs, grad_outputs) -> Dense | Factored | Composite`` where
``args``/``kwargs`` are the (detached) inputs of one forward call, ``grad_outputs`` the gradients of the loss with
respect to the call's tensor outputs (``None`` for outputs that received none), and the batch is on dimension 0. The
result is expressed in the matrix view of the parameters the rule covers
(:meth:`~gradcoh.logger.grads.MatrixView.of` their shapes, in ``parameters()`` order): a
:class:`~gradcoh.logger.grads.Composite` when they share no view (HF ``Conv1D``, recurrent layers). The math of each
op lives in :mod:`gradcoh.logger.ops`, shared with the op-by-op tracker; a rule only reads its module's
configuration. Rules keep no state.

Rules live in a :class:`LayerRules` instance (no global registry); :func:`default_rules` returns one with the built-in
rules. The parameters of modules without a rule are observed op by op (:mod:`gradcoh.logger.uses`) unless the
fallback is disabled; :func:`functional_rule` (``torch.func`` vmap of a module's vjp) is the generic rule a user may
register for a module. How to add a rule: ``docs/extending.md``.

BatchNorm: in eval mode (or without batch statistics) the rule is exact per example. In train mode the batch
statistics couple the examples; the rule then returns each example's *contribution* to the batch gradient (the
contributions sum exactly to ``.grad``), and the logger records this in the store's notes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .embedding_bag import embedding_bag_rule
from .grads import Composite, Dense, Factored, MatrixView
from .ops import conv, embedding, linear, norm
from .recurrent import recurrent_rule

Rule = Callable[[nn.Module, tuple, dict, tuple], "Dense | Factored | Composite"]

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


def linear_rule(module: nn.Linear, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense | Factored:
    """``nn.Linear`` with any leading dimensions: ``G_n = Σ_t δ_t [x_t, 1]ᵀ`` (:func:`.ops.linear.linear`)."""
    return linear.linear(args[0], grad_outputs[0], weight=module.weight.requires_grad, bias=_trains(module.bias))


def conv_rule(module: nn.modules.conv._ConvNd, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense | Factored:
    """``nn.Conv1d/2d/3d`` (:func:`.ops.conv.conv`: factored, or materialised in one kernel call)."""
    return conv.conv(module, args[0], grad_outputs[0])


def transposed_linear_rule(module: nn.Module, args: tuple, kwargs: dict, grad_outputs: tuple) -> Composite:
    """Hugging Face ``Conv1D`` (GPT-2): a Linear whose weight is stored transposed, ``y = x W + b``, ``W: [in, out]``.

    Weight and bias have different leading dimensions, so the two are separate parts
    (:func:`.ops.linear.transposed_linear`).
    """
    return linear.transposed_linear(args[0], grad_outputs[0], weight_shape=_shape_if_trains(module.weight),
                                    bias_shape=_shape_if_trains(module.bias))


def embedding_rule(module: nn.Embedding, args: tuple, kwargs: dict, grad_outputs: tuple) -> Factored:
    """``nn.Embedding``: ``G_n = Σ_t e_{x_t} δ_tᵀ``, rows addressed by token id (:func:`.ops.embedding.embedding`)."""
    x = args[0]
    return embedding.embedding(x.reshape(x.shape[0], -1), grad_outputs[0], module.num_embeddings,
                               padding_idx=module.padding_idx, scale_grad_by_freq=module.scale_grad_by_freq)


def _affine(module: nn.Module, xhat: torch.Tensor, go: torch.Tensor, reduce_dims: tuple[int, ...]) -> Dense:
    bias = getattr(module, "bias", None)  # nn.RMSNorm has none
    return norm.affine(xhat, go, reduce_dims, weight=_trains(module.weight), bias=_trains(bias))


def layer_norm_rule(module: nn.LayerNorm, args: tuple, kwargs: dict, grad_outputs: tuple,
                    stats: tuple | None = None) -> Dense:
    """``nn.LayerNorm`` over its normalised trailing dimensions (exact per example).

    ``stats``: ``(position of the input among the call's tensors, mean, rstd)`` that the forward's kernel saved
    (:func:`.ops.norm.forward_stats`, read by the capture): ``x̂`` from them instead of normalising again.
    """
    x = args[0]
    k = len(module.normalized_shape)
    reduce_dims = tuple(range(1, x.dim() - k))
    go = grad_outputs[0]
    if stats is not None and stats[0] == 0 and norm.stats_fit(x, go, stats[1], k):
        return norm.layer_norm_affine(x, stats[1], stats[2], go, reduce_dims, weight=_trains(module.weight),
                                      bias=_trains(module.bias))
    xhat = norm.layer_norm(x, module.normalized_shape, module.eps)
    return _affine(module, xhat, go, reduce_dims)


layer_norm_rule.forward_stats = norm.forward_stats  # the capture reads them in the forward


def rms_norm_rule(module: nn.RMSNorm, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense:
    """``nn.RMSNorm`` over its normalised trailing dimensions (exact per example): ``y = x / rms(x) · w``."""
    x = args[0]
    xhat = norm.rms_norm(x, module.normalized_shape, module.eps)
    return _affine(module, xhat, grad_outputs[0], tuple(range(1, x.dim() - len(module.normalized_shape))))


def group_norm_rule(module: nn.GroupNorm, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense:
    """``nn.GroupNorm`` (exact per example): per-channel sums over spatial positions."""
    x = args[0]
    xhat = norm.group_norm(x, module.num_groups, module.eps)
    return _affine(module, xhat, grad_outputs[0], tuple(range(2, x.dim())))


def batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, args: tuple, kwargs: dict, grad_outputs: tuple) -> Dense:
    """``nn.BatchNorm1d/2d/3d``: exact with running statistics; per-example contributions with batch statistics.

    In eval mode with enough positions per channel, one batch-norm backward over (example, channel) pairs
    (:func:`.ops.norm.running_affine`) instead of normalising, multiplying and summing.
    """
    x, go = args[0], grad_outputs[0]
    if not uses_batch_stats(module) and norm.runs_fused(x, go, module.running_mean, module.running_var):
        return norm.running_affine(x, go, module.running_mean, module.running_var, module.eps,
                                   weight=_trains(module.weight), bias=_trains(module.bias))
    xhat = norm.batch_norm(x, module.running_mean, module.running_var, uses_batch_stats(module), module.eps)
    return _affine(module, xhat, go, tuple(range(2, x.dim())))


def _trains(p: torch.Tensor | None) -> bool:
    return p is not None and p.requires_grad


def _shape_if_trains(p: torch.Tensor | None) -> tuple[int, ...] | None:
    return tuple(p.shape) if _trains(p) else None


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
            nn.EmbeddingBag: embedding_bag_rule,
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
