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

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from .arguments import op_name, tensor_args
from .attention import multi_head_attention_forward
from .derived import DROPOUTS, Derivations, Origin
from .fused import (
    CONV_FUNCTIONS,
    FusedAddmm,
    FusedConv,
    FusedLevel,
    FusedLinear,
    SketchKind,
    Slot,
    addmm_arguments,
    call_is_fused,
    conv_arguments,
    conv_spares_nothing,
    saved_tensors_hooked,
)
from .layout import CONSTANT, Layout, Reduced, Unknown, propagate
from .ops import norm
from .selection import setitem_layout
from .tensormap import TensorMap

log = logging.getLogger(__name__)

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
        stats: ``(leaf position of the input, mean, rstd)`` that an ``F.layer_norm`` kernel saved
            (:func:`.ops.norm.forward_stats`), or None.
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
    stats: tuple | None = None


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
    name = op_name(func)
    if name.startswith("__i") and name.endswith("__"):
        return getattr(torch.Tensor, "__" + name[3:], func)
    if name.endswith("_") and not name.startswith("_"):
        return getattr(torch.Tensor, name[:-1], func)
    return func


def _apply_fused_linear(slot: Slot, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    return FusedLinear.apply(x, weight, bias, slot)


def _linear_arguments(x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return x, weight, bias


class _Pause:
    """The context manager of :meth:`UseTracker.paused` (a counter, so nested blocks work)."""

    __slots__ = ("tracker",)

    def __init__(self, tracker: UseTracker) -> None:
        self.tracker = tracker

    def __enter__(self) -> None:
        self.tracker._paused += 1

    def __exit__(self, *exc: object) -> None:
        self.tracker._paused -= 1


class UseTracker(TorchFunctionMode):
    """Classifies the tensors of a recorded forward and reports parameter uses (see the module docstring).

    Args:
        params: ``{id(parameter): parameter}`` of every tracked parameter.
        on_use: Called with each :class:`Use` whose output will receive a gradient.
        on_grad: Called with a :class:`Use` when its output gradient has arrived.
    """

    def __init__(self, params: dict[int, torch.nn.Parameter], on_use: Callable[[Use], None],
                 on_grad: Callable[[Use], None], fused: frozenset[int] = frozenset(),
                 on_mixed: Callable[[str, str], None] | None = None, batch_inputs: tuple = (), *,
                 fused_level: FusedLevel = "auto", sketch_kind: SketchKind | None = None,
                 guarded: Callable[[int], bool] | None = None) -> None:
        super().__init__()
        self.on_mixed = on_mixed  # called with (op, module) when a gradient flows through an op that mixes examples
        self.batch_inputs = batch_inputs  # positions / keyword names of the model inputs that carry the batch
        self.where: list[str] = []  # names of the hooked modules whose calls are running (innermost last)
        self.verifying = False  # the verifier's extra backward pass is running: hooks ignore it
        self.on_reduced: Callable | None = None  # called with (scalar, op, func, args, kwargs) of a batch reduction
        self.params = params
        self.fused = fused  # weights whose F.linear/conv/addmm calls may run through a fused Function (fused mode)
        self.fused_level, self.sketch_kind = fused_level, sketch_kind  # which calls (gradcoh.logger.fused)
        self.guarded = guarded  # weight id -> the guard checks its layer at this step (its calls are not fused then)
        self.slots: WeakIdKeyDictionary = WeakIdKeyDictionary()  # output of a fused call -> its Slot
        self.on_use = on_use
        self.on_grad = on_grad
        self.layouts = TensorMap()  # data tensor -> Layout
        self.derivations = Derivations(params)  # tensors computed from parameters and constants only
        self._owned: list[frozenset[int]] = []  # parameter ids of the rule-module calls in progress
        self.n: int | None = None  # examples of the current micro-batch
        self._paused = 0  # > 0 while gradcoh itself runs ops (observing one, a rule, fused mode's own linear)
        self._pause = _Pause(self)

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
            if t not in self.layouts and not self.derivations.is_derived(t):
                self.layouts[t] = (0, 1)
        return n

    def layout(self, t: torch.Tensor) -> Layout | None:
        """The example layout of ``t``, or None when it does not carry the batch."""
        return self.layouts.get(t)

    def paused(self) -> _Pause:
        """Ops run inside are not observed (nested: the tracker resumes when the outermost block ends).

        A plain context-manager object, not a generator: it wraps every observed op (about 14 per layer and step).
        """
        return self._pause

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
        self.layouts = TensorMap()
        self.derivations = Derivations(self.params)
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
            if self.derivations.is_derived(t):
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
                self.derivations.freeze_dropout(args, kwargs, out, rng)
        return out

    def _run(self, func: Callable, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor | None]:
        """Call the op (through its fused Function for fused weights): ``(output, random state or None)``.

        The random state is the one a dropout of a parameter-derived tensor started from
        (:meth:`~gradcoh.logger.derived.Derivations.freeze_dropout`).
        """
        rng = None
        if not self._paused and op_name(func) in DROPOUTS and args and self.derivations.is_derived(args[0]):
            rng = torch.cuda.get_rng_state(args[0].device) if args[0].is_cuda else torch.get_rng_state()
        if self.fused and not self._paused and len(args) > 1 and (
                id(args[1]) in self.fused or (func is torch.addmm and len(args) > 2 and id(args[2]) in self.fused)):
            return self._fused(func, args, kwargs), rng
        return func(*args, **kwargs), rng

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
                self._watch(o, op_name(func))

    def _fused(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A Linear, convolution or ``Conv1D`` call of a fused weight: through its fused Function (a new slot) if fused.

        Whether: :func:`~gradcoh.logger.fused.call_is_fused`. A convolution whose input needs a gradient is never
        fused below level True: it is run as it is before its arguments are bound (every interior convolution).
        """
        if func in CONV_FUNCTIONS and conv_spares_nothing(self.fused_level, args[0] if args else kwargs.get("input")):
            return func(*args, **kwargs)
        conv = conv_arguments(func, args, kwargs) if func in CONV_FUNCTIONS else None
        addmm = addmm_arguments(args, kwargs) if func is torch.addmm else None
        if func is not F.linear and conv is None and addmm is None:
            return func(*args, **kwargs)
        if addmm is not None:
            bias, x, weight = addmm
        else:
            x, weight, bias = conv[:3] if conv is not None else _linear_arguments(*args, **kwargs)
        if (self.guarded is not None and self.guarded(id(weight))) or not call_is_fused(
                self.n or 0, x, weight, bias, conv, level=self.fused_level, sketch=self.sketch_kind,
                transposed=addmm is not None):
            return func(*args, **kwargs)  # (a guard-checked layer keeps autograd's GEMM: an independent batch sum)
        slot = Slot(id(weight), planned=self.fused_level == "auto")
        with self.paused():  # the Function's own call is not a use
            if addmm is not None:
                out = FusedAddmm.apply(bias, x, weight, slot)
            elif conv is None:
                out = _apply_fused_linear(slot, *args, **kwargs)
            else:
                out = FusedConv.apply(*conv[:3], slot, *conv[3:])
        self.slots[out] = slot
        return out

    def slot_of(self, output: Any, weight: torch.Tensor | None) -> Slot | None:
        """The :class:`~gradcoh.logger.fused.Slot` of a module call's ``output``, if its fused op used ``weight``.

        Also of the tensor ``output`` views: a ``Conv1D`` returns a view of its ``addmm``.
        """
        if not self.slots or not isinstance(output, torch.Tensor) or weight is None:
            return None
        with self.paused():  # reading ._base is not an op of the model
            slot = self.slots.get(output)
            if slot is None and output._base is not None:
                slot = self.slots.get(output._base)
        return slot if slot is not None and slot.weight == id(weight) else None

    def _observe(self, func: Callable, args: tuple, kwargs: dict, out: Any, data: list, diff: list) -> None:
        outs = _tensors(out)
        if not data:  # parameters and constants only: a derived tensor
            self.derivations.derive(func, args, kwargs, outs)
            return
        name = op_name(func)
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
        self._reduction(name, func, args, kwargs, outs, lays, data)
        if self._owned:
            diff = [(pos, t) for pos, t in diff if id(t) not in self._owned[-1]]  # covered by the module's rule
        if not diff or not outs:
            return
        if len(outs) != 1 or not outs[0].requires_grad or not isinstance(lays[0], tuple):
            log.debug("use of a parameter by %s cannot be split by example; left to the reconciliation guard", name)
            return
        self._use(func, args, kwargs, outs[0], lays[0], data, diff)

    def _reduction(self, name: str, func: Callable, args: tuple, kwargs: dict, outs: list, lays: list,
                   data: list) -> None:
        """An op reducing the batch axis to a scalar (a loss): tell :attr:`on_reduced` (see logger/reduction.py)."""
        if (self.on_reduced is not None and len(outs) == 1 and type(lays[0]) is Reduced and outs[0].numel() == 1
                and outs[0].requires_grad and not any(isinstance(lay, Reduced) for _, _, lay in data)):
            self.on_reduced(outs[0], name, func, args, kwargs)

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
        diff_pos = {positions[id(t)]: self.derivations.origin(t) for _, t in diff}
        shapes = {positions[id(t)]: tuple(t.shape) for _, t in diff}
        versions = [(flat[i], flat[i]._version) for i in data_pos]
        detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in flat]
        use = Use(_out_of_place(func), detached, spec, data_pos, diff_pos, shapes, lay, versions)
        if op_name(func) == "layer_norm" and not saved_tensors_hooked():  # (unpacking would run the hooks)
            use.stats = norm.forward_stats(out, flat)
        out.register_hook(lambda g: self._grad(use, g))
        self.on_use(use)

    def _grad(self, use: Use, g: torch.Tensor) -> None:
        if self.verifying:
            return
        use.grads = g.detach() if g.requires_grad else g  # (create_graph=True only: no op otherwise)
        self.on_grad(use)
