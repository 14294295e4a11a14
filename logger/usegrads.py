"""Per-example gradients of a :class:`~gradcoh.logger.uses.Use`: a parameter used outside its module's rule.

The ops with a gradient builder (:mod:`gradcoh.logger.ops`: ``F.linear``/``addmm``/``matmul`` with a parameter
weight, the functional normalisations, embedding lookups of constant indices) get the builder's form, read through
the op's signature; any other op gets ``torch.func.vmap`` over examples of its vector-Jacobian product on each
example's slice, pulled back through the derivation of each parameter-derived argument.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .arguments import bind, op_name
from .derived import Node, Origin
from .grads import Dense, MatrixView, ParamGrad, fold, natural_view, split_params
from .layout import _ELEMENTWISE as ELEMENTWISE
from .ops import embedding, linear, norm
from .uses import Use

if TYPE_CHECKING:
    from .uses import UseTracker

_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})


def value(source: Origin, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """The (detached) value of a parameter or derivation node, recomputed from the parameters."""
    if not isinstance(source, Node):
        return source.detach()
    if id(source) not in memo:
        with torch.no_grad():
            memo[id(source)] = source.call({i: value(p, memo) for i, p in source.parents.items()})
    return memo[id(source)]


def _split_examples(t: torch.Tensor, lay: tuple[int, int], n: int) -> torch.Tensor:
    """``t`` with its batch axis split: ``[n, ..., r (at the axis), ...]`` (a view when possible)."""
    axis, r = lay
    moved = t.movedim(axis, 0)
    return moved.reshape(n, r, *moved.shape[1:]).movedim(1, axis + 1)


def use_gradients(use: Use, tracker: UseTracker, n: int) -> list[tuple[torch.nn.Parameter, ParamGrad]]:
    """Exact per-example gradients of the parameters behind ``use``: ``[(parameter, form)]``.

    Fast forms for ``F.linear``/``addmm``/``matmul`` with a parameter weight (factored, nothing materialised); any
    other op: ``torch.func.vmap`` over examples of the op's vector-Jacobian product on each example's slice, then
    pulled back through the derivation of each derived input (:func:`pull_back`).
    """
    fast = _linear_use(use, n)
    if fast is None:
        fast = _norm_use(use, n)
    if fast is None:
        fast = _broadcast_use(use, n)
    if fast is not None:
        return fast
    memo: dict[int, torch.Tensor] = {}
    r = next(iter(use.data.values()))[1]
    whole, sliced = _classify(use, n)
    cots = _per_example_vjp(use, n, whole, sliced, memo)
    out = []
    for (_, src, _), cot in zip(whole, cots[: len(whole)], strict=True):
        out += pull_back(src, cot, n, memo)
    for (pos, src, axis), cot in zip(sliced, cots[len(whole) :], strict=True):
        out += pull_back_rows(src, use.shapes[pos], cot, (axis, r), n, memo)
    return out


_ALIGNING = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack"})


def _aligned(use: Use, axis: int, ndim: int) -> bool:
    """Whether the op pairs ``axis`` of a parameter-derived argument with the batch axis, entry by entry.

    Broadcasting ops and concatenations do; a weight's axes (``linear``, ``conv_transpose2d``, the matrix axes of
    ``matmul``) never do, even when one of them happens to have the batch's size.
    """
    name = op_name(use.func)
    if not 0 <= axis < ndim:
        return False
    if name in ELEMENTWISE or name in _ALIGNING:
        return True
    return name in ("matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "scaled_dot_product_attention") and \
        axis < ndim - 2


def _classify(use: Use, n: int) -> tuple[list, list]:
    """Split a use's parameter-derived arguments by how they meet the batch.

    Returns:
        ``whole``: ``(position, source, setter)`` of arguments shared by all examples; ``sliced``: ``(position,
        source, axis)`` of arguments with one row block per example.
    """
    ref_pos, (ref_axis, r) = next(iter(use.data.items()))
    ref_dim = use.flat[ref_pos].dim()
    whole, sliced = [], []
    for pos, src in use.diff.items():
        shape = use.shapes[pos]
        axis = ref_axis - (ref_dim - len(shape))  # the axis that broadcasts against the batch axis
        batch_sized = n > 1 and _aligned(use, axis, len(shape)) and shape[axis] == n * r
        if batch_sized and isinstance(src, Node) and op_name(src.func) in _EXPANDS and len(src.parents) == 1:
            # expanded to the batch (cls_token.expand(B, -1, -1)): differentiate the unexpanded tensor, expanded
            # to one example's rows inside the per-example function
            small = list(shape)
            small[axis] = r
            whole.append((pos, next(iter(src.parents.values())), lambda p, s=tuple(small): p.expand(s)))
        elif batch_sized:  # one row block per example (an embedding of constant indices expanded to [B, T])
            sliced.append((pos, src, axis))
        else:
            whole.append((pos, src, None))
    return whole, sliced


def _per_example_vjp(use: Use, n: int, whole: list, sliced: list, memo: dict) -> tuple:
    """``vmap`` over examples of the op's vector-Jacobian product: cotangents of ``whole`` then ``sliced``."""
    r = next(iter(use.data.values()))[1]
    flat = use.flat
    data_pos = list(use.data)
    slices = [_split_examples(flat[i], use.data[i], n) for i in data_pos]
    slices += [_split_examples(value(src, memo), (axis, r), n) for _, src, axis in sliced]
    positions = data_pos + [pos for pos, _, _ in sliced]
    n_data = len(data_pos)
    go = _split_examples(use.grads, use.out_layout, n)
    whole_values = [value(src, memo) for _, src, _ in whole]

    def one(example: list[torch.Tensor], g: torch.Tensor) -> tuple:
        def f(*values: torch.Tensor) -> torch.Tensor:
            leaves = list(flat)
            for i, x in zip(positions[:n_data], example[:n_data], strict=True):
                leaves[i] = x
            for (i, _, setter), v in zip(whole, values[: len(whole)], strict=True):
                leaves[i] = setter(v) if setter is not None else v
            for i, v in zip(positions[n_data:], values[len(whole) :], strict=True):
                leaves[i] = v
            a, k = pytree.tree_unflatten(leaves, use.spec)
            return use.func(*a, **k)

        _, vjp = torch.func.vjp(f, *whole_values, *example[n_data:])
        return vjp(g)

    try:
        return torch.func.vmap(one, randomness="same")(slices, go)
    except RuntimeError as err:
        raise RuntimeError(
            f"gradcoh cannot compute per-example gradients through {op_name(use.func)} ({str(err).splitlines()[0]}); "
            "register a rule for the module that calls it (LayerRules.register) or exclude its layer with layers=..."
        ) from err


def pull_back_rows(src: Origin, shape: tuple[int, ...], cot: torch.Tensor, lay: tuple[int, int], n: int,
                   memo: dict) -> list:
    """Like :func:`pull_back` for a derived tensor with a batch-sized axis, given each example's rows ``cot``."""
    lookup = _constant_lookup(src)
    if lookup is not None and lay[0] == 0:
        rows = _split_examples(lookup["input"], lay, n).reshape(n, -1)
        return _embedding_pull_back(src, lookup, cot, n, rows=rows)
    full = cot.new_zeros((n, *shape))
    axis, r = lay
    for i in range(n):  # each example's cotangent is zero outside its own rows
        full[i].narrow(axis, i * r, r).copy_(cot[i])
    return pull_back(src, full, n, memo)


def _constant_lookup(src: Origin) -> dict | None:
    """The bound arguments of an embedding lookup of a parameter on constant indices; None for any other derivation."""
    if not isinstance(src, Node) or src.func is not F.embedding or len(src.parents) != 1:
        return None
    a, k = pytree.tree_unflatten(src.flat, src.spec)
    bound = bind("embedding", src.func, a, k)
    pos, parent = next(iter(src.parents.items()))
    if bound is None or src.flat[pos] is not bound["weight"] or isinstance(parent, Node):
        return None
    return bound


def _positions(use: Use) -> dict[int, int]:
    """``{id(tensor): leaf position}`` of a use's tensor arguments."""
    return {id(x): i for i, x in enumerate(use.flat) if isinstance(x, torch.Tensor)}


def _bound(use: Use, name: str) -> dict | None:
    a, k = pytree.tree_unflatten(use.flat, use.spec)
    return bind(name, use.func, a, k)


_AFFINE = {  # op: (input, weight, bias) parameter names, and whether the weight is stored [in, out]
    "linear": ("input", "weight", "bias", False),
    "addmm": ("mat1", "mat2", "input", True),
    "matmul": ("input", "other", None, True),
    "__matmul__": ("input", "other", None, True),
}


def _linear_use(use: Use, n: int) -> list | None:
    """``F.linear(x, W, b)``, ``addmm(b, x, W)``, ``x @ W`` with parameter weights: factored per-example forms.

    Reads ``x`` (its example layout must keep the features last) and moves nothing: :mod:`.ops.linear` builds the
    forms from the example-split input and output gradient. None when another route must take the use.
    """
    name = op_name(use.func)
    bound = _bound(use, name) if name in _AFFINE and len(use.data) == 1 else None
    if bound is None or bound.get("beta", 1) != 1 or bound.get("alpha", 1) != 1:
        return None
    x_name, w_name, b_name, transposed = _AFFINE[name]
    where = _positions(use)
    x_pos, w_pos = where.get(id(bound[x_name])), where.get(id(bound[w_name]))
    b_arg = bound[b_name] if b_name else None
    b = None if b_arg is None else use.diff.get(where[id(b_arg)])
    if x_pos not in use.data or w_pos not in use.diff or (b_arg is not None and (b is None or b_arg.dim() != 1)):
        return None
    w, x, x_lay = use.diff[w_pos], use.flat[x_pos], use.data[x_pos]
    if isinstance(w, Node) or (isinstance(b, Node) and transposed) or w.dim() != 2 or x.dim() < 2 or \
            x_lay[0] == x.dim() - 1:
        return None
    derived_bias, b = (b, None) if isinstance(b, Node) else (None, b)  # Swin-V2's bias with its key part zeroed
    trained = [p for p in (w, b) if p is not None and p.requires_grad]
    xs = _split_examples(x, x_lay, n)
    gs = _split_examples(use.grads, use.out_layout, n)
    out = []
    if transposed:
        grad = linear.transposed_linear(xs, gs, weight_shape=_shape_if_trains(w), bias_shape=_shape_if_trains(b))
    elif trained:
        grad = linear.linear(xs, gs, weight=w.requires_grad, bias=b is not None and b.requires_grad)
    if trained:
        out = list(zip(trained, split_params(grad, MatrixView.of([tuple(p.shape) for p in trained])), strict=True))
    if derived_bias is not None:  # each example's Σ_t δ_t, pulled back through the bias's derivation
        out += pull_back(derived_bias, gs.reshape(n, -1, gs.shape[-1]).sum(1), n, {})
    return out


_BROADCAST = {"mul": 1, "__mul__": 1, "__rmul__": 1, "add": 0, "__add__": 0, "__radd__": 0, "sub": -1,
              "__sub__": -1, "rsub": -2, "__rsub__": -2}
"""Binary ops with a direct per-example route: 1 multiplies by the other argument; 0 adds; -1 subtracts the second
argument (``a - b``); -2 subtracts the first (``rsub(a, b) = b - a``)."""


def _broadcast_use(use: Use, n: int) -> list | None:
    """``p * x``, ``p + x``, ``x - p``, ``p - x``: one batch tensor ``x``, one tensor ``p`` shared by the examples.

    ``p`` is a parameter or a derivation of parameters, broadcast against ``x``.

    The vector-Jacobian product needs no ``vmap``: each example's cotangent of ``p`` is ``δ·x`` (or ``±δ``) summed
    over the axes ``p`` broadcasts along (RMSNorm's ``weight * x``, ``x + pos_embed``), then pulled back through the
    derivation of ``p`` (:func:`pull_back`). None when another route must take the use: keywords (``alpha``), a
    batch layout other than one row per example on axis 0, or ``p`` with an axis aligned with the batch.
    """
    kind = _BROADCAST.get(op_name(use.func))
    if kind is None or len(use.data) != 1 or len(use.diff) != 1 or use.out_layout != (0, 1):
        return None
    args, kwargs = pytree.tree_unflatten(use.flat, use.spec)
    (d_pos, lay), = use.data.items()
    (p_pos, src), = use.diff.items()
    if kwargs or len(args) != 2 or lay != (0, 1) or {d_pos, p_pos} != {0, 1} or not all(
            isinstance(a, torch.Tensor) for a in args):
        return None
    g, x, shape = use.grads, use.flat[d_pos], use.shapes[p_pos]
    padded = (1,) * (g.dim() - len(shape)) + tuple(shape)
    if len(shape) > g.dim() or g.shape[0] != n or x.dim() == 0 or x.shape[0] != n or padded[0] != 1:
        return None
    if kind == 1:
        cot = g * x
    elif kind == 0 or (kind == -1 and p_pos == 0) or (kind == -2 and p_pos == 1):
        cot = g
    else:
        cot = -g
    if tuple(cot.shape) != tuple(g.shape):
        return None
    dims = tuple(i for i in range(1, g.dim()) if padded[i] == 1 and g.shape[i] != 1)
    cot = (cot.sum(dims) if dims else cot).reshape(n, *shape)
    return pull_back(src, cot, n, {})


def _shape_if_trains(p: torch.Tensor | None) -> tuple[int, ...] | None:
    return tuple(p.shape) if p is not None and p.requires_grad else None


def _norm_use(use: Use, n: int) -> list | None:
    """Normalisation ops with parameter weight and bias outside a module rule: ``g_w = Σ x̂·δ``, ``g_b = Σ δ``.

    ``F.batch_norm``/``instance_norm``/``layer_norm``/``rms_norm``/``group_norm`` as timm's ``LayerNorm2d`` and
    ``BatchNormAct2d`` call them, with the statistics the op itself used (:mod:`.ops.norm`). Reads ``input`` (the only
    batch-carrying argument; its batch axis must be 0 except for the trailing-axis norms, where it is moved to 0),
    ``weight`` and ``bias`` by name.
    """
    name = op_name(use.func)
    bound = _bound(use, name) if name in norm.OPS and len(use.data) == 1 else None
    if bound is None:
        return None
    where = _positions(use)
    present = {key: bound[key] for key in ("weight", "bias") if bound.get(key) is not None}
    if any(where[id(t)] in use.data for t in present.values()):
        return None
    # a weight or bias outside use.diff (frozen, or covered by a rule) is a constant of the op, as on the general route
    params = {key: use.diff[where[id(t)]] for key, t in present.items() if where[id(t)] in use.diff}
    (x_pos, (axis, r)), = use.data.items()
    if x_pos != where.get(id(bound["input"])) or any(isinstance(p, Node) for p in params.values()):
        return None  # a derived weight: the general route
    if name not in norm.TRAILING and axis != 0:
        return None
    trained = {key: p for key, p in params.items() if p.requires_grad}
    if not trained:
        return []
    flags = {"weight": "weight" in trained, "bias": "bias" in trained}
    x, go = bound["input"].float(), use.grads.float()
    stats, p_dims = use.stats, next(iter(trained.values())).dim()  # (the normalised shape's dimensions)
    if _running_stats(name, bound, x, go):
        grad = fold(norm.running_affine(x, go, bound["running_mean"], bound["running_var"], bound["eps"], **flags), r)
    elif name == "layer_norm" and stats is not None and stats[0] == x_pos and norm.stats_fit(x, go, stats[1], p_dims):
        mean, rstd = (s.movedim(axis, 0) for s in stats[1:])
        reduce_dims = tuple(range(1, x.dim() - p_dims))
        grad = fold(norm.layer_norm_affine(x.movedim(axis, 0), mean, rstd, go.movedim(axis, 0), reduce_dims, **flags),
                    r)
    else:
        xhat = norm.normalised(name, x, bound).movedim(axis, 0)
        go = go.movedim(axis, 0)
        reduce_dims = tuple(range(1, xhat.dim() - p_dims)) if name in norm.TRAILING else tuple(range(2, xhat.dim()))
        grad = fold(norm.affine(xhat, go, reduce_dims, **flags), r)
    forms = split_params(grad, MatrixView.of([tuple(p.shape) for p in trained.values()]))
    return [(p, Dense(*(b.to(use.grads.dtype) for b in f.blocks))) for p, f in zip(trained.values(), forms,
                                                                                    strict=True)]


def _running_stats(name: str, bound: dict, x: torch.Tensor, go: torch.Tensor) -> bool:
    """Whether :func:`.ops.norm.running_affine` takes this call (eval-mode batch norm, :func:`.ops.norm.runs_fused`)."""
    if name != "batch_norm" or bound["training"]:
        return False
    return norm.runs_fused(x, go, bound["running_mean"], bound["running_var"])


def pull_back(src: Origin, cot: torch.Tensor, n: int, memo: dict) -> list:
    """Per-example gradients ``[(parameter, form)]`` behind ``src``, given its per-example cotangent ``[n, ...]``.

    An embedding lookup on constant indices (``wpe(arange(T))``, T5's relative position buckets) stays factored
    (rows addressed by index, never a ``V × d`` block per example); any other derivation is pulled back with
    ``torch.func.vmap`` of its vector-Jacobian product.
    """
    if not isinstance(src, Node):
        return [(src, Dense(cot.reshape(n, *natural_view(tuple(src.shape)))))] if src.requires_grad else []
    lookup = _constant_lookup(src)
    if lookup is not None:
        return _embedding_pull_back(src, lookup, cot, n)
    parent = _reshaped(src)
    if parent is not None:  # a reshape keeps the elements' order: its vector-Jacobian product is the reverse reshape
        return pull_back(src.parents[0], cot.reshape(n, *parent), n, memo)
    positions = list(src.parents)
    primals = [value(src.parents[i], memo) for i in positions]

    def one(c: torch.Tensor) -> tuple:
        _, vjp = torch.func.vjp(lambda *v: src.call(dict(zip(positions, v, strict=True))), *primals)
        return vjp(c)

    cots = torch.func.vmap(one)(cot)
    out = []
    for i, c in zip(positions, cots, strict=True):
        out += pull_back(src.parents[i], c, n, memo)
    return out


_RESHAPES = frozenset({"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"})
"""Ops whose output holds the input's elements in the same (row-major) order, only the shape changed."""


def _reshaped(src: Node) -> tuple[int, ...] | None:
    """The shape of the parameter-derived input of ``src`` when ``src`` only reshapes it (None otherwise).

    ``gamma.reshape(1, -1, 1, 1)`` (ConvNeXt's layer scale): the input is the op's first argument, the only one from
    parameters, with as many elements as the output (a reshape, never an expand or a copy into another layout).
    """
    if op_name(src.func) not in _RESHAPES or list(src.parents) != [0] or src.output != 0:
        return None
    x = src.flat[0]
    if not isinstance(x, torch.Tensor):
        return None
    return tuple(x.shape)


def _embedding_pull_back(node: Node, bound: dict, cot: torch.Tensor, n: int, rows: torch.Tensor | None = None) -> list:
    """The lookup ``F.embedding(input, weight, ...)`` of :func:`_constant_lookup` (``bound``), factored by row."""
    weight, idx = next(iter(node.parents.values())), bound["input"]
    if not weight.requires_grad:
        return []
    if rows is None:
        rows = idx.reshape(1, -1).expand(n, -1)
    return [(weight, embedding.embedding(rows, cot, weight.shape[0], padding_idx=bound["padding_idx"],
                                         scale_grad_by_freq=bound["scale_grad_by_freq"], looked_up=idx))]
