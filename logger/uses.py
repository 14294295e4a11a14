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
gives exact per-example gradients of the parameters involved (:mod:`gradcoh.logger.usegrads`: the use's
vector-Jacobian product evaluated on each example's slice, then pulled back through the derivation). A use whose
output has no known example layout (a penalty on the parameters added to the mean loss) cannot be split by example;
it is left to the reconciliation guard, which then reports the layer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from .arguments import tensor_args
from .attention import multi_head_attention_forward
from .fused import CONV_FUNCTIONS, FusedConv, FusedLinear, Slot, conv_arguments
from .layout import CONSTANT, Layout, Unknown, propagate, setitem_layout

log = logging.getLogger(__name__)

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
        inplace = _inplace(self.func, pytree.tree_unflatten(self.flat, self.spec)[1])
        for i, v in values.items():
            leaves[i] = v.clone() if inplace else v  # an in-place op (ReLU(inplace=True)) must not write into its input
        a, k = pytree.tree_unflatten(leaves, self.spec)
        res = self.func(*a, **k)
        return res if isinstance(res, torch.Tensor) else [r for r in res if isinstance(r, torch.Tensor)][self.output]


_DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})


def _inplace(func: Callable, kwargs: dict) -> bool:
    """Whether an op writes into its first argument (``zero_``, ``__iadd__``, ``F.relu(x, inplace=True)``)."""
    name = op_name(func)
    return (name.endswith("_") and not name.startswith("__")) or name.startswith("__i") or kwargs.get("inplace") is True


@dataclass(eq=False)
class _WriteThrough:
    """A derived tensor after an in-place op on a view of it: ``base`` with the view rewritten by the op.

    Swin-V2 clones the qkv bias and zeroes its key part in place through a slice; the bias that reaches
    ``F.linear`` is then this function of the clone.
    """

    view: Node
    base_position: int
    op: Node

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        base = base.clone()
        view = self.view.call({self.base_position: base})
        leaves = list(self.op.flat)
        leaves[0] = view
        a, k = pytree.tree_unflatten(leaves, self.op.spec)
        self.op.func(*a, **k)
        return base


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


def op_name(func: Callable) -> str:
    """The name of an op as the layout rules know it (``linear``, ``__add__``, ``T`` for the property ``.T``)."""
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
                 on_grad: Callable[[Use], None], fused: frozenset[int] = frozenset()) -> None:
        super().__init__()
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
        """An outermost model call: its tensors with the batch size on dimension 0 are the data."""
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
        if not leaves:
            return None
        n = leaves[0].shape[0]
        if self.n is None:
            self.n = n
        for t in leaves:
            if t.shape[0] == n and t not in self.layouts and not self.is_derived(t):
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
        out, rng = self._run(func, args, kwargs)
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
            self._observe_or_lose(func, args, kwargs, out, data, diff)
            if rng is not None:
                self._freeze_dropout(args, kwargs, out, rng)
        return out

    def _run(self, func: Callable, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor | None]:
        """Call the op (through its fused Function for fused weights): ``(output, random state or None)``.

        The random state is the one a dropout of a parameter-derived tensor started from (:meth:`_freeze_dropout`).
        """
        rng = None
        if not self._paused and op_name(func) in _DROPOUTS and args and self.is_derived(args[0]):
            rng = torch.cuda.get_rng_state(args[0].device) if args[0].is_cuda else torch.get_rng_state()
        if self.fused and not self._paused and len(args) > 1 and id(args[1]) in self.fused:
            return self._fused(func, args, kwargs), rng
        return func(*args, **kwargs), rng

    def _freeze_dropout(self, args: tuple, kwargs: dict, out: Any, rng: torch.Tensor) -> None:
        """A dropout of a parameter-derived tensor (DeBERTa's relative embeddings) becomes ``x · noise``.

        With the forward's own noise, pulling gradients back through it uses the batch forward's mask. The noise is
        regenerated from the random state the op started from, as the CPU kernel draws it (``bernoulli_(1 - p) /
        (1 - p)``), and kept only if ``x · noise`` is the op's output to the last bit; else, where ``x`` has no zeros,
        it is read off the output. Otherwise the derivation stays random and pulling back through it is refused by
        ``torch.func``.
        """
        x = args[0]
        p = float(args[1] if len(args) > 1 else kwargs.get("p", 0.5))
        if not isinstance(out, torch.Tensor) or out not in self.derived or not 0 < p < 1 or out is x:
            return
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            if x.is_cuda:
                torch.cuda.set_rng_state(rng, x.device)
            else:
                torch.set_rng_state(rng)
            noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
        if not torch.equal(x * noise, out):
            noise = (out != 0).to(out.dtype) / (1 - p)
            if bool((x == 0).any()) or not torch.equal(x * noise, out):
                return
        flat, spec = pytree.tree_flatten(((x, noise.detach()), {}))
        self.derived[out] = Node(torch.mul, flat, spec, {0: self.origin(x)}, 0)

    def _observe_or_lose(self, func: Callable, args: tuple, kwargs: dict, out: Any, data: list, diff: list) -> None:
        """:meth:`_observe`, failing closed.

        An op it cannot follow leaves its outputs' layout unknown (a layer that needs them is then refused, naming the
        op) instead of an internal error in the user's forward.
        """
        try:
            self._observe(func, args, kwargs, out, data, diff)
        except ValueError:
            raise
        except Exception as err:
            log.debug("gradcoh cannot follow %s: %r", op_name(func), err)
            for o in _tensors(out):
                self.layouts[o] = Unknown(f"{op_name(func)} ({type(err).__name__})")

    def _fused(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A Linear or convolution call of a fused weight, through its fused Function (with a new slot)."""
        conv = conv_arguments(func, args, kwargs) if func in CONV_FUNCTIONS else None
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
        name = op_name(func)
        if name in CONSTANT:
            return
        if name == "__setitem__":  # writing data into a tensor makes it data
            self._setitem(args, data)
            return
        lays = [propagate(name, args, kwargs, o, data, self.n) for o in outs]
        for o, lay in zip(outs, lays, strict=True):
            self.layouts[o] = lay
        if self._owned:
            diff = [(pos, t) for pos, t in diff if id(t) not in self._owned[-1]]  # covered by the module's rule
        if not diff or not outs:
            return
        if len(outs) != 1 or not outs[0].requires_grad or isinstance(lays[0], Unknown):
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
        if outs and flat and outs[0] is flat[0] and _inplace(func, kwargs):
            self._write_through(outs[0])

    def _write_through(self, view: torch.Tensor) -> None:
        """An in-place op on a view of a derived tensor changed the tensor it views: re-derive that tensor."""
        base = view._base
        op = self.derived.get(view)
        before = None if op is None else op.parents.get(0)
        if base is None or base not in self.derived or not isinstance(before, Node):
            return
        old = self.derived[base]
        positions = [i for i, src in before.parents.items() if src is old]
        if len(positions) != 1:
            return
        flat, spec = pytree.tree_flatten(((base,), {}))
        self.derived[base] = Node(_WriteThrough(before, positions[0], op), flat, spec, {0: old}, 0)

    def _setitem(self, args: tuple, data: list) -> None:
        target = args[0]
        if any(t is target for _, t, _ in data):
            return  # already data; its layout is unchanged by writing into it
        values = [(t, lay) for pos, t, lay in data if pos == 2]
        if len(values) == 1 and len(data) == 1:
            self.layouts[target] = setitem_layout(target, args[1], *values[0])
        else:
            self.layouts[target] = Unknown("__setitem__")

    def _use(self, func: Callable, args: tuple, kwargs: dict, out: torch.Tensor, lay: tuple[int, int],
             data: list, diff: list) -> None:
        flat, spec = pytree.tree_flatten((args, kwargs))
        positions = {id(x): i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)}
        data_pos = {positions[id(t)]: lay for _, t, lay in data}
        diff_pos = {positions[id(t)]: self.origin(t) for _, t in diff}
        shapes = {positions[id(t)]: tuple(t.shape) for _, t in diff}
        versions = [(flat[i], flat[i]._version) for i in data_pos]
        detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in flat]
        use = Use(func, detached, spec, data_pos, diff_pos, shapes, lay, versions)
        out.register_hook(lambda g: self._grad(use, g))
        self.on_use(use)

    def _grad(self, use: Use, g: torch.Tensor) -> None:
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
