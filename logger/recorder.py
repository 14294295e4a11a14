"""One recorded step: the hooks and the use tracker that live exactly as long as a ``record`` block.

:class:`StepRecorder` owns the micro-batch lifecycle: it creates the step's state and
:class:`~gradcoh.logger.uses.UseTracker`, attaches the layer trackers, tells the use tracker where each model call
starts (its batch) and which rule-owning module is running, routes every parameter use to the layers it concerns,
and removes everything when the block ends.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .fused import FusedLevel, fusable_weights
from .sketch import Form
from .step import StepState, end_of_backward
from .tracker import LayerTracker
from .uses import Use, UseTracker


class Recording:
    """What ``GradientLogger.record`` yields: per-example losses and metadata in, the step's summary out."""

    def __init__(self, state: StepState | None) -> None:
        self._state = state
        self._summary: dict[str, float] | None = None

    @property
    def active(self) -> bool:
        """True when this step is being logged."""
        return self._state is not None

    def loss(self, values: torch.Tensor) -> None:
        """Record per-example losses ``[n]`` of the current micro-batch (call once per forward)."""
        state = self._state
        if state is None:
            return
        state.losses.append(values.detach().reshape(-1).to(torch.float32))
        if values.requires_grad:  # the weights each term carries are read from the backward pass
            micro = state.micro
            state.given.add(micro)
            values.register_hook(lambda g: None if state.uses.verifying else state.observe(micro, g))
            if state.on_loss is not None:
                state.on_loss(values)

    @property
    def wants_terms(self) -> bool:
        """Whether loss terms given to :meth:`terms` now would be verified (the first micro-batch of a due step)."""
        state = self._state
        return state is not None and state.wants_terms is not None and bool(state.wants_terms())

    def terms(self, terms: torch.Tensor, total: torch.Tensor | None = None) -> None:
        """Each example's term ``[n]`` of the backward loss, for the verifier, when contributions are stored.

        Trainer callbacks store each example's contribution to the loss the trainer optimises
        (``loss_reduction="sum"``); the verifier needs the per-example terms attached to the graph and the weight
        they carry in the backward loss, which is read from the backward pass: from the gradient of ``total``, the
        scalar loss the terms sum to (a model's own ``loss``: its terms are recomputed from the logits), or, when
        ``total`` is None, from the terms' own gradient (the loss is computed from them). Nothing is stored.
        """
        state = self._state
        if state is not None and state.on_terms is not None and terms.requires_grad:
            state.on_terms(terms, total)

    def examples(self, *, index: Any = None, labels: Any = None, group: Any = None, true_labels: Any = None) -> None:
        """Metadata of the current micro-batch's examples, when it is only known per forward (trainer callbacks).

        Call once per micro-batch, before its backward pass; the step's metadata is the concatenation. Use either
        this or the arguments of ``record``, not both.
        """
        if self._state is None:
            return
        parts = self._state.meta_parts
        for key, value in (("index", index), ("labels", labels), ("group", group), ("true_labels", true_labels)):
            parts.setdefault(key, []).append(value)
        if group is not None:
            self._state.add_groups(group)

    def unscale(self, factor: float) -> None:
        """Say that the backward loss was multiplied by ``factor`` (``GradScaler.get_scale()`` under fp16).

        The stored values are divided back: squared norms and Grams by ``factor²``, sketches by ``factor``.
        """
        if self._state is not None:
            if not factor > 0:
                raise ValueError(f"the loss scale must be positive, got {factor!r}")
            self._state.loss_scale = float(factor)

    def close(self, summary: dict[str, float]) -> None:
        """The block has ended: keep the logged step's summary (empty when nothing was logged)."""
        self._summary = summary

    def summary(self) -> dict[str, float]:
        """After the block: ``{"m_coherence", "m_coherence/<group>" (with groups), "n"}`` of the logged step.

        Exact values from the in-memory record (no store read); NaN where a layer is not finite or not reconciled.
        Empty when the step was not logged.
        """
        if self._summary is None and self._state is not None:
            raise RuntimeError("summary() is available after the record block has ended")
        return dict(self._summary or {})


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for a logged step, resumed (if it ran before) when the step ends.

    A logged step holds thousands of short-lived Python objects (calls, uses, forms, hooks' closures) while its
    forward and backward run; a collection that runs then scans them and moves the survivors to older generations,
    whose growth triggers full collections of the whole heap (ConvNeXt-atto at the bench size: one every ≈ 10 logged
    steps, ≈ 400 ms each, 40 ms per step on average; plain steps none). Paused, the step's objects are freed by
    their reference counts when it ends, and the collector's next run after the block finds only what is left in
    cycles (≈ 800 objects per step). Values are unchanged; a collector disabled before stays disabled.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class StepRecorder:
    """Installs and removes the per-step hooks of a model's layer trackers.

    Args:
        model: The model (its outermost call defines the batch).
        trackers: The layer trackers.
        fused: Fused mode's level (:mod:`gradcoh.logger.fused`: ``"auto"``, True, False) for the eligible Linear,
            convolution and ``Conv1D`` layers.
    """

    def __init__(self, model: nn.Module, trackers: list[LayerTracker], fused: FusedLevel = "auto",
                 batch_inputs: tuple = ()) -> None:
        self.model = model
        self.trackers = trackers
        self.batch_inputs = batch_inputs
        self.names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
        self.params = {id(p): p for t in trackers for p in t.params}
        self.fused = fusable_weights([t.plan for t in trackers]) if fused else frozenset()
        self.fused_level = fused
        self._owners = {id(p): (t, i) for t in trackers for i, p in enumerate(t.params) if id(p) in self.fused}
        self._layers_of: dict[int, list[int]] = {}  # id(parameter) -> positions of the trackers holding it
        for j, t in enumerate(trackers):
            for p in t.params:
                self._layers_of.setdefault(id(p), []).append(j)
        self.modules = self._hooked_modules()

    def _sketch_kind(self, weight: int, form: Form) -> tuple[str, int] | None:
        """Fused mode: ``(kind, k)`` of a fused weight's sketch projection (:meth:`LayerTracker.sketch_kind`)."""
        tracker, i = self._owners[weight]
        return tracker.sketch_kind(i, form)

    def _guarded(self, weight: int) -> bool:
        """Fused mode: whether the reconciliation guard checks the layer of a fused weight at this step.

        Its calls are then not fused: the guard compares the per-example gradients' sum with a ``.grad`` that
        autograd's GEMM formed independently, so a wrong per-example gradient is flagged instead of being summed
        into ``.grad`` (on a fused call the two are the same sum and cannot disagree).
        """
        return self._owners[weight][0].results.checked

    def _hooked_modules(self) -> dict[int, tuple[nn.Module, frozenset[int] | None]]:
        """The root, every module with a rule (with the parameter ids its rule covers) and every observed module."""
        out: dict[int, tuple[nn.Module, frozenset[int] | None]] = {id(self.model): (self.model, None)}
        for t in self.trackers:
            for source in t.plan.sources:
                out[id(source.module)] = (source.module, frozenset(id(p) for p in source.params))
            for module in t.plan.loose_modules:
                out.setdefault(id(module), (module, None))
        return out

    @contextlib.contextmanager
    def record(self, n_groups: int, scale_by_batch: bool, *, probe: bool, group: Any,
               local_grads: bool = True, keep_forms: bool = False,
               references: list[list[torch.Tensor]] | None = None) -> Iterator[StepState]:
        """Hooks in place for one step; yields the step's state, which holds the results afterwards.

        Args:
            n_groups: Number of groups.
            scale_by_batch: The loss is a mean over the micro-batch (per-example values are scaled by its size).
            probe: A probe step (float64 accumulation; gradients by ``torch.autograd.grad``).
            group: ``[n]`` group of each example, or None.
            local_grads: ``.grad`` holds this process's own gradient (False under DDP, which averages it).
            keep_forms: Keep the per-example gradients until the end of the step (alignment).
            references: Each layer's part of the reference gradient (per parameter, natural views), or None.
        """
        from_grad = local_grads and not probe and all(p.grad is None for p in self.params.values())
        uses = UseTracker(self.params, self._on_use, self._on_use_grad, self.fused, self._on_mixed,
                          self.batch_inputs, fused_level=self.fused_level, sketch_kind=self._sketch_kind,
                          guarded=self._guarded)
        device = self.trackers[0].params[0].device
        state = StepState(n_groups, scale_by_batch, uses, acc_dtype=torch.float64 if probe else torch.float32,
                          from_grad=from_grad, keep_forms=keep_forms, device=device, trackers=self.trackers)
        if group is not None:
            state.add_groups(group)
        uses.on_reduced = state.reduced
        for j, tracker in enumerate(self.trackers):
            tracker.attach(state, None if references is None else references[j])
        handles = self._module_hooks(state)
        self._state = state
        try:
            with uses:
                yield state
        except RuntimeError as err:
            n = sum(state.sizes)
            if state.group is not None and state.sizes and state.group.shape[0] < n:  # (a clearer message)
                raise ValueError(f"group has {state.group.shape[0]} entries but the step has at least {n} "
                                 "examples") from err
            raise
        finally:
            end_of_backward(state)  # in case the block ended inside an unfinished backward
            for h in handles:
                h.remove()
            for tracker in self.trackers:
                tracker.detach()
            self._state = None

    def _module_hooks(self, state: StepState) -> list[RemovableHandle]:
        """Hooks telling the use tracker where a model call starts (its data) and which rule is running."""
        uses = state.uses
        depth = [0]

        def before(module: nn.Module, args: tuple, kwargs: dict, owned: frozenset[int] | None) -> None:
            if depth[0] == 0 and not uses.is_paused:
                n = uses.new_batch(args, kwargs)
                if n is not None:
                    state.batch_size(n)
            depth[0] += 1
            uses.where.append(self.names.get(id(module), type(module).__name__))
            if owned is not None:
                uses.rule_call_started(owned)

        def after(owned: frozenset[int] | None) -> None:
            depth[0] = max(depth[0] - 1, 0)
            if uses.where:
                uses.where.pop()
            if owned is not None:
                uses.rule_call_ended()

        handles = []
        for module, owned in self.modules.values():
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, owned=owned: before(m, a, k, owned), with_kwargs=True))
            handles.append(module.register_forward_hook(lambda m, a, o, owned=owned: after(owned), always_call=True))
        return handles

    def _on_mixed(self, op: str, where: str) -> None:
        """A gradient flows through an op that mixes the examples: the layers still to be processed are affected."""
        if self._state is not None and self._state.mixed is None:
            self._state.mixed = (op, where)

    def _on_use(self, use: Use) -> None:
        """A use of tracked parameters: the layers holding them (in tracker order) capture it.

        A dict lookup per parameter the use reaches (was a scan of every tracker's parameters per use: EfficientNet
        131 layers × 65 uses per step).
        """
        roots = self._state.uses.derivations.roots
        found = {j for src in use.diff.values() for p in roots(src) for j in self._layers_of.get(id(p), ())}
        use.layers = [self.trackers[j] for j in sorted(found)]
        for t in use.layers:
            t.capture.add_use(use)

    def _on_use_grad(self, use: Use) -> None:
        for t in use.layers:
            t.capture.use_grad_arrived()
