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

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from .arguments import bind, tensor_args
from .attention import multi_head_attention_forward
from .fused import CONV_FUNCTIONS, FusedConv, FusedLinear, Slot, conv_arguments
from .grads import Dense, MatrixView, ParamGrad, fold, natural_view, split_params
from .layout import CONSTANT, Layout, Unknown, elementwise, propagate, setitem_layout
from .ops import embedding, linear, norm

log = logging.getLogger(__name__)

_EXPANDS = frozenset({"expand", "expand_as", "broadcast_to"})


@dataclass(eq=False)
class Node:
    """How a derived tensor was computed: the op, its arguments, and which of them came from parameters.

    Attributes:
        func: The op.
        flat: The op's arguments, flattened (``torch.utils._pytree``); tensors from parameters stay as they were.
        spec: Their tree structure.
        parents: ``{leaf position: Parameter | Node}`` of the arguments that are parameters or derived tensors,
            resolved when the op ran (an in-place op on a derived tensor gets the earlier node as its parent).
        output: Position of the tensor among the op's tensor outputs.
    """

    func: Callable
    flat: list
    spec: Any
    parents: dict[int, Any]
    output: int

    def call(self, values: dict[int, torch.Tensor]) -> torch.Tensor:
        """Re-run the op with the parents' leaves replaced by ``values``."""
        leaves = list(self.flat)
        for i, v in values.items():
            leaves[i] = v
        a, k = pytree.tree_unflatten(leaves, self.spec)
        res = self.func(*a, **k)
        return res if isinstance(res, torch.Tensor) else [r for r in res if isinstance(r, torch.Tensor)][self.output]


Origin = Any
"""A parameter or a :class:`Node`: where a parameter-derived argument of a use came from."""


@dataclass(eq=False)
class Use:
    """One op combining parameters (or tensors derived from them) with data, outside the owners' rules.

    Attributes:
        func: The op.
        flat: Its arguments, flattened, with data tensors detached.
        spec: Their tree structure.
        data: ``{leaf position: layout}`` of the batch-carrying arguments.
        diff: ``{leaf position: Parameter | Node}`` of the parameters and derived tensors among the arguments.
        shapes: ``{leaf position: shape}`` of those.
        out_layout: Example layout of the output.
        grads: The output gradient, once the backward pass has delivered it.
        results: Its per-example parameter gradients, once computed.
        layers: The layer trackers whose parameters it uses.
    """

    func: Callable
    flat: list
    spec: Any
    data: dict[int, tuple[int, int]]
    diff: dict[int, Origin]
    shapes: dict[int, tuple[int, ...]]
    out_layout: tuple[int, int]
    versions: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    grads: torch.Tensor | None = None
    results: list | None = None
    layers: list = field(default_factory=list)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensor outputs of an op."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, list | tuple):
        return [o for o in out if isinstance(o, torch.Tensor)]
    return []


PER_EXAMPLE_KEYWORDS = frozenset({"inputs_embeds", "decoder_inputs_embeds", "pixel_values", "input_values",
                                  "input_features"})
"""Float keyword inputs that carry the batch by convention (Hugging Face models)."""


def batch_leaves(args: tuple, kwargs: dict, names: tuple) -> list[torch.Tensor]:
    """The tensors of a model call that carry the batch.

    Those of the inputs ``names`` (positions or keyword names) when given. By default: the first tensor argument,
    every integer or boolean tensor with the same length on dimension 0 (token ids, masks, labels: one row per
    example), and the float keyword inputs of :data:`PER_EXAMPLE_KEYWORDS`. Any other float tensor is a constant
    shared by every example (prototypes, a memory bank), whatever its length.
    """
    if names:
        return _named_leaves(args, kwargs, names)
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
    if not leaves:
        return []
    n = leaves[0].shape[0]
    named = {id(t) for key in PER_EXAMPLE_KEYWORDS & set(kwargs) for t in pytree.tree_leaves(kwargs[key])
             if isinstance(t, torch.Tensor)}
    out = [leaves[0]]
    for t in leaves[1:]:
        if t.shape[0] == n and (not (t.is_floating_point() or t.is_complex()) or id(t) in named):
            out.append(t)
        elif t.shape[0] == n and not t.requires_grad:
            _log_shared(tuple(t.shape))
    return out


@functools.lru_cache(maxsize=64)
def _log_shared(shape: tuple) -> None:
    log.info("a float input of shape %s with the batch's length is taken as shared by all examples; pass "
             "batch_inputs=... if it has one row per example", shape)


def _named_leaves(args: tuple, kwargs: dict, names: tuple) -> list[torch.Tensor]:
    out = []
    for key in names:
        if isinstance(key, int) and key < len(args):
            value = args[key]
        elif isinstance(key, str) and key in kwargs:
            value = kwargs[key]
        else:
            raise ValueError(f"batch_inputs names {key!r}, which the model call does not have (positions "
                             f"0..{len(args) - 1}, keywords {sorted(kwargs)}); name the inputs that carry the batch")
        out += [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor) and t.dim()]
    return out


def _out_of_place(func: Callable) -> Callable:
    """The out-of-place twin of an in-place op (``add_`` → ``add``, ``__iadd__`` → ``__add__``).

    The same values, differentiable per example (the in-place form cannot write into a batched slice).
    """
    name = _name(func)
    if name.startswith("__i") and name.endswith("__"):
        return getattr(torch.Tensor, "__" + name[3:], func)
    if name.endswith("_") and not name.startswith("_"):
        return getattr(torch.Tensor, name[:-1], func)
    return func


def _name(func: Callable) -> str:
    name = getattr(func, "__name__", str(func))
    if name == "__get__":  # properties such as .T / .mT
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _apply_fused_linear(slot: Slot, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    return FusedLinear.apply(x, weight, bias, slot)


class UseTracker(TorchFunctionMode):
    """Classifies the tensors of a recorded forward and reports parameter uses (see the module docstring).

    Args:
        params: ``{id(parameter): parameter}`` of every tracked parameter.
        on_use: Called with each :class:`Use` whose output will receive a gradient.
        on_grad: Called with a :class:`Use` when its output gradient has arrived.
    """

    def __init__(self, params: dict[int, torch.nn.Parameter], on_use: Callable[[Use], None],
                 on_grad: Callable[[Use], None], fused: frozenset[int] = frozenset(),
                 on_mixed: Callable[[str, str], None] | None = None, batch_inputs: tuple = ()) -> None:
        super().__init__()
        self.on_mixed = on_mixed  # called with (op, module) when a gradient flows through an op that mixes examples
        self.batch_inputs = batch_inputs  # positions / keyword names of the model inputs that carry the batch
        self.where: list[str] = []  # names of the hooked modules whose calls are running (innermost last)
        self.verifying = False  # the verifier's extra backward pass is running: hooks ignore it
        self.params = params
        self.fused = fused  # weights whose F.linear calls run through FusedLinear (fused mode)
        self.slots: WeakIdKeyDictionary = WeakIdKeyDictionary()  # output of a fused call -> its Slot
        self.on_use = on_use
        self.on_grad = on_grad
        self.layouts: WeakIdKeyDictionary = WeakIdKeyDictionary()  # data tensor -> Layout
        self.derived: WeakIdKeyDictionary = WeakIdKeyDictionary()  # derived tensor -> Node
        self._owned: list[frozenset[int]] = []  # parameter ids of the rule-module calls in progress
        self.n: int | None = None  # examples of the current micro-batch
        self._paused = 0  # > 0 while gradcoh itself runs ops (observing one, a rule, fused mode's own linear)

    # --- what the module hooks tell us -------------------------------------------------------------------
    def new_batch(self, args: tuple, kwargs: dict) -> int | None:
        """An outermost model call: the inputs that carry the batch (on dimension 0) are the data.

        Those are the inputs named by ``batch_inputs`` (positions and keyword names), by default the first tensor
        argument only. Another input is never taken as per-example because its length equals the batch size (a
        bank of prototypes or negatives): it is a constant, shared by every example.
        """
        leaves = batch_leaves(args, kwargs, self.batch_inputs)
        if not leaves:
            return None
        n = leaves[0].shape[0]
        wrong = [tuple(t.shape) for t in leaves if t.shape[0] != n]
        if wrong:
            raise ValueError(f"batch_inputs={self.batch_inputs!r} names inputs of different lengths on dimension 0 "
                             f"({n} and {wrong[0]}); name only the inputs with one entry per example")
        if self.n is None:
            self.n = n
        for t in leaves:
            if t not in self.layouts and not self.is_derived(t):
                self.layouts[t] = (0, 1)
        return n

    def layout(self, t: torch.Tensor) -> Layout | None:
        """The example layout of ``t``, or None when it does not carry the batch."""
        return self.layouts.get(t)

    def origin(self, t: torch.Tensor) -> Origin | None:
        """The parameter or derivation node behind ``t``, or None for data and constants."""
        if id(t) in self.params:
            return self.params[id(t)]
        return self.derived.get(t)

    def is_derived(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was computed from parameters and constants only (or is a parameter)."""
        return id(t) in self.params or t in self.derived

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run inside are not observed (nested: the tracker resumes when the outermost block ends)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def is_paused(self) -> bool:
        """Whether gradcoh itself is running ops (see :meth:`paused`): module hooks then ignore the calls too."""
        return self._paused > 0

    def rule_call_started(self, owned: frozenset[int]) -> None:
        """A module whose rule covers the parameters ``owned`` (ids) starts a call: their uses inside are its own."""
        self._owned.append(owned)

    def rule_call_ended(self) -> None:
        """The innermost call of :meth:`rule_call_started` returned."""
        if self._owned:
            self._owned.pop()

    def reset(self) -> None:
        """Forget the tensors of a finished micro-batch."""
        self.layouts = WeakIdKeyDictionary()
        self.derived = WeakIdKeyDictionary()
        self._owned.clear()
        self.n = None

    # --- every torch op ----------------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and not self._paused and self.n is not None:
            with self:  # the mode is off inside this call: back on, so that every op of the attention is seen
                return multi_head_attention_forward(*args, **kwargs)
        if self.fused and not self._paused and len(args) > 1 and id(args[1]) in self.fused:
            out = self._fused(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        if self._paused or self.n is None:
            return out
        data, diff = [], []
        for pos, t in tensor_args(args, kwargs):
            if id(t) in self.params or t in self.derived:
                diff.append((pos, t))
            else:
                lay = self.layouts.get(t)
                if lay is not None:
                    data.append((pos, t, lay))
        if not data and not diff:
            return out
        with self.paused():
            self._observe(func, args, kwargs, out, data, diff)
        return out

    def _fused(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A Linear or convolution call of a fused weight, through its fused Function (with a new slot)."""
        conv = conv_arguments(args, kwargs) if func in CONV_FUNCTIONS else None
        if func is not F.linear and conv is None:
            return func(*args, **kwargs)
        slot = Slot(materialise=conv is None)
        with self.paused():  # the Function's own call is not a use
            if conv is None:
                out = _apply_fused_linear(slot, *args, **kwargs)
            else:
                out = FusedConv.apply(*conv[:3], slot, *conv[3:])
        self.slots[out] = slot
        return out

    def _observe(self, func: Callable, args: tuple, kwargs: dict, out: Any, data: list, diff: list) -> None:
        outs = _tensors(out)
        if not data:  # parameters and constants only: a derived tensor
            self._derive(func, args, kwargs, outs)
            return
        name = _name(func)
        if name in CONSTANT:
            return
        if name == "__setitem__":  # writing data into a tensor makes it data
            self._setitem(args, data)
            return
        lays = [propagate(name, args, kwargs, o, data, self.n, func, i) for i, o in enumerate(outs)]
        fresh = not any(type(lay) is Unknown for _, _, lay in data)  # (subclasses: layouts a rule follows)
        for o, lay in zip(outs, lays, strict=True):
            self.layouts[o] = lay
            if fresh and type(lay) is Unknown:
                self._watch(o, name)
        if self._owned:
            diff = [(pos, t) for pos, t in diff if id(t) not in self._owned[-1]]  # covered by the module's rule
        if not diff or not outs:
            return
        if len(outs) != 1 or not outs[0].requires_grad or not isinstance(lays[0], tuple):
            log.debug("use of a parameter by %s cannot be split by example; left to the reconciliation guard", name)
            return
        self._use(func, args, kwargs, outs[0], lays[0], data, diff)

    def _derive(self, func: Callable, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        """Remember how tensors computed from parameters and constants only were made."""
        if not any(o.requires_grad for o in outs):
            return
        flat, spec = pytree.tree_flatten((args, kwargs))
        parents = {i: self.origin(x) for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and self.is_derived(x)}
        for i, o in enumerate(outs):
            if o.requires_grad:
                self.derived[o] = Node(func, flat, spec, parents, i)

    def _setitem(self, args: tuple, data: list) -> None:
        """``target[index] = value``: the target's layout follows the rows written (see ``setitem_layout``)."""
        target, index = args[0], args[1]
        value = args[2] if len(args) > 2 else None
        lays = {id(t): lay for _, t, lay in data}
        before = lays.get(id(target))
        value_lay = lays.get(id(value)) if torch.is_tensor(value) else None
        index_data = [lay for _, t, lay in data if t is not target and t is not value]
        if index_data and any(t.is_floating_point() or t.requires_grad for _, t, _ in data
                              if t is not target and t is not value):
            after: Layout = Unknown("__setitem__")
        else:
            after = setitem_layout(target, index, value, before, value_lay)
        self.layouts[target] = after
        if type(after) is Unknown and type(before) is not Unknown and type(value_lay) is not Unknown:
            self._watch(target, "__setitem__")

    def _watch(self, t: torch.Tensor, op: str) -> None:
        """``t`` mixes the examples (op ``op``): a gradient through it makes per-example gradients upstream wrong."""
        if self.on_mixed is None or not t.requires_grad:
            return
        where = self.where[-1] if self.where else "the model"
        t.register_hook(lambda g: None if self.verifying else self.on_mixed(op, where))

    def _use(self, func: Callable, args: tuple, kwargs: dict, out: torch.Tensor, lay: tuple[int, int],
             data: list, diff: list) -> None:
        flat, spec = pytree.tree_flatten((args, kwargs))
        positions = {id(x): i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)}
        data_pos = {positions[id(t)]: lay for _, t, lay in data}
        diff_pos = {positions[id(t)]: self.origin(t) for _, t in diff}
        shapes = {positions[id(t)]: tuple(t.shape) for _, t in diff}
        versions = [(flat[i], flat[i]._version) for i in data_pos]
        detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in flat]
        use = Use(_out_of_place(func), detached, spec, data_pos, diff_pos, shapes, lay, versions)
        out.register_hook(lambda g: self._grad(use, g))
        self.on_use(use)

    def _grad(self, use: Use, g: torch.Tensor) -> None:
        if self.verifying:
            return
        use.grads = g.detach()
        self.on_grad(use)

    def roots(self, source: Origin) -> list[torch.nn.Parameter]:
        """The tracked parameters a parameter or derivation node comes from."""
        if not isinstance(source, Node):
            return [source]
        out: list[torch.nn.Parameter] = []
        for parent in source.parents.values():
            out += [p for p in self.roots(parent) if all(p is not q for q in out)]
        return out


# --- per-example gradients of a use -------------------------------------------------------------------------
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


def _classify(use: Use, n: int) -> tuple[list, list]:
    """Split a use's parameter-derived arguments by how they meet the batch.

    Returns:
        ``whole``: ``(position, source, setter)`` of arguments shared by all examples; ``sliced``: ``(position,
        source, axis)`` of arguments with one row block per example.
    """
    ref_pos, (ref_axis, r) = next(iter(use.data.items()))
    ref_dim = use.flat[ref_pos].dim()
    whole, sliced = [], []
    # only an elementwise op pairs row k of a batch-sized argument with example k's rows alone (a parameter with a
    # dimension equal to n in a matrix product is shared by all examples)
    name = _name(use.func)
    pairs_rows = elementwise(name) or name in ("cat", "concat", "concatenate", "stack")
    for pos, src in use.diff.items():
        shape = use.shapes[pos]
        axis = ref_axis - (ref_dim - len(shape))  # the axis that broadcasts against the batch axis
        batch_sized = n > 1 and 0 <= axis < len(shape) and shape[axis] == n * r
        if batch_sized and isinstance(src, Node) and _name(src.func) in _EXPANDS and len(src.parents) == 1:
            # expanded to the batch (cls_token.expand(B, -1, -1)): differentiate the unexpanded tensor, expanded
            # to one example's rows inside the per-example function
            small = list(shape)
            small[axis] = r
            whole.append((pos, next(iter(src.parents.values())), lambda p, s=tuple(small): p.expand(s)))
        elif batch_sized and pairs_rows:  # one row block per example (an embedding of constant ids [B, T])
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
            f"gradcoh cannot compute per-example gradients through {_name(use.func)} ({str(err).splitlines()[0]}); "
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
    name = _name(use.func)
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
    if isinstance(w, Node) or isinstance(b, Node) or w.dim() != 2 or x.dim() < 2 or x_lay[0] == x.dim() - 1:
        return None
    trained = [p for p in (w, b) if p is not None and p.requires_grad]
    xs = _split_examples(x, x_lay, n)
    gs = _split_examples(use.grads, use.out_layout, n)
    if transposed:
        grad = linear.transposed_linear(xs, gs, weight_shape=_shape_if_trains(w), bias_shape=_shape_if_trains(b))
    else:
        grad = linear.linear(xs, gs, weight=w.requires_grad, bias=b is not None and b.requires_grad)
    return list(zip(trained, split_params(grad, MatrixView.of([tuple(p.shape) for p in trained])), strict=True))


def _shape_if_trains(p: torch.Tensor | None) -> tuple[int, ...] | None:
    return tuple(p.shape) if p is not None and p.requires_grad else None


def _norm_use(use: Use, n: int) -> list | None:
    """Normalisation ops with parameter weight and bias outside a module rule: ``g_w = Σ x̂·δ``, ``g_b = Σ δ``.

    ``F.batch_norm``/``instance_norm``/``layer_norm``/``rms_norm``/``group_norm`` as timm's ``LayerNorm2d`` and
    ``BatchNormAct2d`` call them, with the statistics the op itself used (:mod:`.ops.norm`). Reads ``input`` (the only
    batch-carrying argument; its batch axis must be 0 except for the trailing-axis norms, where it is moved to 0),
    ``weight`` and ``bias`` by name.
    """
    name = _name(use.func)
    bound = _bound(use, name) if name in norm.OPS and len(use.data) == 1 else None
    if bound is None:
        return None
    where = _positions(use)
    present = {key: bound[key] for key in ("weight", "bias") if bound.get(key) is not None}
    params = {key: use.diff.get(where[id(t)]) for key, t in present.items()}
    (x_pos, (axis, r)), = use.data.items()
    if x_pos != where.get(id(bound["input"])) or any(p is None or isinstance(p, Node) for p in params.values()):
        return None  # a derived weight (or one covered by a rule): the general route
    if name not in norm.TRAILING and axis != 0:
        return None
    trained = {key: p for key, p in params.items() if p.requires_grad}
    if not trained:
        return []
    xhat = norm.normalised(name, bound["input"].float(), bound).movedim(axis, 0)
    go = use.grads.float().movedim(axis, 0)
    p_dims = next(iter(trained.values())).dim()
    reduce_dims = tuple(range(1, xhat.dim() - p_dims)) if name in norm.TRAILING else tuple(range(2, xhat.dim()))
    grad = fold(norm.affine(xhat, go, reduce_dims, weight="weight" in trained, bias="bias" in trained), r)
    forms = split_params(grad, MatrixView.of([tuple(p.shape) for p in trained.values()]))
    return [(p, Dense(*(b.to(use.grads.dtype) for b in f.blocks))) for p, f in zip(trained.values(), forms,
                                                                                    strict=True)]


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


def _embedding_pull_back(node: Node, bound: dict, cot: torch.Tensor, n: int, rows: torch.Tensor | None = None) -> list:
    """The lookup ``F.embedding(input, weight, ...)`` of :func:`_constant_lookup` (``bound``), factored by row."""
    weight, idx = next(iter(node.parents.values())), bound["input"]
    if not weight.requires_grad:
        return []
    if rows is None:
        rows = idx.reshape(1, -1).expand(n, -1)
    return [(weight, embedding.embedding(rows, cot, weight.shape[0], padding_idx=bound["padding_idx"],
                                         scale_grad_by_freq=bound["scale_grad_by_freq"], looked_up=idx))]
