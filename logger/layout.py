"""Where the examples are in an activation: the *example layout* of a tensor, propagated op by op.

Per-example gradients need to know which entries of a layer's input and output gradient belong to which example.
A tensor computed from the batch has layout ``(axis, r)`` when index ``j`` along ``axis`` belongs to example
``j // r``: ``(0, 1)`` for the model's inputs, ``(0, nW)`` after Swin folds each image's ``nW`` windows into dim 0
(example-major), ``(1, 1)`` after ``permute(1, 0, ...)``. :func:`propagate` derives the layout of an op's output from
its inputs' layouts, op by op, with explicit rules for every op that moves, merges, splits or reduces axes, and a
broadcasting rule for ops known to act independently along their batch axes. Any other op gives :class:`Unknown`,
which names the op: a layer that then needs the layout raises a clear error instead of guessing (a guess from shapes
alone is silently wrong when, say, the sequence length equals the batch size).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .arguments import bind_op


@dataclass(frozen=True)
class Unknown:
    """A tensor computed from the batch whose example layout could not be derived.

    Attributes:
        op: The op that lost the layout (for error messages).
    """

    op: str


@dataclass(frozen=True)
class Reduced:
    """A tensor whose batch axis was summed or averaged away: a linear combination of the examples' terms.

    The loss is one (``losses.mean()``); so is anything computed from such tensors by linear ops only (``loss / k``,
    ``loss1 + loss2``). Combined with batch-carrying data, or passed through a non-linear op, it couples the examples
    (:class:`Unknown`).

    Attributes:
        op: The op that reduced the batch axis.
    """

    op: str


@dataclass(frozen=True)
class Row:
    """One example's data cut out of the batch (``h.unbind(0)[i]``, ``h[i]``, ``h[i:i+1]``): all of it is its.

    Ops on one example's rows give that example's data; ``stack``/``cat`` of every example's rows in order give a
    batch again (a Python loop over the examples).

    Attributes:
        example: The example.
    """

    example: int


Layout = tuple[int, int] | Unknown | Reduced | Row
"""``(axis, r)``: index ``j`` along ``axis`` belongs to example ``j // r``; or :class:`Unknown`, :class:`Reduced`,
:class:`Row`."""

# Ops applied independently along every axis they do not name (elementwise, activations, type casts, ...). Their
# output layout follows from broadcasting: a batch axis of an input keeps its position counted from the right.
_ELEMENTWISE = frozenset("""
abs abs_ absolute acos acosh add add_ addcdiv addcmul addcmul_ addcdiv_ asin asinh atan atan2 atanh bitwise_and
bitwise_not bitwise_or bitwise_xor bfloat16 ceil celu clamp clamp_ clamp_max clamp_min clip clone contiguous copy_
cos cosh detach div div_ double dropout dropout_ alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d elu
elu_ eq erf erfc exp exp_ expm1 fill_ float float_power floor floor_divide fmod ge gelu
glu gt half hardsigmoid hardswish hardtanh hardtanh_ int isfinite isinf isnan le leaky_relu leaky_relu_ lerp lerp_ log
log10 log1p log2 log_sigmoid logical_and logical_not logical_or logical_xor long lt masked_fill masked_fill_ maximum
minimum mish mul mul_ nan_to_num ne neg neg_ pow pow_ prelu
reciprocal relu relu6 relu_ remainder requires_grad_ round rrelu rsqrt rsub selu sigmoid sigmoid_
sign silu silu_ sin sinh softplus softsign sqrt square square_ sub sub_ tan tanh tanh_ tanhshrink threshold to
true_divide trunc type type_as where xlogy zero_ bool sgn signbit frac logit hardshrink softshrink
__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__
__div__ __rdiv__ __idiv__ __pow__ __rpow__ __ipow__ __neg__ __abs__ __and__ __rand__ __iand__ __or__ __ror__ __ior__
__xor__ __rxor__ __ixor__ __invert__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __floordiv__ __rfloordiv__
__ifloordiv__ __mod__ __rmod__ __imod__ __lshift__ __rshift__ __float__ __bool__
""".split())

# Ops that act on the batch-leading axes independently and on a few trailing axes jointly: the batch axis must be
# outside the trailing ``k`` axes of its input (k per op), then the broadcasting rule applies.
_TRAILING = {
    "linear": 1, "bilinear": 1, "layer_norm": -1, "rms_norm": -1, "scaled_dot_product_attention": 2,
    "embedding": 0, "one_hot": 0,
}

# Ops on ``[N, C, *spatial]`` that mix only within an example: the batch must be axis 0.
_BATCH_FIRST = frozenset("""
conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d max_pool1d max_pool2d max_pool3d avg_pool1d
avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d adaptive_max_pool3d group_norm instance_norm batch_norm interpolate upsample pixel_shuffle
pixel_unshuffle lp_pool1d lp_pool2d local_response_norm _max_pool1d _max_pool2d _max_pool3d max_pool1d_with_indices
max_pool2d_with_indices max_pool3d_with_indices fractional_max_pool2d grid_sample
""".split())

CONSTANT = frozenset("""
new_zeros new_ones new_empty new_full new_tensor zeros_like ones_like empty_like full_like rand_like randn_like
randint_like size dim numel
""".split())
"""Ops whose output does not depend on the values of their (data) inputs: constants, not data."""

_LOSSES = frozenset("""
cross_entropy nll_loss mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy
binary_cross_entropy_with_logits kl_div soft_margin_loss poisson_nll_loss gaussian_nll_loss multi_margin_loss
multilabel_margin_loss multilabel_soft_margin_loss hinge_embedding_loss
""".split())
# Ops that are linear in a Reduced input (a loss): the result is still a linear combination of the examples' terms.
_LINEAR = frozenset("""
add sub neg mul div true_divide __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__
__truediv__ __itruediv__ __div__ __idiv__ __neg__ rsub sum mean nansum clone contiguous to float double half bfloat16
type_as view reshape view_as reshape_as flatten squeeze unsqueeze expand expand_as broadcast_to add_ sub_ mul_ div_
stack cat concat concatenate
""".split())
# Of those, the ops in which the Reduced input may take only one operand's place (a product of two is not linear)
_ONE_OPERAND = frozenset({"mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "true_divide", "__truediv__",
                          "__itruediv__", "__div__", "__idiv__", "div_"})
_VIEWS = frozenset({"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "ravel"})
_REDUCTIONS = frozenset("""
sum mean amax amin max min std var norm logsumexp prod all any argmax argmin median nansum nanmean count_nonzero
std_mean var_mean aminmax
""".split())
_ALONG_DIM = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "sort",
                        "argsort", "topk", "flip", "narrow", "diff", "gather", "index_select", "scatter", "scatter_add",
                        "take_along_dim", "kthvalue", "_softmax", "softmin"})
_SPLITS = frozenset({"split", "chunk", "split_with_sizes", "tensor_split", "unbind", "unsafe_split", "hsplit"})


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(args: Sequence, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else default


def _dims(value: Any, ndim: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (_norm(value, ndim),)
    return tuple(_norm(int(d), ndim) for d in value)


def _broadcast(inputs: list[tuple[torch.Tensor, Layout]], out: torch.Tensor, trailing: int = 0,
               op: str = "") -> Layout:
    """Layout of a broadcasting op's output: each batch axis keeps its position counted from the right."""
    result: Layout | None = None
    for t, lay in inputs:
        if isinstance(lay, Unknown):
            return lay
        axis, r = lay
        if trailing < 0 or (trailing and axis >= t.dim() - trailing):
            return Unknown(op)  # the op mixes along the batch axis
        out_axis = axis + out.dim() - t.dim()
        if out_axis < 0 or out.shape[out_axis] != t.shape[axis]:
            return Unknown(op)
        if result is not None and result != (out_axis, r):
            return Unknown(op)
        result = (out_axis, r)
    return result if result is not None else Unknown(op)


def _view(t: torch.Tensor, lay: tuple[int, int], out: torch.Tensor, n: int, op: str) -> Layout:
    axis, r = lay
    if axis and out.dim() > axis and tuple(out.shape[:axis]) == tuple(t.shape[:axis]):
        # the axes before the batch axis kept: the batch axis is regrouped with the ones after it only
        block, rest = r * t.shape[axis + 1 :].numel(), out.shape[axis + 1 :].numel()
        if rest and not block % rest and out.shape[axis] % (block // rest) == 0:
            return (axis, block // rest)
    if any(s != 1 for s in t.shape[:axis]):
        return Unknown(op)  # examples are not the outermost blocks of the logical order
    d0 = out.shape[0] if out.dim() else 1
    if d0 == 0 or d0 % n:
        return Unknown(op)
    return (0, d0 // n)


def _permutation(name: str, args: Sequence, kwargs: dict, ndim: int) -> list[int] | None:
    """The permutation ``perm`` (output axis i = input axis perm[i]) of a transposing op."""
    if name == "permute":
        dims = args[1:] if len(args) > 1 else kwargs.get("dims")
        if len(dims) == 1 and not isinstance(dims[0], int):
            dims = dims[0]
        return [_norm(int(d), ndim) for d in dims]
    if name in ("transpose", "swapaxes", "swapdims"):
        i, j = _norm(int(_arg(args, kwargs, 1, "dim0")), ndim), _norm(int(_arg(args, kwargs, 2, "dim1")), ndim)
        perm = list(range(ndim))
        perm[i], perm[j] = perm[j], perm[i]
        return perm
    if name in ("t", "T", "numpy_T"):
        return list(reversed(range(ndim)))
    if name in ("mT",):
        perm = list(range(ndim))
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name in ("movedim", "moveaxis"):
        src, dst = _dims(_arg(args, kwargs, 1, "source"), ndim), _dims(_arg(args, kwargs, 2, "destination"), ndim)
        perm = [-1] * ndim
        for s, d in zip(src, dst, strict=True):
            perm[d] = s
        rest = iter(i for i in range(ndim) if i not in src)
        return [p if p >= 0 else next(rest) for p in perm]
    return None


def _matmul(inputs: list[tuple[int, torch.Tensor, Layout]], out: torch.Tensor, op: str) -> Layout:
    """``a @ b``: a batch axis may be a broadcast batch axis, the row axis of ``a`` or the column axis of ``b``."""
    result: Layout | None = None
    for pos, t, lay in inputs:
        if isinstance(lay, Unknown):
            return lay
        axis, r = lay
        nd = t.dim()
        if nd == 1:
            return Unknown(op)  # a vector operand is contracted
        contracted = nd - 1 if pos == 0 else nd - 2
        if axis == contracted:
            return Unknown(op)
        if nd == 2 and out.dim() >= 2:
            out_axis = out.dim() - 2 if pos == 0 else out.dim() - 1
        else:
            out_axis = axis + out.dim() - nd
        if out_axis < 0 or out.shape[out_axis] != t.shape[axis] or (result is not None and result != (out_axis, r)):
            return Unknown(op)
        result = (out_axis, r)
    return result if result is not None else Unknown(op)


@dataclass(frozen=True)
class _Op:
    """One op call seen by :func:`propagate` (its batch-carrying inputs are ``data``)."""

    name: str
    args: Sequence
    kwargs: dict
    out: torch.Tensor
    data: list[tuple[int, torch.Tensor, tuple[int, int]]]
    n: int
    func: Callable | None = None  # the op, to read its arguments by name (:attr:`bound`)
    position: int = 0  # which of the op's tensor outputs ``out`` is

    @functools.cached_property
    def bound(self) -> dict[str, Any] | None:
        """The arguments by name (:func:`~gradcoh.logger.arguments.bind_op`), bound when a rule first reads one.

        Most ops' rules (elementwise, unary) read none: binding every observed op cost about 20 Python calls each.
        """
        return bind_op(self.func, self.args, self.kwargs)

    @property
    def pairs(self) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        return [(t, lay) for _, t, lay in self.data]

    @property
    def t(self) -> torch.Tensor:
        return self.data[0][1]

    @property
    def lay(self) -> tuple[int, int]:
        return self.data[0][2]

    @property
    def axis(self) -> int:
        return self.data[0][2][0]

    @property
    def nd(self) -> int:
        return self.data[0][1].dim()

    @property
    def unary(self) -> bool:
        """A single batch-carrying input, the op's first argument."""
        return len(self.data) == 1 and self.data[0][0] == 0

    def arg(self, pos: int, name: str, default: Any = None) -> Any:
        """Argument ``name`` (at ``pos`` when the op's signature is not known)."""
        if self.bound is not None:
            return self.bound.get(name, default)
        return _arg(self.args, self.kwargs, pos, name, default)

    def unknown(self) -> Unknown:
        return Unknown(self.name)

    def keep(self, axis: int | None = None) -> tuple[int, int]:
        return (self.axis if axis is None else axis, self.lay[1])


def _elementwise(op: _Op) -> Layout:
    return _broadcast(op.pairs, op.out, 0, op.name)


def _trailing(op: _Op) -> Layout:
    k = _TRAILING[op.name]
    if k == -1:  # the normalised trailing shape is the op's second argument
        shape = op.arg(1, "normalized_shape")
        k = 1 if isinstance(shape, int) else len(shape)
    return _broadcast(op.pairs, op.out, k, op.name)


def _lookup(op: _Op) -> Layout:
    """``embedding``/``one_hot``: a trailing axis appended to the indices."""
    return op.lay if op.unary else op.unknown()


def _mha(op: _Op) -> Layout:
    """``(query [L, B, E], ...) -> (output [L, B, E], weights [B, L, S])``; batch-first modules transpose around it."""
    if op.data[0][0] != 0 or op.axis != 1 or op.nd != 3 or op.out.dim() != 3:
        return op.unknown()
    if op.out.shape[:2] == op.t.shape[:2]:
        return op.lay
    return op.keep(0) if op.out.shape[0] == op.t.shape[1] else op.unknown()


def _batch_first_op(op: _Op) -> Layout:
    ok = op.axis == 0 and len(op.data) == 1 and op.out.dim() and op.out.shape[0] == op.t.shape[0]
    return op.keep(0) if ok else op.unknown()


def _matmul_op(op: _Op) -> Layout:
    data = op.data
    if op.name == "__rmatmul__":
        data = [(1 - p, t, lay) for p, t, lay in data]
    if op.name not in ("baddbmm", "addmm"):
        return _matmul(data, op.out, op.name)
    # (input, a, b): shift the matrix operands' positions; the added input broadcasts
    operands = [(p - 1, t, lay) for p, t, lay in data if p in (1, 2)]
    added = [(t, lay) for p, t, lay in data if p not in (1, 2)]
    mm = _matmul(operands, op.out, op.name)
    return mm if not added or _broadcast(added, op.out, 0, op.name) == mm else op.unknown()


def _unary(handler: Callable[[_Op], Layout]) -> Callable[[_Op], Layout]:
    """Handlers of ops whose first argument is the only batch-carrying input."""

    def checked(op: _Op) -> Layout:
        return handler(op) if op.unary else op.unknown()

    return checked


@_unary
def _reshape(op: _Op) -> Layout:
    return _view(op.t, op.lay, op.out, op.n, op.name)


@_unary
def _permute(op: _Op) -> Layout:
    return op.keep(_permutation(op.name, op.args, op.kwargs, op.nd).index(op.axis))


@_unary
def _unsqueeze(op: _Op) -> Layout:
    d = _norm(int(op.arg(1, "dim")), op.nd + 1)
    return op.keep(op.axis + (d <= op.axis))


@_unary
def _squeeze(op: _Op) -> Layout:
    dims = _dims(op.arg(1, "dim"), op.nd)
    dims = tuple(d for d in (range(op.nd) if dims is None else dims) if op.t.shape[d] == 1)
    return op.unknown() if op.axis in dims else op.keep(op.axis - sum(d < op.axis for d in dims))


@_unary
def _expand(op: _Op) -> Layout:
    if op.name in ("repeat", "tile"):
        reps = op.args[1:] if len(op.args) > 1 else (op.kwargs.get("repeats") or op.kwargs.get("dims"))
        reps = reps[0] if len(reps) == 1 and not isinstance(reps[0], int) else reps
        lead = len(reps) - op.nd
        if lead < 0 or reps[op.axis + lead] != 1:
            return op.unknown()
    return _broadcast(op.pairs, op.out, 0, op.name)


@_unary
def _reduce(op: _Op) -> Layout:
    if len(op.args) > 1 and torch.is_tensor(op.args[1]):  # max(a, b), min(a, b): elementwise
        return _broadcast(op.pairs, op.out, 0, op.name) if op.name in ("max", "min") else op.unknown()
    dims = _dims(op.arg(1, "dim"), op.nd)
    if dims is None or op.axis in dims:  # the batch axis reduced: a loss if linear, else the examples coupled
        return Reduced(op.name) if op.name in ("sum", "mean", "nansum", "nanmean") else op.unknown()
    keep = bool(op.arg(2, "keepdim", False))
    return op.keep(op.axis if keep else op.axis - sum(d < op.axis for d in dims))


@_unary
def _along_dim(op: _Op) -> Layout:
    if op.name == "flip":
        dims = _dims(op.arg(1, "dims"), op.nd)
        return op.unknown() if dims is None or op.axis in dims else op.keep()
    default = -1 if op.name in ("sort", "argsort", "topk") else None
    dim = op.arg(2, "dim", -1) if op.name == "topk" else op.arg(1, "dim", default)
    if dim is None or _norm(int(dim), op.nd) == op.axis:
        return op.unknown()
    return op.keep() if op.out.dim() == op.nd and op.out.shape[op.axis] == op.t.shape[op.axis] else op.unknown()


@_unary
def _roll(op: _Op) -> Layout:
    dims = _dims(op.arg(2, "dims"), op.nd)
    return op.unknown() if dims is None or op.axis in dims else op.keep()


@_unary
def _pad(op: _Op) -> Layout:
    return op.unknown() if op.axis >= op.nd - len(op.arg(1, "pad")) // 2 else op.keep()


@_unary
def _select(op: _Op) -> Layout:
    d = _norm(int(op.arg(1, "dim")), op.nd)
    if d == op.axis:
        return _row(op, int(op.arg(2, "index")))
    return op.keep(op.axis - (d < op.axis))


def _row(op: _Op, index: int) -> Layout:
    """One row of the batch axis: an example's own data when each example has one row."""
    size = op.t.shape[op.axis]
    return Row(index + size if index < 0 else index) if op.lay[1] == 1 and -size <= index < size else op.unknown()


@_unary
def _split(op: _Op) -> Layout:
    d = _norm(int(op.arg(1 if op.name == "unbind" else 2, "dim", 0)), op.nd)
    if d == op.axis:  # a loop over examples: one piece per example
        if op.name == "unbind" or (op.out.shape[d] == 1 and op.t.shape[d] == op.n):
            return _row(op, op.position)
        return op.unknown()
    return op.keep(op.axis - (d < op.axis)) if op.name == "unbind" else op.keep()


def _restack(op: _Op, tensors: Sequence, d: int, ref: int) -> Layout:
    """``stack``/``cat`` of every example's own rows (:class:`Row`), in order: a batch again."""
    lays = {id(t): lay for _, t, lay in op.data}
    rows = [lays.get(id(t)) for t in tensors]
    if [r.example if isinstance(r, Row) else None for r in rows] != list(range(op.n)):
        return op.unknown()
    if op.name == "stack":
        return (_norm(d, ref + 1), 1)
    d = _norm(d, ref)
    sizes = {t.shape[d] for t in tensors}
    return (d, sizes.pop()) if len(sizes) == 1 and op.name in ("cat", "concat", "concatenate") else op.unknown()


def _loss(op: _Op) -> Layout:
    reduction = op.arg(99, "reduction", "mean")
    if any(a != 0 for _, _, (a, _) in op.data):
        return op.unknown()
    if reduction in ("mean", "sum", "batchmean"):
        return Reduced(op.name)
    if reduction != "none":
        return op.unknown()
    return op.keep(0) if op.out.dim() and op.out.shape[0] == op.t.shape[0] else op.unknown()


@_unary
def _normalize(op: _Op) -> Layout:
    """``F.normalize(x, p, dim)``: mixes along ``dim`` only (default 1)."""
    d = _norm(int(op.arg(2, "dim", 1)), op.nd)
    return op.unknown() if d == op.axis else op.keep()


def _pairwise(op: _Op) -> Layout:
    """``cosine_similarity(x1, x2, dim=1)``, ``pairwise_distance(x1, x2)``: broadcast, then ``dim`` reduced."""
    bnd = op.out.dim() + (0 if op.name == "pairwise_distance" and op.arg(4, "keepdim", False) else 1)
    d = _norm(int(op.arg(2, "dim", 1)), bnd) if op.name == "cosine_similarity" else bnd - 1
    result: set[tuple[int, int]] = set()
    for _, t, (axis, r) in op.data:
        pos = axis + bnd - t.dim()
        out_axis = pos - (d < pos) if bnd > op.out.dim() else pos
        if pos == d or out_axis < 0 or op.out.shape[out_axis] != t.shape[axis]:
            return op.unknown()
        result.add((out_axis, r))
    return result.pop() if len(result) == 1 else op.unknown()


def _concat(op: _Op) -> Layout:
    tensors = op.args[0] if op.args else op.kwargs["tensors"]
    d = int(op.arg(1, "dim", 0))
    ref = tensors[0].dim()
    if any(isinstance(lay, Row) for _, _, lay in op.data):
        return _restack(op, tensors, d, ref)
    if op.name == "stack":
        lays = {(a + (_norm(d, ref + 1) <= a), r) for _, _, (a, r) in op.data}
    else:
        if any(a == _norm(d, ref) for _, _, (a, _) in op.data):
            return op.unknown()  # concatenated along the batch axis
        lays = {lay for _, _, lay in op.data}
    return lays.pop() if len(lays) == 1 else op.unknown()


def _handlers() -> dict[str, Callable[[_Op], Layout]]:
    from .selection import _einsum, _gather, _index, _index_put, _take_along_dim  # imports this module's types

    table: dict[str, Callable[[_Op], Layout]] = {}
    groups: list[tuple[Iterable[str], Callable[[_Op], Layout]]] = [
        (_ELEMENTWISE, _elementwise), (_TRAILING, _trailing), (("embedding", "one_hot"), _lookup),
        (("multi_head_attention_forward",), _mha), (_BATCH_FIRST, _batch_first_op),
        (("matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "baddbmm", "addmm", "addbmm"), _matmul_op),
        (_VIEWS, _reshape), (_PERMUTATIONS, _permute), (("unsqueeze",), _unsqueeze), (("squeeze",), _squeeze),
        (("expand", "expand_as", "broadcast_to", "repeat", "tile"), _expand), (("__getitem__",), _index),
        (_REDUCTIONS, _reduce), (_ALONG_DIM, _along_dim), (("roll",), _roll), (("pad",), _pad),
        (("select",), _select), (_SPLITS, _split), (_LOSSES, _loss), (("gather",), _gather),
        (("cat", "concat", "concatenate", "stack", "hstack", "vstack"), _concat), (("normalize",), _normalize),
        (("cosine_similarity", "pairwise_distance"), _pairwise), (("take_along_dim",), _take_along_dim),
        (("einsum",), _einsum), (("index_put", "index_put_"), _index_put),
    ]
    for names, handler in groups:
        for name in names:
            table[name] = handler
    return table


_PERMUTATIONS = frozenset({"permute", "transpose", "swapaxes", "swapdims", "t", "T", "numpy_T", "mT", "movedim",
                           "moveaxis"})


def propagate(name: str, args: Sequence, kwargs: dict, out: torch.Tensor,
              data: list[tuple[int, torch.Tensor, Layout]], n: int, func: Callable | None = None,
              position: int = 0) -> Layout:
    """Layout of ``out``, the tensor output of op ``name`` whose batch-carrying inputs are ``data``.

    Args:
        name: The op's name (``func.__name__``: ``"view"``, ``"__add__"``, ``"linear"``, ...).
        args: The op's positional arguments.
        kwargs: Its keyword arguments.
        out: One tensor output (for ops with several, each in turn).
        data: ``(position, tensor, layout)`` of each batch-carrying input; ``position`` is the index in ``args``
            (−1 for keyword or nested arguments).
        n: Examples in the micro-batch.
        func: The op itself, to read its arguments by name through its signature (:func:`bind`).
        position: Which of the op's tensor outputs ``out`` is.

    Returns:
        The output's layout: ``(axis, r)``, :class:`Row`, :class:`Reduced`, or :class:`Unknown` naming the op (the
        op is outside the table, or it mixes the examples).
    """
    if name in _SHAPE_ONLY:  # the second argument gives only a shape or a type, never values
        data = [d for d in data if d[0] == 0]
        if not data:
            return Unknown(name)
    extra = _EXTRA.get(name)
    if extra is not None:
        lay = extra(_Op(name, args, kwargs, out, data, n, func, position))
        if lay is not None:
            return lay
    unknown, rows = _scan(data)
    if unknown is not None and type(unknown) is not Unknown and name in _REDUCTIONS | _LOSSES:
        # rows still in another order (or packed) reach the loss: the examples are mixed up
        return Unknown(f"{name}' of rows left in the order of '{unknown.op}")
    if unknown is not None:
        return unknown
    if rows and name not in _CONCAT:
        return _rows_or_reduced(name, data)
    handler = _HANDLERS.get(name)
    if handler is None:
        return Unknown(name)
    return handler(_Op(name, args, kwargs, out, data, n, func, position))


def _scan(data: list) -> tuple[Unknown | None, bool]:
    """The first :class:`Unknown` input layout, and whether a :class:`Reduced` or :class:`Row` one came before it.

    A loop, not generator expressions: it runs for every observed op.
    """
    rows = False
    for _, _, lay in data:
        if type(lay) is tuple:
            continue
        if isinstance(lay, Unknown):
            return lay, rows
        rows = rows or isinstance(lay, Reduced | Row)
    return None, rows


def _rows_or_reduced(name: str, data: list) -> Layout:
    """Ops on examples' own rows (:class:`Row`) or on losses (:class:`Reduced`)."""
    lays = [lay for _, _, lay in data]
    examples = {lay.example if isinstance(lay, Row) else None for lay in lays}
    if all(isinstance(lay, Row) for lay in lays) and len(examples) == 1:
        return lays[0]  # one example's data
    if all(isinstance(lay, Reduced | Row) for lay in lays) and name in _ADDITIVE:
        return Reduced(name)  # terms of different examples added up: a loss (``sum(losses)``)
    return _after_reduced(name, data)


def _after_reduced(name: str, data: list) -> Layout:
    """A loss (:class:`Reduced`) stays one through linear ops on it alone; anything else couples the examples."""
    if not all(isinstance(lay, Reduced) for _, _, lay in data) or name not in _LINEAR:
        return Unknown(name)
    if name in _ONE_OPERAND and (len(data) > 1 or ("div" in name and data[0][0] != 0)):
        return Unknown(name)
    return data[0][2]


_ADDITIVE = frozenset({"add", "sub", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "add_",
                       "sub_"})
_SHAPE_ONLY = frozenset({"view_as", "reshape_as", "expand_as", "type_as"})
_CONCAT = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack"})
_HANDLERS = _handlers()
_EXTRA: dict[str, Callable[[_Op], Layout | None]] = {}


def register(names: Iterable[str], handler: Callable[[_Op], Layout | None]) -> None:
    """Add layout rules kept with the layers they belong to (:mod:`~gradcoh.logger.recurrent`: RNN ops, packing).

    ``handler`` sees every call of the named ops before the rules here, inputs of any layout (subclasses of
    :class:`Unknown` that carry more than a name included), and returns None to leave the call to the rules here.
    """
    for name in names:
        _EXTRA[name] = handler
