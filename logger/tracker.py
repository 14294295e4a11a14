"""Per-layer trackers and the per-step state they fill: all hook state lives here, never on modules or tensors.

Each tracked layer gets, while a step is being recorded, one forward hook per module with a rule for its parameters
(capturing the call's inputs and putting a tensor hook on its outputs), the uses of its parameters reported by the
step's :class:`~gradcoh.logger.uses.UseTracker`, and one tensor hook per trainable parameter (capturing the batch
gradient of this backward). Tensor hooks on outputs, unlike ``register_full_backward_hook``, work with in-place
operations that follow the module (ResNet's ``out += identity``, ``ReLU(inplace=True)``). A layer is processed as
soon as every call and use of it in the current forward has received its output gradient; calls still open when
the backward pass ends are processed by an end-of-backward callback.

Every source's per-example gradient is split into one form per parameter (:func:`~gradcoh.logger.grads.split_params`);
contributions to the same parameter add, with their cross terms in the squared norm. Nothing here calls ``.item()``
or copies to the host.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from .arguments import map_tensors, tensors
from .fused import Slot
from .grads import (
    Dense,
    Factored,
    LayerGrad,
    MatrixView,
    ParamGrad,
    choose_route,
    combine,
    dot,
    fits,
    fold,
    form_of,
    inner,
    natural_view,
    probe,
    split_params,
)
from .layout import Row
from .plan import LayerPlan, Source
from .sketch import Projection, ProjectionTable
from .uses import Use, UseTracker, use_gradients

_log = logging.getLogger(__name__)


@dataclass
class StepState:
    """What one ``record`` block accumulates across its forward/backward passes (micro-batches).

    Attributes:
        n_groups: Number of groups ``G``.
        scale_by_batch: True for ``loss_reduction="mean"``: per-example gradients are ``n ×`` the batch terms.
        uses: The use tracker of this step (data layouts, derived tensors, parameter uses).
        acc_dtype: Type of the batch- and group-sum accumulators: float32 for the batch stream, float64 for probes.
        from_grad: Every tracked ``.grad`` was None when the step began, so the batch sums are read from ``.grad``
            at the end (no copy); parameter hooks only start accumulating if a second backward pass comes.
        params_reached: The running backward pass reached a parameter (False for e.g. ``autograd.grad`` with
            respect to the inputs only: such a pass is not a micro-batch and is discarded).
        group: ``[n_total]`` group of each example on the model's device, or None.
        sizes: Examples in each completed or current micro-batch.
        micro: Index of the current micro-batch (advanced at the end of each backward pass).
        callback_queued: Whether the end-of-backward callback is queued for the running backward pass.
        losses: Per-example losses passed to ``Recording.loss``.
        meta_parts: Per-micro-batch metadata passed to ``Recording.examples`` (key -> list over micro-batches).
        loss_scale: The factor the backward loss was multiplied by (a loss scaler's), divided out when storing.
        device: The model's device (for group ids given per micro-batch).
        trackers: The layer trackers filling this state.
        keep_forms: Keep each layer's per-example gradients (factors) until the end of the step, for their inner
            products with the batch sum, known only then (``alignment=True``).
        observed: Micro-batch -> the weight each example's loss term carries in the backward loss, read from the
            backward pass when per-example losses are given (``rec.loss``); it replaces ``scale_by_batch``.
        declared: The ``loss_reduction`` the user declared (None: not declared), checked against ``observed``.
        on_loss: Called with the per-example losses given to ``rec.loss`` (the verifier and the weights).
        truth: The verifier's captured example gradient (:class:`~gradcoh.logger.verify.Truth`), or None.
        mixed: ``(op, module)`` of an op that mixes the examples along the batch axis and that the running backward
            pass went through: the per-example gradients of the layers before it cannot be split by example.
    """

    n_groups: int
    scale_by_batch: bool
    uses: UseTracker
    acc_dtype: torch.dtype = torch.float32
    from_grad: bool = False
    params_reached: bool = False
    group: torch.Tensor | None = None
    sizes: list[int] = field(default_factory=list)
    micro: int = 0
    callback_queued: bool = False
    losses: list[torch.Tensor] = field(default_factory=list)
    meta_parts: dict[str, list] = field(default_factory=dict)
    loss_scale: float = 1.0
    device: torch.device | None = None
    trackers: list[LayerTracker] = field(default_factory=list)
    keep_forms: bool = False
    mixed: tuple[str, str] | None = None
    observed: dict[int, float] = field(default_factory=dict)
    declared: str | None = None
    on_loss: Any = None
    truth: Any = None

    def batch_size(self, n: int) -> int:
        """Register a forward with ``n`` examples in the current micro-batch; returns the micro-batch size."""
        if len(self.sizes) <= self.micro:
            self.sizes.append(n)
        return self.sizes[self.micro]

    @property
    def n(self) -> int:
        """Examples in the current micro-batch."""
        return self.sizes[self.micro]

    def scale(self, micro: int | None = None) -> float:
        """Factor from the batch loss's terms to each example's own loss (current micro-batch by default)."""
        micro = self.micro if micro is None else micro
        if micro in self.observed:
            return self.loss_scale / self.observed[micro]
        return float(self.sizes[micro]) if self.scale_by_batch else 1.0

    def observe(self, micro: int, grad: torch.Tensor) -> None:
        """The gradient reaching the per-example losses of micro-batch ``micro``: each term's weight in the loss.

        Raises:
            ValueError: The weights differ between examples, or contradict the declared ``loss_reduction``.
        """
        w = grad.detach().reshape(-1).to(torch.float64)
        first = float(w[0])
        if first == 0.0 or not bool(((w - first).abs() <= 1e-5 * abs(first)).all()):
            raise ValueError(
                "the examples' loss terms carry different weights in the loss (or zero weight); gradcoh stores each "
                "example's own term and needs one common weight (a mean or a sum over the examples, any scale)"
            )
        self.observed[micro] = first
        if self.declared is not None:
            n = w.shape[0]
            expect = self.loss_scale / n if self.declared == "mean" else self.loss_scale
            if abs(first - expect) > 1e-5 * abs(expect):
                raise ValueError(
                    f"loss_reduction='{self.declared}' was declared but each example's loss term carries the weight "
                    f"{first:.6g} in the loss ({expect:.6g} expected for {n} examples). With rec.loss(losses) the "
                    "weights are read from the backward pass: drop loss_reduction, or make the loss match it"
                )

    def weights(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``[n, G-1]`` one-hot group weights of the current micro-batch (the last group is implied)."""
        if self.n_groups == 1:
            return None
        if self.group is None:
            raise ValueError("groups were declared, so record(..., group=...) must give every example's group")
        start = sum(self.sizes[: self.micro])
        g = self.group[start : start + self.sizes[self.micro]]
        ids = torch.arange(self.n_groups - 1, device=g.device)
        return (g.unsqueeze(1) == ids).to(dtype)


@dataclass(eq=False)
class _Call:
    source: Source
    args: tuple
    kwargs: dict
    versions: list[tuple[torch.Tensor, int]]
    r: int
    axis: int = 0  # the batch axis of the call's inputs and outputs (moved to the front for the rule)
    grads: tuple | None = None
    slot: Slot | None = None  # fused mode: where the batch weight gradient goes


class LayerTracker:
    """Owns the hooks and per-step results of one layer.

    Args:
        plan: The layer: its parameters, the modules with rules for them, the modules observed op by op.
        seed: Seed of the sketch projections (with ``sketch_dim``).
        sketch_dim: Sketch dimension (0: none).
    """

    def __init__(self, plan: LayerPlan, seed: int = 0, sketch_dim: int = 0) -> None:
        self.plan = plan
        self.name = plan.name
        self.params = plan.params
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.shapes = [tuple(p.shape) for p in self.params]
        self.size = sum(p.numel() for p in self.params)
        self.views = [MatrixView.of([tuple(p.shape) for p in s.params]) for s in plan.sources]
        device = self.params[0].device
        self.seed, self.sketch_dim = seed, sketch_dim
        self.projections = ProjectionTable(seed, sketch_dim)  # the logger shares one table between its trackers
        self.reference: list[torch.Tensor] | None = None  # R per parameter (natural views), set per step by the logger
        self.projectors: list[Projection | None] = [None] * len(self.params)  # chosen at the first sketched step
        self.tests = [_rank_one(name, shape, device) for name, shape in zip(plan.param_names, self.shapes,
                                                                              strict=True)]
        self._handles: list[RemovableHandle] = []
        self._state: StepState | None = None
        self._calls: list[_Call] = []
        self._uses: list[Use] = []
        self._busy = False  # True while a rule runs (a rule may call the module's forward again)
        self._grad_versions: list[int | None] = []
        self.reset()

    # --- lifecycle ---------------------------------------------------------------------------------------
    def attach(self, state: StepState) -> None:
        """Install the hooks for one recorded step."""
        self._state = state
        self.reset()
        for source in self.plan.sources:
            self._handles.append(source.module.register_forward_hook(
                lambda m, a, k, o, source=source: self._forward_hook(source, a, k, o), with_kwargs=True))
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(lambda g, i=i: self._param_hook(i, g)))

    def detach(self) -> None:
        """Remove every hook and drop captured tensors."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._calls = []
        self._uses = []

    def reset(self) -> None:
        """Forget the previous step's results."""
        self.sq: dict[int, torch.Tensor] = {}  # micro-batch -> [n]
        self.sketch: dict[int, torch.Tensor] = {}  # micro-batch -> [n, k]
        self.checks: dict[int, torch.Tensor] = {}  # micro-batch -> [n] guard probes
        self.group_sums: torch.Tensor | None = None  # running [G-1, P] in acc_dtype
        self.batch_grads: list[torch.Tensor | None] = [None] * len(self.params)  # scaled, acc_dtype
        self.seen: list[torch.Tensor | None] = [None] * len(self.params)  # gradients of micro-batch 0 (from_grad)
        self.low_precision = False  # half-precision activations or gradients (autocast): a looser guard
        self.gap = torch.zeros(())  # |Σ g_i − .grad| over the guard's tolerance (> 1: not reconciled)
        self.terms = 0  # entries of the output gradients summed into the batch gradient (the guard's rounding)
        self.kept: dict[int, tuple[float, list[list[ParamGrad]]]] = {}  # micro-batch -> (scale, forms per param)
        self.ref_dots: dict[int, torch.Tensor] = {}  # micro-batch -> [n] float64 g_i · R

    # --- hooks -------------------------------------------------------------------------------------------
    def _forward_hook(self, source: Source, args: tuple, kwargs: dict, output: Any) -> None:
        if self._busy:
            return
        outs = [output] if isinstance(output, torch.Tensor) else \
            [o for o in pytree.tree_leaves(output) if torch.is_tensor(o)]
        needs = [o for o in outs if o.requires_grad]
        if not needs:
            return  # no gradient will flow (no_grad, frozen): nothing to record
        state = self._state
        uses = state.uses
        leaves = tensors(args, kwargs)
        lay = next((uses.layout(a) for a in leaves if uses.layout(a) is not None), None)
        if lay is None:
            return  # no batch in the inputs (a lookup on arange(T)): a derived tensor, followed by its uses
        first = next(a for a in leaves if uses.layout(a) is not None)
        custom = getattr(source.rule, "rows_per_example", None)  # rules that check the batch axis themselves
        axis, r = (0, custom(source.module, args, kwargs, lay, state.n)) if custom else \
            self._rows_per_example(source, first, lay)
        detached = map_tensors(args, kwargs, torch.Tensor.detach)
        versions = [(a, a._version) for a in leaves]
        slot = state.uses.slots.get(output) if isinstance(output, torch.Tensor) else None
        call = _Call(source, detached[0], detached[1], versions, r, axis, slot=slot)
        self._calls.append(call)
        if len(outs) == 1:
            uses.paused += 1  # reading ._base is not an op of the model
            try:
                _on_output_grad(outs[0], leaves, lambda g: self._on_grads(call, (g,)))
            finally:
                uses.paused -= 1
        else:
            positions = [i for i, o in enumerate(outs) if o.requires_grad]

            def on_all(grads: tuple, call: _Call = call, n: int = len(outs)) -> None:
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

    def add_use(self, use: Use) -> None:
        """A use of this layer's parameters outside their modules' rules (reported by the use tracker)."""
        self._uses.append(use)

    def on_use_grad(self) -> None:
        """The output gradient of one of this layer's uses has arrived."""
        self._queue_end_of_backward()
        self.maybe_process()

    def _on_grads(self, call: _Call, grads: tuple) -> None:
        if self._state.uses.verifying:
            return
        if not any(c is call for c in self._calls):  # its forward was consumed by an earlier backward (retain_graph)
            raise RuntimeError(
                f"layer '{self.name}': a second backward pass through the same forward inside one record block "
                "(retain_graph=True) is not supported; combine the losses and call backward once"
            )
        self._queue_end_of_backward()
        call.grads = tuple(None if g is None else g.detach() for g in grads)
        self.maybe_process()

    def maybe_process(self) -> None:
        """Process the micro-batch once every call and use of this layer has its output gradient."""
        if (self._calls or self._uses) and all(c.grads is not None for c in self._calls) and all(
                u.grads is not None for u in self._uses):
            self._queue_end_of_backward()
            self.process()

    def _param_hook(self, i: int, grad: torch.Tensor) -> None:
        state = self._state
        if state.uses.verifying:
            return
        state.params_reached = True
        self._queue_end_of_backward()
        if state.from_grad:
            if state.micro == 0:
                # .grad will hold exactly this backward's gradient; keep a reference (no copy) in case the pass
                # was torch.autograd.grad, which leaves .grad alone
                self.seen[i] = grad.detach()
                return
            if self.batch_grads[i] is None:  # a second backward: .grad holds micro-batch 0's gradient (so far)
                held = self._first_grad(i)
                self.batch_grads[i] = (torch.zeros_like(grad, dtype=state.acc_dtype) if held is None
                                       else held.to(state.acc_dtype) * state.scale(0))
            self.batch_grads[i] = self.batch_grads[i] + grad.detach().to(state.acc_dtype) * state.scale()
            return
        g = grad.detach().to(state.acc_dtype, copy=True)  # never alias autograd's tensor (it may become .grad)
        scale = state.scale()
        if scale != 1.0:
            g *= scale
        self.batch_grads[i] = g if self.batch_grads[i] is None else self.batch_grads[i] + g

    def _first_grad(self, i: int) -> torch.Tensor | None:
        p = self.params[i]
        return p.grad.detach() if p.grad is not None else self.seen[i]

    def _queue_end_of_backward(self) -> None:
        state = self._state
        if not state.callback_queued:
            state.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_callback)

    def _end_callback(self) -> None:
        end_of_backward(self._state)

    # --- computation -------------------------------------------------------------------------------------
    def process(self) -> None:
        """Turn the captured calls and uses of this micro-batch into per-example statistics and sketches."""
        calls, self._calls = [c for c in self._calls if c.grads is not None], []
        uses, self._uses = [u for u in self._uses if u.grads is not None], []
        if not calls and not uses:
            return
        self._check_unmodified(calls)
        state = self._state
        if state.mixed is not None:
            op, where = state.mixed
            raise ValueError(
                f"layer '{self.name}': its output reaches the loss through the op '{op}' in '{where}', which mixes "
                "the examples along the batch axis (or gradcoh cannot follow the batch through it), so its "
                "per-example gradients cannot be split by example. Keep each example's rows to itself there, name "
                "the inputs that carry the batch with batch_inputs=..., or exclude the layer with layers=..."
            )
        self._busy = True
        state.uses.paused += 1
        try:
            per_param: list[list[ParamGrad]] = [[] for _ in self.params]
            for p, form in self._from_rules(calls) + self._from_uses(uses):
                per_param[self.index[id(p)]].append(form)
            self._reduce(per_param)
        finally:
            self._busy = False
            state.uses.paused -= 1

    def _check_unmodified(self, calls: list[_Call]) -> None:
        for c in calls:
            if any(tensor._version != version for tensor, version in c.versions):
                raise RuntimeError(
                    f"an input of layer '{self.name}' was modified in place after its forward; "
                    "per-example gradients need the original input (avoid the in-place op on it)"
                )

    def _from_rules(self, calls: list[_Call]) -> list[tuple[nn.Parameter, ParamGrad]]:
        """Per-parameter forms from the module rules, one combined gradient per module (over its calls)."""
        out = []
        for j, source in enumerate(self.plan.sources):
            group = [c for c in calls if c.source is source]
            if not group:
                continue
            if any(_is_half(x) for c in group for x in (*tensors(c.args, c.kwargs), *c.grads)):
                self.low_precision = True
            grad = combine([fold(source.rule(source.module, *_upcast(_batch_first(c))), c.r)
                            for c in group])
            self.terms += sum(g.numel() for c in group for g in c.grads if g is not None)
            if len(group) == 1 and group[0].slot is not None:
                grad = _fill_slot(grad, group[0].slot)
            out += [(p, form) for p, form in zip(source.params, split_params(grad, self.views[j]), strict=True)
                    if form is not None]
        return out

    def _from_uses(self, uses: list[Use]) -> list[tuple[nn.Parameter, ParamGrad]]:
        """Per-parameter forms of this layer from direct uses of its parameters (computed once per use)."""
        state = self._state
        out = []
        for use in uses:
            if use.results is None:
                try:
                    use.results = use_gradients(use, state.uses, state.n)
                except RuntimeError as err:
                    raise RuntimeError(f"layer '{self.name}': {err}") from err
            self.low_precision |= _is_half(use.grads)
            self.terms += use.grads.numel()
            out += [(p, _upcast(form)) for p, form in use.results if id(p) in self.index]
        return out

    def projector(self, i: int, forms: list[ParamGrad]) -> Projection | None:
        """Parameter ``i``'s sketch projection (None without sketches), chosen from ``forms`` the first time.

        The choice (:func:`~gradcoh.logger.sketch.choose_projection`) depends only on shapes, so every process and
        every restart of a run with the same shapes makes the same one; it is kept for the rest of the run.
        """
        if not self.sketch_dim:
            return None
        if self.projectors[i] is None:
            name = self.plan.param_names[i]
            self.projectors[i] = self.projections.get(name, natural_view(self.shapes[i]), [form_of(f) for f in forms],
                                                      self.params[i].device)
            _log.info("sketch of %s: %s", name, self.projectors[i].kind)
        return self.projectors[i]

    def _reduce(self, per_param: list[list[ParamGrad]]) -> None:
        state = self._state
        scale = state.scale()
        n = state.n
        device = self.params[0].device
        sq = torch.zeros(n, device=device)
        checks = torch.zeros(n, device=device)
        sketch = torch.zeros(n, self.sketch_dim, device=device) if self.sketch_dim else None
        weights = state.weights(torch.float32)
        sums, routed = [], []
        for i, forms in enumerate(per_param):
            forms = [choose_route(f, self.projector(i, forms)) for f in forms]
            routed.append(forms)
            sq_i, checks_i, sketch_i = self._reduce_param(i, forms, n)
            sq, checks = sq + sq_i, checks + checks_i
            if sketch is not None:
                sketch = sketch + sketch_i
            if weights is not None:
                sums.append(self._group_sums(i, forms, weights))
        self.sq[state.micro] = sq * scale**2
        self.checks[state.micro] = checks * scale
        if state.keep_forms:
            self.kept[state.micro] = (scale, routed)
        if self.reference is not None:  # R is known before the step: no form needs keeping for it
            self.ref_dots[state.micro] = _dots(routed, self.reference, n, device) * scale
        if sketch is not None:
            self.sketch[state.micro] = sketch * scale
        if weights is not None:
            block = torch.cat(sums, 1).to(state.acc_dtype) * scale
            self.group_sums = block if self.group_sums is None else self.group_sums + block

    def _reduce_param(self, i: int, forms: list[ParamGrad], n: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One parameter's ``[n]`` squared norms (with the cross terms between its forms), guard probes, sketch."""
        sq, checks, sketch = 0, 0, 0
        left, right = self.tests[i]
        for a, fa in enumerate(forms):
            if fa.n != n:
                raise ValueError(
                    f"layer '{self.name}' saw {fa.n} rows but the micro-batch has {n} examples; per-example "
                    "gradients need the batch on dimension 0 of every tracked layer's input"
                )
            sq = sq + fa.sq_norms().float() + sum(2 * inner(fa, fb).float() for fb in forms[a + 1 :])
            checks = checks + probe(fa, left, right).float()
            if self.sketch_dim:
                sketch = sketch + fa.sketch(self.projectors[i])
        return sq, checks, sketch

    def _group_sums(self, i: int, forms: list[ParamGrad], weights: torch.Tensor) -> torch.Tensor:
        """``[G-1, numel]`` weighted sums of one parameter's per-example gradients."""
        total = torch.zeros(weights.shape[1], *natural_view(self.shapes[i]), device=weights.device)
        for f in forms:
            total = total + f.group_sums(weights)
        return total.reshape(weights.shape[1], -1)

    def discard(self, micro: int) -> None:
        """Forget what a backward pass that reached no parameter produced for micro-batch ``micro``."""
        for results in (self.sq, self.sketch, self.checks, self.kept, self.ref_dots):
            results.pop(micro, None)

    def flush_calls(self) -> None:
        """Process calls and uses left open when the backward pass ended (outputs that got no gradient)."""
        if self._calls or self._uses:
            self.process()
        if self._state.from_grad:  # to detect in-place changes of .grad before the step ends
            self._grad_versions = [None if p.grad is None else p.grad._version for p in self.params]

    # --- results -----------------------------------------------------------------------------------------
    def _param_sum(self, i: int) -> tuple[torch.Tensor, float]:
        """One parameter's Σ_i g_i as ``(tensor, scale)``: the sum is ``scale · tensor`` (avoids a scaled copy)."""
        p, acc = self.params[i], self.batch_grads[i]
        if acc is not None:
            return acc, 1.0
        if self._state.from_grad and p.grad is not None:
            if p.grad._version != self._grad_versions[i]:
                raise RuntimeError(
                    f"the .grad of layer '{self.name}' was modified in place inside the record block (e.g. gradient "
                    "clipping); do that after the block, which should hold only the forward and backward passes"
                )
            return p.grad.detach(), self._state.scale(0)
        if self._state.from_grad and self.seen[i] is not None:  # torch.autograd.grad: .grad stayed None
            return self.seen[i], self._state.scale(0)
        return torch.zeros(p.shape, dtype=self._state.acc_dtype, device=p.device), 1.0

    def batch_sum(self) -> list[torch.Tensor]:
        """Each parameter's ``Σ_i g_i`` of this step (this process), in its natural view."""
        out = []
        for i, shape in enumerate(self.shapes):
            t, scale = self._param_sum(i)
            m = t.reshape(natural_view(shape))
            out.append(m * scale if scale != 1.0 else m)
        return out

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A ``[P]`` vector in parameter order (as :meth:`group_sum_matrix` lays it out) as natural views."""
        views = [natural_view(s) for s in self.shapes]
        parts = flat.split([rows * cols for rows, cols in views])
        return [p.reshape(view) for p, view in zip(parts, views, strict=True)]

    def alignment(self, total: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        """``[n]`` float64 inner products ``g_i · G`` with the batch sum ``G``.

        ``total`` holds ``G`` per parameter (natural views); the forms kept during the step (``keep_forms``) are
        used, then dropped. Zeros where the layer was unused.
        """
        device = self.params[0].device
        parts = []
        for j, n in enumerate(sizes):
            scale, per_param = self.kept.get(j, (1.0, [[] for _ in self.params]))
            parts.append(_dots(per_param, total, n, device) * scale)
        self.drop_forms()
        return torch.cat(parts)

    def ref_alignment(self, sizes: list[int]) -> torch.Tensor:
        """``[n]`` float64 inner products ``g_i · R`` with the reference gradient (zeros where unused)."""
        device = self.params[0].device
        return torch.cat([self.ref_dots.get(j, torch.zeros(n, dtype=torch.float64, device=device))
                          for j, n in enumerate(sizes)])

    def drop_forms(self) -> None:
        """Release the kept per-example forms (they hold the layer's activations)."""
        self.kept = {}

    def gram(self, n_groups: int) -> torch.Tensor:
        """``[G, G]`` float64 Gram matrix of the group sums (one process)."""
        if n_groups == 1:  # ‖Σ_i g_i‖² parameter by parameter: no scaled copy
            total = sum(scale**2 * torch.dot(t.reshape(-1), t.reshape(-1)).to(torch.float64)
                        for t, scale in map(self._param_sum, range(len(self.params))))
            return total.reshape(1, 1)
        sums = self.group_sum_matrix(n_groups)
        return (sums @ sums.T).to(torch.float64)

    def reconciled(self) -> torch.Tensor:
        """Whether the per-example gradients sum to the batch gradient the parameters received (0-d bool).

        Compares ``Σ_i aᵀ g_i b`` with ``aᵀ (Σ_i g_i) b`` for a random rank-one test matrix ``a bᵀ`` per parameter
        (one matrix-vector product per parameter, no copy), up to the rounding of the accumulation. A gradient the
        per-example values miss, ``D ≠ 0``, goes unnoticed only if ``|aᵀ D b|`` falls within that rounding: for
        Gaussian ``a, b`` that has probability of order the tolerance times the ratio of the scales.
        """
        got = torch.cat(list(self.checks.values())) if self.checks else None
        want = None
        for i in range(len(self.params)):
            t, scale = self._param_sum(i)
            left, right = self.tests[i]
            m = t.reshape(natural_view(self.shapes[i]))
            v = torch.dot(torch.mv(m, right.to(m.dtype)), left.to(m.dtype)) * scale
            want = v if want is None else want + v
        want = want.to(torch.float64)
        total = got.double().sum(0) if got is not None else torch.zeros_like(want)
        spread = got.double().abs().sum(0) if got is not None else torch.zeros_like(want)
        self.gap = (total - want).abs() / (self.tolerance() * self._magnitude(spread + want.abs()) + 1e-30)
        return (self.gap <= 1).all()

    def tolerance(self) -> float:
        """The guard's tolerance relative to :meth:`_magnitude`: the float rounding of the sums it compares.

        Both sides are sums of the same ``K`` products (``K``: the entries of the output gradients the layer's
        batch gradient accumulates) in different orders, in the parameters' precision (unit roundoff ``u``), so they
        differ by about ``u·√K`` times the magnitude of the compared values (random-walk rounding); ``GUARD_MARGIN``
        covers the spread of that estimate. Half-precision layers (autocast) use a fixed 5e-2.
        """
        if self.low_precision or self.params[0].dtype in (torch.float16, torch.bfloat16):
            return 5e-2
        u = torch.finfo(self.params[0].dtype).eps / 2
        return GUARD_MARGIN * u * max(self.terms, 1) ** 0.5

    def _magnitude(self, spread: torch.Tensor) -> torch.Tensor:
        """Scale of the probes' rounding.

        ``√Σᵢ‖gᵢ‖²`` (a Gaussian probe of ``g`` has standard deviation ``‖g‖``), plus ``spread/√K`` for per-example
        sums that cancel (``spread``: ``Σᵢ|aᵀgᵢb| + |aᵀGb|``).
        """
        sq = torch.cat(list(self.sq.values())).double().sum() if self.sq else torch.zeros((), dtype=torch.float64)
        half = self.low_precision or self.params[0].dtype in (torch.float16, torch.bfloat16)
        if half:  # the former relative guard: the sums' own magnitude
            return spread
        return sq.to(spread.device).sqrt() + spread / max(self.terms, 1) ** 0.5

    def per_example(self, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[n]`` squared norms and ``[n, k]`` sketches over all micro-batches (zeros where the layer was unused)."""
        device = self.params[0].device
        sq = [self.sq.get(j, torch.zeros(n, device=device)) for j, n in enumerate(sizes)]
        if not self.sketch_dim:
            return torch.cat(sq), None
        k = self.sketch_dim
        sk = [self.sketch.get(j, torch.zeros(n, k, device=device)) for j, n in enumerate(sizes)]
        return torch.cat(sq), torch.cat(sk)

    def group_sum_matrix(self, n_groups: int) -> torch.Tensor:
        """``[G, P]`` group sums ``Σ_{i∈g} g_i`` (parameters flattened in order); the last: total minus the rest."""
        parts = []
        for i in range(len(self.params)):
            t, scale = self._param_sum(i)
            parts.append(t.reshape(-1) * scale if scale != 1.0 else t.reshape(-1))
        total = torch.cat(parts).reshape(1, -1)
        if n_groups == 1:
            return total
        if self.group_sums is None:
            sums = torch.zeros(n_groups - 1, total.shape[1], dtype=total.dtype, device=total.device)
        else:
            sums = self.group_sums.to(total.dtype)
        last = total - sums.sum(0, keepdim=True)
        group = self._state.group[: sum(self._state.sizes)]
        present = (group == n_groups - 1).any().to(total.dtype)  # an empty group's sum is exactly 0, not rounding
        return torch.cat([sums, last * present])

    def project(self) -> torch.Tensor:
        """``[k]`` sketch of the gradient held in the parameters' ``.grad`` (sum of the per-parameter projections)."""
        out = None
        for i, (p, shape) in enumerate(zip(self.params, self.shapes, strict=True)):
            proj = self.projector(i, [])
            g = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            s = proj.dense(g.to(torch.float32).reshape(1, *natural_view(shape)))[0]
            out = s if out is None else out + s
        return out


def _on_output_grad(out: torch.Tensor, inputs: list[torch.Tensor], fn: Any) -> None:
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


def _fill_slot(grad: LayerGrad, slot: Slot) -> LayerGrad:
    """Fused mode: materialise a Linear call's per-example gradients and leave their sum for its backward.

    Left to autograd's own GEMM (slot empty) when the block would exceed ``MATERIALISE_BYTES``.
    """
    if not isinstance(grad, Factored) or grad.u is None or not fits(grad.n, grad.n_rows, grad.n_cols,
                                                                     grad.v.element_size()):
        return grad
    dense = grad.materialise()
    slot.weight_grad = dense.blocks[0].sum(0)  # [out, in]: Σ_n G_n, the batch weight gradient
    return dense


def _dots(per_param: list[list[ParamGrad]], against: list[torch.Tensor], n: int,
          device: torch.device) -> torch.Tensor:
    """``[n]`` float64 ``Σ_params Σ_forms ⟨form_i, against[param]⟩`` (forms in the parameters' natural views)."""
    total = torch.zeros(n, dtype=torch.float64, device=device)
    for forms, m in zip(per_param, against, strict=True):
        for f in forms:
            total += dot(f, m).to(torch.float64)
    return total


GUARD_MARGIN = 6.0
"""Factor over the random-walk rounding estimate ``u·√K`` in the guard's tolerance (measured: see tolerance())."""


def _is_half(x: Any) -> bool:
    return torch.is_tensor(x) and x.dtype in (torch.float16, torch.bfloat16)


def _rank_one(name: str, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded Gaussian test vectors ``([rows], [cols])`` of one parameter for the reconciliation guard."""
    rows, cols = natural_view(shape)
    seed = int.from_bytes(hashlib.sha256(f"gradcoh-guard/{name}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, generator=gen).to(device), torch.randn(cols, generator=gen).to(device)


def _upcast(tree: Any) -> Any:
    """Half-precision tensors (autocast, bf16 models) as float32; other tensors and objects unchanged.

    ``tree`` is a per-example form, or ``(args, kwargs, grads)`` of a module call.
    """
    if isinstance(tree, Dense):
        return Dense(*(_float(b) for b in tree.blocks))
    if isinstance(tree, Factored):
        return replace(tree, u=None if tree.u is None else _float(tree.u), v=_float(tree.v))
    if not isinstance(tree, tuple):
        return tree
    args, kwargs, grads = tree
    return (*map_tensors(args, kwargs, _float), tuple(None if g is None else _float(g) for g in grads))


def _batch_first(call: _Call) -> tuple[tuple, dict, tuple]:
    """``(args, kwargs, grads)`` of a call with the batch axis moved to the front (position-wise rules only)."""
    if call.axis == 0:
        return call.args, call.kwargs, call.grads
    args, kwargs = map_tensors(call.args, call.kwargs, lambda t: t.movedim(call.axis, 0) if t.dim() > call.axis else t)
    return args, kwargs, tuple(None if g is None else g.movedim(call.axis, 0) for g in call.grads)


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def end_of_backward(state: StepState | None) -> None:
    """Close the current micro-batch: process open calls of every tracker, then advance the micro-batch index."""
    if state is None or not state.callback_queued:
        return
    for tracker in state.trackers:
        tracker.flush_calls()
    state.callback_queued = False
    if not state.params_reached:  # gradients of inputs only: nothing of it reaches the parameters
        for tracker in state.trackers:
            tracker.discard(state.micro)
        del state.sizes[state.micro :]
        state.uses.reset()
        return
    state.params_reached = False
    state.uses.reset()
    state.micro += 1


