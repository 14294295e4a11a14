"""Every use of a tracked parameter in a recorded forward, seen op by op.

A module's rule sees only the calls of that module. Real models also use parameters elsewhere: a tied embedding
is the output projection too (``lm_head.weight is wte.weight``), a container adds its own ``pos_embed`` or
multiplies by a layer-scale ``gamma``, a position embedding is looked up on ``arange(T)`` (no batch axis) and added
to the batch by broadcasting. :class:`UseTracker`, a ``TorchFunctionMode`` active while a step is recorded, sees
every torch op and sorts each tensor into

* **data**: computed from the batch; it carries an example layout (:mod:`gradcoh.logger.layout`);
* **derived**: computed from parameters and constants only (``pos_embed``, ``cls_token.expand(B, -1, -1)``,
  ``wpe(arange(T))``, ``table[index].permute(2, 0, 1)``); the op that made it is kept to pull gradients back;
* constants (buffers, ``arange``, the labels, ...), which are ignored.

An op that combines a parameter (or derived tensor) with data is a **use**. Uses inside a call of a module with a
rule for those parameters are that rule's business; every other use becomes a :class:`Use` whose output gradient
gives exact per-example gradients of the parameters involved (the use's vector-Jacobian product evaluated on each
example's slice, then pulled back through the derivation). A use whose output has no known example layout (a
penalty on the parameters added to the mean loss) cannot be split by example; it is left to the reconciliation
guard, which then reports the layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from .grads import Dense, Factored, ParamGrad, natural_view
from .layout import Layout, Unknown, propagate

log = logging.getLogger(__name__)

_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})


@dataclass(eq=False)
class Node:
    """How a derived tensor was computed: the op and its arguments (parameters, derived tensors, constants)."""

    func: Callable
    args: tuple
    kwargs: dict
    output: int  # position of the tensor among the op's tensor outputs


@dataclass(eq=False)
class Use:
    """One op combining parameters (or tensors derived from them) with data, outside the owners' rules.

    Attributes:
        func: The op.
        args: Its arguments, with tensors detached.
        kwargs: Its keyword arguments, with tensors detached.
        data: ``{leaf position: layout}`` of the batch-carrying arguments.
        diff: ``{leaf position: tensor}`` of the parameters and derived tensors among the arguments.
        out_layout: Example layout of the output.
        grads: The output gradient, once the backward pass has delivered it.
    """

    func: Callable
    args: tuple
    kwargs: dict
    data: dict[int, tuple[int, int]]
    diff: dict[int, torch.Tensor]
    out_layout: tuple[int, int]
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    grads: torch.Tensor | None = None
    results: list | None = None
    layers: list = field(default_factory=list)


def _leaves(args: tuple, kwargs: dict) -> list[tuple[int, Any]]:
    """Tensor arguments one level deep (and inside lists/tuples): ``(position in args or -1, tensor)``."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            out.append((i, a))
        elif isinstance(a, list | tuple):
            out += [(-1, x) for x in a if isinstance(x, torch.Tensor)]
    for a in kwargs.values():
        if isinstance(a, torch.Tensor):
            out.append((-1, a))
        elif isinstance(a, list | tuple):
            out += [(-1, x) for x in a if isinstance(x, torch.Tensor)]
    return out


class UseTracker(TorchFunctionMode):
    """Classifies the tensors of a recorded forward and reports parameter uses (see the module docstring).

    Args:
        params: ``{id(parameter): parameter}`` of every tracked parameter.
        on_use: Called with each :class:`Use` whose output will receive a gradient.
        on_grad: Called with a :class:`Use` when its output gradient has arrived.
    """

    def __init__(self, params: dict[int, torch.nn.Parameter], on_use: Callable[[Use], None],
                 on_grad: Callable[[Use], None]) -> None:
        super().__init__()
        self.params = params
        self.on_use = on_use
        self.on_grad = on_grad
        self.layouts: WeakIdKeyDictionary = WeakIdKeyDictionary()  # data tensor -> Layout
        self.derived: WeakIdKeyDictionary = WeakIdKeyDictionary()  # derived tensor -> Node
        self.owned: list[frozenset[int]] = []  # parameter ids of the rule-module calls in progress
        self.n: int | None = None  # examples of the current micro-batch
        self.paused = 0

    # --- what the module hooks tell us -------------------------------------------------------------------
    def new_batch(self, args: tuple, kwargs: dict) -> int | None:
        """An outermost model call: its tensors with the batch size on dimension 0 are the data."""
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
        if not leaves:
            return None
        n = leaves[0].shape[0]
        if self.n is None:
            self.n = n
        for t in leaves:
            if t.shape[0] == n and t not in self.layouts:
                self.layouts[t] = (0, 1)
        return n

    def layout(self, t: torch.Tensor) -> Layout | None:
        """The example layout of ``t``, or None when it does not carry the batch."""
        return self.layouts.get(t)

    def is_derived(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was computed from parameters and constants only (or is a parameter)."""
        return id(t) in self.params or t in self.derived

    def reset(self) -> None:
        """Forget the tensors of a finished micro-batch."""
        self.layouts = WeakIdKeyDictionary()
        self.derived = WeakIdKeyDictionary()
        self.owned.clear()
        self.n = None

    # --- every torch op ----------------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or self.n is None:
            return out
        data, diff = [], []
        for pos, t in _leaves(args, kwargs):
            if id(t) in self.params or t in self.derived:
                diff.append((pos, t))
            else:
                lay = self.layouts.get(t)
                if lay is not None:
                    data.append((pos, t, lay))
        if not data and not diff:
            return out
        self.paused += 1
        try:
            self._observe(func, args, kwargs, out, data, diff)
        finally:
            self.paused -= 1
        return out

    def _observe(self, func: Callable, args: tuple, kwargs: dict, out: Any, data: list, diff: list) -> None:
        outs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)] \
            if isinstance(out, list | tuple) else []
        name = getattr(func, "__name__", str(func))
        if name == "__get__":  # properties such as .T / .mT
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if not data:  # parameters and constants only: a derived tensor
            for i, o in enumerate(outs):
                if o.requires_grad:
                    self.derived[o] = Node(func, args, kwargs, i)
            return
        lays = [propagate(name, args, kwargs, o, data, self.n) for o in outs]
        for o, lay in zip(outs, lays, strict=True):
            self.layouts[o] = lay
        if not diff or not outs:
            return
        if self.owned:
            diff = [(pos, t) for pos, t in diff if id(t) not in self.owned[-1]]  # covered by the module's rule
            if not diff:
                return
        o, lay = outs[0], lays[0]
        if len(outs) != 1 or not o.requires_grad or isinstance(lay, Unknown):
            log.debug("use of a parameter by %s cannot be split by example; left to the reconciliation guard", name)
            return
        self._use(func, args, kwargs, o, lay, data, diff)

    def _use(self, func: Callable, args: tuple, kwargs: dict, out: torch.Tensor, lay: tuple[int, int],
             data: list, diff: list) -> None:
        flat, spec = pytree.tree_flatten((args, kwargs))
        positions = {id(x): i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)}
        data_pos = {positions[id(t)]: lay for _, t, lay in data if not isinstance(lay, Unknown)}
        if len(data_pos) != len(data):
            return
        diff_pos = {positions[id(t)]: t for _, t in diff}
        detached = [x.detach() if isinstance(x, torch.Tensor) and i not in diff_pos else x for i, x in enumerate(flat)]
        a, k = pytree.tree_unflatten(detached, spec)
        versions = [(x, x._version) for i, x in enumerate(flat) if i in data_pos]
        use = Use(func, a, k, data_pos, diff_pos, lay, versions)
        out.register_hook(lambda g: self._grad(use, g))
        self.on_use(use)

    def _grad(self, use: Use, g: torch.Tensor) -> None:
        use.grads = g.detach()
        self.on_grad(use)

    def roots(self, t: torch.Tensor) -> list[torch.nn.Parameter]:
        """The tracked parameters a parameter or derived tensor was computed from."""
        if id(t) in self.params:
            return [self.params[id(t)]]
        node = self.derived.get(t)
        if node is None:
            return []
        out: list[torch.nn.Parameter] = []
        for x in pytree.tree_leaves((node.args, node.kwargs)):
            if isinstance(x, torch.Tensor) and self.is_derived(x):
                out += [p for p in self.roots(x) if all(p is not q for q in out)]
        return out


# --- per-example gradients of a use -------------------------------------------------------------------------
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
    fast = _linear_use(use, tracker, n)
    if fast is not None:
        return fast
    flat, spec = pytree.tree_flatten((use.args, use.kwargs))
    ref_pos, (ref_axis, r) = next(iter(use.data.items()))
    ref_dim = flat[ref_pos].dim()
    whole, sliced = [], []  # (position, primal, setter); (position, tensor, axis)
    for pos, t in use.diff.items():
        node = tracker.derived.get(t)
        axis = ref_axis - (ref_dim - t.dim())  # the axis of t that broadcasts against the batch axis
        batch_sized = n > 1 and 0 <= axis < t.dim() and t.shape[axis] == n * r
        if batch_sized and node is not None and _name(node.func) in _EXPANDS:
            # expanded to the batch (cls_token.expand(B, -1, -1)): differentiate the unexpanded tensor, expanded
            # to one example's rows inside the per-example function
            base = next(x for x in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(x, torch.Tensor))
            shape = list(t.shape)
            shape[axis] = r
            whole.append((pos, base, lambda p, shape=tuple(shape): p.expand(shape)))
        elif batch_sized:  # one row block per example (an embedding of constant indices expanded to [B, T])
            sliced.append((pos, t, axis))
        else:
            whole.append((pos, t, None))
    data_pos = list(use.data)
    slices = [_split_examples(flat[i], use.data[i], n) for i in data_pos]
    slices += [_split_examples(t.detach(), (axis, r), n) for _, t, axis in sliced]
    positions = data_pos + [pos for pos, _, _ in sliced]
    n_data = len(data_pos)
    go = _split_examples(use.grads, use.out_layout, n)

    def one(example: list[torch.Tensor], g: torch.Tensor) -> tuple:
        def f(*values: torch.Tensor) -> torch.Tensor:
            leaves = list(flat)
            for i, x in zip(positions[:n_data], example[:n_data], strict=True):
                leaves[i] = x
            for (i, _, setter), v in zip(whole, values[: len(whole)], strict=True):
                leaves[i] = setter(v) if setter is not None else v
            for i, v in zip(positions[n_data:], values[len(whole) :], strict=True):
                leaves[i] = v
            a, k = pytree.tree_unflatten(leaves, spec)
            return use.func(*a, **k)

        primals = [p.detach() for _, p, _ in whole] + list(example[n_data:])
        _, vjp = torch.func.vjp(f, *primals)
        return vjp(g)

    try:
        cots = torch.func.vmap(one, randomness="same")(slices, go)
    except RuntimeError as err:
        raise RuntimeError(
            f"gradcoh cannot compute per-example gradients through {_name(use.func)} ({str(err).splitlines()[0]}); "
            "register a rule for the module that calls it (LayerRules.register) or exclude its layer with layers=..."
        ) from err
    out = []
    for (_, p, _), cot in zip(whole, cots[: len(whole)], strict=True):
        out += pull_back(p, cot, tracker, n)
    for (_, t, axis), cot in zip(sliced, cots[len(whole) :], strict=True):
        out += pull_back_rows(t, cot, (axis, r), tracker, n)
    return out


def pull_back_rows(t: torch.Tensor, cot: torch.Tensor, lay: tuple[int, int], tracker: UseTracker, n: int) -> list:
    """Like :func:`pull_back` for a derived tensor with a batch-sized axis, given each example's rows ``cot``."""
    node = tracker.derived.get(t)
    if node is not None and node.func is F.embedding and id(node.args[1]) in tracker.params and lay[0] == 0 and \
            not tracker.is_derived(node.args[0]):
        idx = _split_examples(node.args[0], lay, n).reshape(n, -1)
        return _embedding_pull_back(node, cot, tracker, n, rows=idx)
    full = cot.new_zeros((n, *t.shape))
    axis, r = lay
    for i in range(n):  # each example's cotangent is zero outside its own rows
        full[i].narrow(axis, i * r, r).copy_(cot[i])
    return pull_back(t, full, tracker, n)


def _name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


def _linear_use(use: Use, tracker: UseTracker, n: int) -> list | None:
    """``F.linear(x, W, b)``, ``addmm(b, x, W)``, ``x @ W`` with parameter weights: factored per-example forms."""
    name = _name(use.func)
    args = use.args
    if name == "linear":
        x, w, b = args[0], args[1], args[2] if len(args) > 2 else use.kwargs.get("bias")
        transposed = False
    elif name == "addmm" and not use.kwargs:
        b, x, w = args[:3]
        transposed = True
    elif name in ("matmul", "__matmul__") and len(args) == 2:
        x, w, b = args[0], args[1], None
        transposed = True
    else:
        return None
    params = tracker.params
    if not isinstance(w, torch.Tensor) or id(w) not in params or w.dim() != 2 or (b is not None and id(b) not in params):
        return None
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    flat = pytree.tree_leaves((use.args, use.kwargs))
    x_lay = next((use.data[i] for i, v in enumerate(flat) if v is x and i in use.data), None)
    if x_lay is None or x_lay[0] == x.dim() - 1 or len(use.data) != 1:
        return None
    xs = _split_examples(x, x_lay, n).reshape(n, -1, x.shape[-1])
    gs = _split_examples(use.grads, use.out_layout, n).reshape(n, -1, use.grads.shape[-1])
    out: list[tuple[torch.nn.Parameter, ParamGrad]] = []
    if w.requires_grad:
        out.append((params[id(w)], Factored(xs, gs) if transposed else Factored(gs, xs)))
    if b is not None and b.requires_grad:
        out.append((params[id(b)], Dense(gs.sum(1).reshape(n, *natural_view(tuple(b.shape))))))
    return out


def pull_back(t: torch.Tensor, cot: torch.Tensor, tracker: UseTracker, n: int) -> list:
    """Per-example gradients ``[(parameter, form)]`` of the parameters ``t`` derives from, given ``cot [n, *t.shape]``.

    An embedding lookup on constant indices (``wpe(arange(T))``, T5's relative position buckets) stays factored
    (rows addressed by index, never a ``V × d`` block per example); any other derivation is pulled back with
    ``torch.func.vmap`` of its vector-Jacobian product.
    """
    if id(t) in tracker.params:
        p = tracker.params[id(t)]
        return [(p, Dense(cot.reshape(n, *natural_view(tuple(p.shape)))))] if p.requires_grad else []
    node = tracker.derived[t]
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    if node.func is F.embedding and len(node.args) >= 2 and id(node.args[1]) in tracker.params and \
            not tracker.is_derived(node.args[0]):
        return _embedding_pull_back(node, cot, tracker, n)
    diff_pos = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and tracker.is_derived(x)]

    def f(*values: torch.Tensor) -> torch.Tensor:
        leaves = list(flat)
        for i, v in zip(diff_pos, values, strict=True):
            leaves[i] = v
        a, k = pytree.tree_unflatten(leaves, spec)
        res = node.func(*a, **k)
        if isinstance(res, torch.Tensor):
            return res
        return [r for r in res if isinstance(r, torch.Tensor)][node.output]

    primals = [flat[i].detach() for i in diff_pos]

    def one(c: torch.Tensor) -> tuple:
        _, vjp = torch.func.vjp(f, *primals)
        return vjp(c)

    cots = torch.func.vmap(one)(cot)
    out = []
    for i, c in zip(diff_pos, cots, strict=True):
        out += pull_back(flat[i], c, tracker, n)
    return out


def _embedding_pull_back(node: Node, cot: torch.Tensor, tracker: UseTracker, n: int,
                         rows: torch.Tensor | None = None) -> list:
    idx, weight = node.args[0], node.args[1]
    if not weight.requires_grad:
        return []
    bound = dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), node.args[2:],
                     strict=False)) | node.kwargs
    if rows is None:
        rows = idx.reshape(1, -1).expand(n, -1)
    v = cot.reshape(n, rows.shape[1], -1)
    pad = bound.get("padding_idx")
    if pad is not None:
        pad = pad + weight.shape[0] if pad < 0 else pad
        v = v * (rows != pad).unsqueeze(-1).to(v.dtype)
    if bound.get("scale_grad_by_freq"):
        counts = torch.bincount(idx.reshape(-1), minlength=weight.shape[0]).to(v.dtype)
        v = v / counts[rows].unsqueeze(-1)
    return [(tracker.params[id(weight)], Factored(None, v, rows_index=rows, n_rows=weight.shape[0]))]
