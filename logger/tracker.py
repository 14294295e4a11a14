"""Per-layer trackers: one layer's captured calls and uses → per-parameter forms → per-micro-batch statistics.

A :class:`LayerTracker` composes the layer's jobs, each in its own module: :class:`~gradcoh.logger.capture.LayerCapture`
(hooks on the modules with rules, the uses reported by the step's use tracker), :class:`~gradcoh.logger.batchgrad.
BatchGradient` (``Σ_i g_i`` from ``.grad`` or the parameters' hooks) and :class:`~gradcoh.logger.results.
LayerResults` (what the step's record reads). The tracker itself does the per-example math: a layer is processed as
soon as every call and use of it in the current forward has received its output gradient (calls still open when the
backward pass ends are processed by the end-of-backward callback, :func:`~gradcoh.logger.step.end_of_backward`).

Every source's per-example gradient is split into one form per parameter (:func:`~gradcoh.logger.grads.split_params`);
contributions to the same parameter add, with their cross terms in the squared norm. Nothing here calls ``.item()``
or copies to the host. All hook state lives in these objects, never on modules or tensors.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .arguments import map_tensors, op_name, tensors
from .batchgrad import BatchGradient
from .capture import Call, LayerCapture
from .fused import fill_slot
from .grads import (
    Dense,
    Factored,
    LayerGrad,
    MatrixView,
    ParamGrad,
    Reduced,
    added,
    as_dtype,
    bilinear,
    choose_route,
    combine,
    fold,
    form_of,
    inner,
    natural_view,
    split_params,
)
from .plan import LayerPlan, Source
from .results import LayerResults, MicroStats, dots, guard_vectors
from .sketch import Form, Projection, ProjectionTable, choose_projection
from .usegrads import use_gradients
from .uses import Use

if TYPE_CHECKING:
    from .step import StepState

_log = logging.getLogger(__name__)


class LayerTracker:
    """One layer across the recorded steps: its captures, its batch gradient, its per-example statistics.

    Args:
        plan: The layer: its parameters, the modules with rules for them, the modules observed op by op.
        seed: Seed of the sketch projections (with ``sketch_dim``).
        sketch_dim: Sketch dimension (0: none).
        projections: The run's projection table, shared by the logger's trackers (default: one of this layer's own).
    """

    def __init__(self, plan: LayerPlan, seed: int = 0, sketch_dim: int = 0,
                 projections: ProjectionTable | None = None) -> None:
        self.plan = plan
        self.name = plan.name
        self.params = plan.params
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.shapes = [tuple(p.shape) for p in self.params]
        self.size = sum(p.numel() for p in self.params)
        self.views = [MatrixView.of([tuple(p.shape) for p in s.params]) for s in plan.sources]
        self.seed, self.sketch_dim = seed, sketch_dim
        self.projections = projections if projections is not None else ProjectionTable(seed, sketch_dim)
        self.projectors: list[Projection | None] = [None] * len(self.params)  # chosen at the first sketched step
        device = self.params[0].device
        self.guard_vectors = [guard_vectors(name, shape, device) for name, shape in zip(plan.param_names, self.shapes,
                                                                                        strict=True)]
        self.capture = LayerCapture(plan, self.process)
        self.batch = BatchGradient(self.name, self.params)
        self.results = LayerResults(self.batch, self.guard_vectors, sketch_dim)
        self.reference: list[torch.Tensor] | None = None  # R per parameter (natural views) for the current step
        self._state: StepState | None = None

    # --- lifecycle ---------------------------------------------------------------------------------------
    def attach(self, state: StepState, reference: list[torch.Tensor] | None = None) -> None:
        """Install the hooks for one recorded step.

        Args:
            state: The step's state.
            reference: The reference gradient ``R`` per parameter (natural views), or None.
        """
        self._state = state
        self.reference = reference
        self.results.begin(state)
        self.capture.attach(state)
        self.batch.attach(state)

    def detach(self) -> None:
        """Remove every hook and drop captured tensors."""
        self.capture.detach()
        self.batch.detach()

    def flush_calls(self) -> None:
        """End of a backward pass: process calls and uses left open (outputs that got no gradient)."""
        if self.capture.pending:
            self.process()
        self.batch.end_of_backward()

    @property
    def kept(self) -> dict[int, tuple[float, list[list[ParamGrad]]]]:
        """Micro-batch → ``(scale, forms per parameter)`` kept for the alignment (empty once released)."""
        return {j: s.kept for j, s in self.results.stats.items() if s.kept is not None}

    def discard(self, micro: int) -> None:
        """Forget what a backward pass that reached no parameter produced for micro-batch ``micro``."""
        self.results.discard(micro)

    # --- the per-example math ----------------------------------------------------------------------------
    def process(self) -> None:
        """Turn the captured calls and uses of this micro-batch into per-example statistics and sketches."""
        calls, uses = self.capture.take()
        if not calls and not uses:
            return
        for call in calls:
            call.check_unmodified(self.name)
        if self._state.mixed is not None:
            op, where = self._state.mixed
            raise ValueError(
                f"layer '{self.name}': its output reaches the loss through the op '{op}' in '{where}', which mixes "
                "the examples along the batch axis (or gradcoh cannot follow the batch through it), so its "
                "per-example gradients cannot be split by example. Keep each example's rows to itself there, name "
                "the inputs that carry the batch with batch_inputs=..., or exclude the layer with layers=..."
            )
        with self._state.uses.paused():  # rules may run modules and ops again: none of it is observed
            per_param: list[list[ParamGrad]] = [[] for _ in self.params]
            for p, form in self._from_rules(calls) + self._from_uses(uses):
                per_param[self.index[id(p)]].append(form)
            inputs = [pair for c in calls for pair in c.versions] + [pair for u in uses for pair in u.versions] \
                if self._state.keep_forms else []  # (only the alignment reads the inputs again)
            self._add_stats(per_param, inputs)

    def _from_rules(self, calls: list[Call]) -> list[tuple[nn.Parameter, ParamGrad]]:
        """Per-parameter forms from the module rules, one combined gradient per module (over its calls)."""
        out = []
        for j, source in enumerate(self.plan.sources):
            group = [c for c in calls if c.source is source]
            if not group:
                continue
            if any(_is_half(x) for c in group for x in (*tensors(c.args, c.kwargs), *c.grads)):
                self.results.saw_half_precision()
            grad = combine([fold(self._run_rule(source, c), c.r) for c in group])
            self.results.terms += sum(g.numel() for c in group for g in c.grads if g is not None)
            if len(group) == 1 and group[0].slot is not None:  # (the projection's kind from the rule's form first)
                grad = fill_slot(grad, group[0].slot, self._weight_projector(source, grad, j))
            out += [(p, form) for p, form in zip(source.params, split_params(grad, self.views[j]), strict=True)
                    if form is not None]
        return out

    def _weight_projector(self, source: Source, grad: LayerGrad, j: int) -> Projection | None:
        """The sketch projection of a fused module's weight (its first parameter), chosen from this call's form."""
        if not self.sketch_dim:
            return None
        i = self.index[id(source.params[0])]
        return self.projector(i, [split_params(grad, self.views[j])[0]])

    def sketch_kind(self, i: int, form: Form) -> tuple[str, int] | None:
        """``(kind, k)`` of parameter ``i``'s sketch projection, for fused mode's forward; None without sketches.

        The kind it has, or, if not chosen yet, the one it will get from ``form`` (its rule's form at the first step:
        :meth:`_weight_projector`).
        """
        if not self.sketch_dim:
            return None
        if self.projectors[i] is not None:
            return self.projectors[i].kind, self.sketch_dim
        name = self.plan.param_names[i]
        kind = self.projections.kinds.get(name) or choose_projection(natural_view(self.shapes[i]), self.sketch_dim,
                                                                     [form])
        return kind, self.sketch_dim

    def _run_rule(self, source: Source, call: Call) -> LayerGrad:
        """One call's per-example gradient from its module's rule; a crash inside a rule becomes a clear refusal.

        Rules refuse what they cannot do with a ValueError that names the fix; any other exception is an internal
        failure on this model, reported with the module, the rule and the ways around it.
        """
        try:
            if call.stats is not None:  # what the forward kernel saved, batch axis first like the arguments
                stats = tuple(s.movedim(call.axis, 0) if call.axis and isinstance(s, torch.Tensor) else s
                              for s in call.stats)
                return source.rule(source.module, *_upcast(call.batch_first()), stats=stats)
            return source.rule(source.module, *_upcast(call.batch_first()))
        except ValueError:
            raise
        except Exception as err:
            rule = getattr(source.rule, "__name__", type(source.rule).__name__)
            raise RuntimeError(
                f"layer '{self.name}': the rule {rule} of module '{source.name}' ({type(source.module).__name__}) "
                f"failed on this call ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "exclude the module with layers=..., or register a rule for it with LayerRules.register"
            ) from err

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
                except ValueError:
                    raise
                except Exception as err:
                    raise RuntimeError(
                        f"layer '{self.name}': per-example gradients through the op '{op_name(use.func)}' failed "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); exclude the layer "
                        "with layers=..., or register a rule for the module that calls the op (LayerRules.register)"
                    ) from err
            self.results.saw_half_precision(_is_half(use.grads))
            self.results.terms += use.grads.numel()
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

    def _add_stats(self, per_param: list[list[ParamGrad]], inputs: list[tuple[torch.Tensor, int]]) -> None:
        """The micro-batch's statistics from each parameter's forms, scaled to per-example values.

        ``inputs``: ``(tensor, version)`` of the layer's inputs when the forms are kept (alignment): checked again then.
        """
        state = self._state
        scale, n = state.scale(), state.n
        weights = state.weights(torch.float32)
        sq, guard, sketch = [], [], []
        sums, routed = [], []
        check = self.results.checked or state.truth is not None  # verified steps check every layer
        for i, forms in enumerate(per_param):
            forms = [choose_route(f, self.projector(i, forms)) for f in forms]
            routed.append(forms)
            self._param_stats(i, forms, n, check, (sq, guard, sketch))
            if weights is not None:
                sums.append(self._group_sums(i, forms, weights))
        device = self.params[0].device
        sq, guard, sketch = added(sq), added(guard), added(sketch)
        sq = torch.zeros(n, device=device) if sq is None else sq
        guard = torch.zeros(n, device=device) if guard is None and check else guard  # (unchecked: not stored)
        if self.sketch_dim and sketch is None:
            sketch = torch.zeros(n, self.sketch_dim, device=device)
        if state.keep_forms:  # (the alignment reads kept forms later: materialise what was only reduced)
            routed = [[Dense(*f.blocks) if isinstance(f, Reduced) else f for f in fs] for fs in routed]
        stats = MicroStats(
            sq=_scaled(sq, scale**2), guard=_scaled(guard, scale) if check else None,
            sketch=_scaled(sketch, scale) if self.sketch_dim else None,
            ref_dots=None if self.reference is None else dots(routed, self.reference, n, device) * scale,
            kept=(scale, routed) if state.keep_forms else None,  # for the alignment with the batch sum, known later
            kept_inputs=[] if all(isinstance(f, Dense) for fs in routed for f in fs) else inputs,  # (copies read none)
        )
        block = None if weights is None else torch.cat(sums, 1).to(state.acc_dtype) * scale
        self.results.add(state.micro, stats, block)

    def _param_stats(self, i: int, forms: list[ParamGrad], n: int, check: bool,
                     out: tuple[list, list, list]) -> None:
        """Append one parameter's squared norms, cross terms, guard values (``check``) and sketches to ``out``.

        ``out`` holds three lists the caller sums: ``[n]`` squared norms and ``2⟨A_i, B_i⟩`` cross terms of the
        parameter's forms, ``[n]`` guard values, ``[n, k]`` sketches.
        """
        sq, guard, sketch = out
        left, right = self.guard_vectors[i]
        for a, fa in enumerate(forms):
            if fa.n != n:
                raise ValueError(
                    f"layer '{self.name}' saw {fa.n} rows but the micro-batch has {n} examples; per-example "
                    "gradients need the batch on dimension 0 of every tracked layer's input"
                )
            sq.append(as_dtype(fa.sq_norms(self._state.grams), torch.float32))
            sq += [2 * as_dtype(inner(fa, fb), torch.float32) for fb in forms[a + 1 :]]
            if check:
                value = bilinear(fa, left, right)  # float64 parameters keep float64: the tolerance is theirs
                guard.append(as_dtype(value, torch.promote_types(value.dtype, torch.float32)))
            if self.sketch_dim:
                sketch.append(fa.sketch(self.projectors[i]))

    def _group_sums(self, i: int, forms: list[ParamGrad], weights: torch.Tensor) -> torch.Tensor:
        """``[G-1, numel]`` weighted sums of one parameter's per-example gradients."""
        total = torch.zeros(weights.shape[1], *natural_view(self.shapes[i]), device=weights.device)
        for f in forms:
            total = total + f.group_sums(weights)
        return total.reshape(weights.shape[1], -1)

    def project(self) -> torch.Tensor:
        """``[k]`` sketch of the gradient held in the parameters' ``.grad`` (sum of the per-parameter projections)."""
        out = None
        for i, (p, shape) in enumerate(zip(self.params, self.shapes, strict=True)):
            proj = self.projector(i, [])
            g = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            s = proj.dense(g.to(torch.float32).reshape(1, *natural_view(shape)))[0]
            out = s if out is None else out + s
        return out


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    return t if factor == 1.0 else t * factor


def _is_half(x: Any) -> bool:
    return torch.is_tensor(x) and x.dtype in (torch.float16, torch.bfloat16)


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


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
