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

from .arguments import op_name, tensor_args
from .attention import multi_head_attention_forward
from .derived import DROPOUTS, Derivations, Origin
from .fused import CONV_FUNCTIONS, FusedConv, FusedLinear, Slot, conv_arguments
from .layout import CONSTANT, Layout, Unknown, propagate, setitem_layout

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
        self.derivations = Derivations(params)  # tensors computed from parameters and constants only
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
            if t.shape[0] == n and t not in self.layouts and not self.derivations.is_derived(t):
                self.layouts[t] = (0, 1)
        return n

    def layout(self, t: torch.Tensor) -> Layout | None:
        """The example layout of ``t``, or None when it does not carry the batch."""
        return self.layouts.get(t)

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
        if self.fused and not self._paused and len(args) > 1 and id(args[1]) in self.fused:
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
            self.derivations.derive(func, args, kwargs, outs)
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
        diff_pos = {positions[id(t)]: self.derivations.origin(t) for _, t in diff}
        shapes = {positions[id(t)]: tuple(t.shape) for _, t in diff}
        versions = [(flat[i], flat[i]._version) for i in data_pos]
        detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in flat]
        use = Use(func, detached, spec, data_pos, diff_pos, shapes, lay, versions)
        out.register_hook(lambda g: self._grad(use, g))
        self.on_use(use)

    def _grad(self, use: Use, g: torch.Tensor) -> None:
        use.grads = g.detach()
        self.on_grad(use)
