"""Capture of one layer's module calls and parameter uses during a recorded step, until their gradients arrive.

A forward hook on every module with a rule for the layer's parameters keeps each call's (detached) inputs and puts a
tensor hook on its outputs; the step's :class:`~gradcoh.logger.uses.UseTracker` reports the other uses of the
parameters. Tensor hooks on outputs, unlike ``register_full_backward_hook``, work with in-place operations that
follow the module (ResNet's ``out += identity``, ``ReLU(inplace=True)``). Once every call and use of the current
forward has received its output gradient the layer is ready, and the tracker is told.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from .arguments import map_tensors, tensors
from .fused import Slot, saved_tensors_hooked
from .layout import Row
from .plan import LayerPlan, Source
from .uses import Use

if TYPE_CHECKING:
    from .step import StepState


@dataclass(eq=False)
class Call:
    """One call of a module with a rule: its detached inputs, and its output gradients once they arrive.

    Attributes:
        source: The module and its rule.
        args: The call's positional arguments (tensors detached).
        kwargs: Its keyword arguments (tensors detached).
        versions: ``(tensor, version)`` of its tensor inputs, to detect in-place changes before the backward.
        r: Rows per example on the batch axis (``nW`` windows per image in Swin).
        axis: The batch axis of the call's inputs and outputs (moved to the front for a position-wise rule).
        grads: The output gradients (None for outputs that received none), once arrived.
        slot: Fused mode: where the batch weight gradient goes.
        stats: What the forward kernel saved that the rule reads instead of recomputing it (``nn.LayerNorm``'s
            ``(input position, mean, rstd)``, :func:`.ops.norm.forward_stats`), or None.
    """

    source: Source
    args: tuple
    kwargs: dict
    versions: list[tuple[torch.Tensor, int]]
    r: int
    axis: int = 0
    grads: tuple | None = None
    slot: Slot | None = None
    stats: tuple | None = None

    def batch_first(self) -> tuple[tuple, dict, tuple]:
        """``(args, kwargs, grads)`` with the batch axis moved to the front (position-wise rules only)."""
        if self.axis == 0:
            return self.args, self.kwargs, self.grads
        axis = self.axis
        args, kwargs = map_tensors(self.args, self.kwargs, lambda t: t.movedim(axis, 0) if t.dim() > axis else t)
        return args, kwargs, tuple(None if g is None else g.movedim(axis, 0) for g in self.grads)

    def check_unmodified(self, layer: str) -> None:
        """Raise if an input was modified in place after the forward."""
        if any(tensor._version != version for tensor, version in self.versions):
            raise RuntimeError(
                f"an input of layer '{layer}' was modified in place after its forward; "
                "per-example gradients need the original input (avoid the in-place op on it)"
            )


class LayerCapture:
    """The calls and uses of one layer's parameters in the current micro-batch.

    Args:
        plan: The layer.
        on_ready: Called when every captured call and use has its output gradient.
    """

    def __init__(self, plan: LayerPlan, on_ready: Callable[[], None]) -> None:
        self.plan = plan
        self.on_ready = on_ready
        self._state: StepState | None = None
        self._handles: list[RemovableHandle] = []
        self._calls: list[Call] = []
        self._uses: list[Use] = []

    def attach(self, state: StepState) -> None:
        """Install the forward hooks for one recorded step."""
        self._state = state
        for source in self.plan.sources:
            self._handles.append(source.module.register_forward_hook(
                lambda m, a, k, o, source=source: self._forward_hook(source, a, k, o), with_kwargs=True))

    def detach(self) -> None:
        """Remove the hooks and drop captured tensors."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._calls, self._uses = [], []

    @property
    def pending(self) -> bool:
        """Whether calls or uses are captured and not yet taken."""
        return bool(self._calls or self._uses)

    def take(self) -> tuple[list[Call], list[Use]]:
        """The captured calls and uses that received their gradients; forgets all of them."""
        calls = [c for c in self._calls if c.grads is not None]
        uses = [u for u in self._uses if u.grads is not None]
        self._calls, self._uses = [], []
        return calls, uses

    def add_use(self, use: Use) -> None:
        """A use of this layer's parameters outside their modules' rules (reported by the use tracker)."""
        self._uses.append(use)

    def use_grad_arrived(self) -> None:
        """The output gradient of one of this layer's uses has arrived."""
        self._state.in_backward()
        self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.pending and all(c.grads is not None for c in self._calls) and all(
                u.grads is not None for u in self._uses):
            self.on_ready()

    def _forward_hook(self, source: Source, args: tuple, kwargs: dict, output: Any) -> None:
        uses = self._state.uses
        if uses.is_paused:  # a rule running the module's forward again, or an op the use tracker is observing
            return
        with uses.paused():  # the hook's own ops (detach, _version) are not the model's: not observed
            self._capture(source, args, kwargs, output, uses)

    def _capture(self, source: Source, args: tuple, kwargs: dict, output: Any, uses: Any) -> None:
        """:meth:`_forward_hook`'s work, with the use tracker paused."""
        outs = [output] if isinstance(output, torch.Tensor) else \
            [o for o in pytree.tree_leaves(output) if torch.is_tensor(o)]
        needs = [o for o in outs if o.requires_grad]
        if not needs:
            return  # no gradient will flow (no_grad, frozen): nothing to record
        leaves = tensors(args, kwargs)
        first = next((a for a in leaves if uses.layout(a) is not None), None)
        if first is None:
            return  # no batch in the inputs (a lookup on arange(T)): a derived tensor, followed by its uses
        custom = getattr(source.rule, "rows_per_example", None)  # rules that check the batch axis themselves
        axis, r = (0, custom(source.module, args, kwargs, uses.layout, self._state.n)) if custom else \
            self._rows_per_example(source, first, uses.layout(first))
        detached = map_tensors(args, kwargs, torch.Tensor.detach)
        slot = uses.slot_of(output, getattr(source.module, "weight", None))
        call = Call(source, detached[0], detached[1], [(a, a._version) for a in leaves], r, axis, slot=slot)
        saver = getattr(source.rule, "forward_stats", None)
        if saver is not None and len(outs) == 1 and not saved_tensors_hooked():  # (unpacking would run the hooks)
            call.stats = saver(outs[0], leaves)
        self._calls.append(call)
        if len(outs) == 1:
            _on_output_grad(outs[0], leaves, lambda g: self._on_grads(call, (g,)))
            return
        positions = [i for i, o in enumerate(outs) if o.requires_grad]

        def on_all(grads: tuple, call: Call = call, n: int = len(outs)) -> None:
            full: list = [None] * n
            for pos, g in zip(positions, grads, strict=True):
                full[pos] = g
            self._on_grads(call, tuple(full))

        torch.autograd.graph.register_multi_grad_hook(needs, on_all, mode="all")

    def _rows_per_example(self, source: Source, first: torch.Tensor, lay: Any) -> tuple[int, int]:
        """``(batch axis, rows per example)`` of a call; the axis is 0 unless the rule acts position by position."""
        n = self._state.n
        if isinstance(lay, Row) and n > 1:
            raise ValueError(
                f"module '{source.name}' ({type(source.module).__name__}) is called on one example's rows (a loop "
                "over the examples); call it on the whole batch, or exclude the layer with layers=..."
            )
        if not isinstance(lay, tuple) and n > 1:
            raise ValueError(
                f"module '{source.name}' ({type(source.module).__name__}): gradcoh cannot tell which rows of its "
                f"input belong to which example after the op '{lay.op}'; register a rule for the module that calls "
                "it, or exclude the layer with layers=..."
            )
        if not isinstance(lay, tuple):
            return 0, max(first.shape[0], 1)
        axis, r = lay
        if axis != 0 and not getattr(source.rule, "positionwise", False):
            raise ValueError(
                f"module '{source.name}' ({type(source.module).__name__}) takes the batch on dimension {axis} of its "
                "input; its rule needs it on dimension 0 (batch_first=True), or exclude the layer with layers=..."
            )
        return axis, r

    def _on_grads(self, call: Call, grads: tuple) -> None:
        if self._state.uses.verifying:  # the verifier's extra pass (gradcoh.logger.verify)
            return
        if not any(c is call for c in self._calls):  # its forward was consumed by an earlier backward (retain_graph)
            raise RuntimeError(
                f"layer '{self.plan.name}': a second backward pass through the same forward inside one record block "
                "(retain_graph=True) is not supported; combine the losses and call backward once"
            )
        self._state.in_backward()
        call.grads = tuple(g.detach() if g is not None and g.requires_grad else g for g in grads)  # (no op if none)
        self._maybe_ready()


def _on_output_grad(out: torch.Tensor, inputs: list[torch.Tensor], fn: Callable) -> None:
    """Call ``fn`` with the gradient of a module's output ``out``, also when an in-place op modifies it afterwards.

    A tensor hook on ``out`` fires for the version of ``out`` the backward pass reaches. When ``out`` is a view of a
    tensor made inside the module (``nn.Linear`` on 3-D input returns ``addmm(...).view(...)``), an in-place op on
    it (``ReLU(inplace=True)``, ``+=``, ``masked_fill_``) rebases the view and that hook never fires; the gradient
    with respect to the module's output then exists only where the base was made, so it is taken there (a pre-hook on
    the base's node, reshaped to ``out``), for whichever version follows.
    """
    base = out._base
    node = None if base is None else base.grad_fn
    if (node is None or base.numel() != out.numel() or not out.is_contiguous()
            or any(base is x or base is x._base for x in inputs)):
        out.register_hook(fn)
        return
    nr, shape = base.output_nr, out.shape

    def pre(grads: tuple) -> None:
        if grads[nr] is not None:
            fn(grads[nr].reshape(shape))

    node.register_prehook(pre)
