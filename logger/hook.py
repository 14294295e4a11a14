"""``GradientLogger``: the facade a training loop uses. It only wires the parts together.

Data flow: :func:`~gradcoh.logger.plan.plan_layers` decides which parameters form which layer → a
:class:`~gradcoh.logger.tracker.LayerTracker` per layer → ``record`` lets a
:class:`~gradcoh.logger.recorder.StepRecorder` arm the hooks for one step, during which the trackers turn inputs and
output gradients into per-example statistics and sketches → a :class:`~gradcoh.logger.reducer.StepReducer` builds the
host record (one device→host copy) → :class:`~gradcoh.logger.output.RunOutput` queues it for the background
:class:`~gradcoh.logger.writer.AsyncWriter`, which appends it to the store opened by
:func:`~gradcoh.logger.store.open_run`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import schema
from .attributes import root_attributes
from .config import PROBE_MODES, LoggerConfig, int_at_least
from .distributed import rank_and_world
from .grads import natural_view
from .guard import GuardSchedule
from .layers import LayerRules, default_rules
from .output import RunOutput
from .plan import plan_layers
from .probe import Announcer
from .probe import run as run_probe
from .recorder import Recording, StepRecorder, collector_paused
from .reducer import StepReducer, record_summary
from .reduction import warn_unobserved
from .reference import ReferenceSet
from .sigterm import SigtermExit
from .sketch import ProjectionTable
from .tracker import LayerTracker
from .verify import Verifier

log = logging.getLogger(__name__)

__all__ = ["GradientLogger", "Recording"]


class GradientLogger:
    """Logs exact per-example gradient statistics (and optional sketches) of a model's training steps to Zarr.

    Args:
        model: The model being trained.
        store: Path (or fsspec URL) of the Zarr store to write.
        every: Log steps with ``step % every == 0``.
        sketch_dim: Sketch dimension per layer (0: no sketches).
        seed: Seed of the sketch projections.
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loss combines the examples. Needed only without
            per-example losses: with ``rec.loss(losses)`` the weight of each example's term is read from the
            backward pass, and a declared value that contradicts it raises. Default: ``"mean"`` when not given.
        groups: Names of example groups (e.g. ``("clean", "corrupted")``).
        enabled: False turns the logger into a no-op that writes nothing.
        rules: Layer rules (default: :func:`~gradcoh.logger.layers.default_rules`).
        storage_options: fsspec options for URL stores.
        rank: This process's rank (default: from an initialised ``torch.distributed`` process group, else 0).
        world_size: Number of processes (default: from ``torch.distributed``, else 1). With several processes,
            each rank writes its own group of the store and the group sums are all-reduced every logged step.
        summary_writer: A TensorBoard ``SummaryWriter`` (``torch.utils.tensorboard``) or anything with
            ``add_scalar(tag, value, step)``: every logged step writes ``gradcoh/m_coherence`` (and
            ``gradcoh/m_coherence/<group>``; probes under ``gradcoh/probe/``) to it.
        alignment: Also store ``alignment(step, example, layer) = g_{i,l} · Σ_j g_{j,l}``, each example's exact
            share of the m-coherence numerator (it sums over examples to ``sum_sq_norm``). Costs about one GEMM
            per layer and keeps each layer's per-example forms until the end of the step.
        reference: ``(inputs, targets, loss_fn)`` of a reference set (e.g. held-out clean examples; inputs may be
            a mapping of tensors passed as keyword arguments). At logged steps the gradient ``R`` of its mean loss
            is computed first (micro-batches of 256, BatchNorm as ``probe_mode`` says, ``.grad``, buffers and RNG
            untouched) and ``ref_alignment(step, example, layer) = g_{i,l} · R_l`` (computed as each layer is
            processed; no forms kept), ``ref_sq_norm(step, layer) = ‖R_l‖²`` and ``ref_step(step)`` are stored, in
            probes too.
        reference_every: Recompute ``R`` when at least this many steps passed since it was last computed (or the
            parameters changed at the same step); in between it is reused (``ref_step`` says from which step).
        **options: Further :class:`~gradcoh.logger.config.LoggerConfig` fields (``sketch_dtype``, ``layers``,
            ``fallback``, ``queue_size``, ``on_full``, ``mode``, ``on_error``, ``on_mismatch``, ``flush_secs``,
            ``fused``, ``batch_inputs``, ``verify_every``, ``guard_every``).

    Attributes:
        batch_sums_from_grad: Read a step's batch gradient from ``.grad`` when it starts empty (no copy; default).
            Set False when ``.grad`` may change between the last backward pass and the end of the block (a trainer
            that clips before its callbacks run): the sums are then accumulated from the gradient hooks.
        reduction_checks: Observe how the loss combines the examples (:mod:`~gradcoh.logger.reduction`): a declared
            ``loss_reduction`` that contradicts it raises, an undeclared one follows it, and a loss whose reduction
            is not seen warns once. Trainer callbacks set it False: they store each example's contribution to the
            loss the trainer optimises, whatever its reduction.
        summary_writer: Where each logged step's scalars go (see ``summary_writer`` above), or None.

    Example:
        >>> with GradientLogger(model, "runs/exp.zarr", every=10) as glog:  # doctest: +SKIP
        ...     for step, (x, y, idx) in enumerate(loader):
        ...         with glog.record(step, index=idx, labels=y):
        ...             F.cross_entropy(model(x), y).backward()
        ...         opt.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, store: str | Path, *, every: int = 1, sketch_dim: int = 0,
                 seed: int = 0, loss_reduction: str | None = None, groups: tuple[str, ...] = (),
                 enabled: bool = True, rules: LayerRules | None = None, storage_options: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, summary_writer: Any = None,
                 alignment: bool = False, reference: Any = None, reference_every: int = 1,
                 **options: Any) -> None:
        if "reference_size" in options:
            raise ValueError("reference_size is set from reference=(inputs, targets, loss_fn); do not pass it")
        self._reference = None if reference is None else ReferenceSet(reference, reference_every)
        self._declared = loss_reduction
        self.config = cfg = LoggerConfig(every=every, sketch_dim=sketch_dim, seed=seed,
                                         loss_reduction=loss_reduction or "mean", groups=groups, alignment=alignment,
                                         reference_size=0 if self._reference is None else self._reference.size,
                                         reference_every=reference_every, **options)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # hook the wrapped module: names without "module.", probes bypass the reducer
        self.model = model
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.path = str(store)
        self.enabled = bool(enabled)
        self._projections = ProjectionTable(cfg.seed, cfg.sketch_dim)  # one table: what the store records
        self.trackers = [LayerTracker(plan, cfg.seed, cfg.sketch_dim, self._projections)
                         for plan in plan_layers(model, rules or default_rules(), cfg.layers, cfg.fallback)]
        self._recorder = StepRecorder(model, self.trackers, fused=cfg.fused, batch_inputs=cfg.batch_inputs)
        self._reducer = StepReducer(self.trackers, cfg, self.world_size)
        self._guard = GuardSchedule(cfg.guard_every, [t.size for t in self.trackers])
        self._verifier = Verifier(cfg.verify_every if self.world_size == 1 else 0, cfg.seed)  # (one process)
        self._output = RunOutput(cfg, self.path, self._projections)
        self._closed = False
        self._sigterm = SigtermExit()
        self.summary_writer = summary_writer
        self.batch_sums_from_grad = True
        self.reduction_checks = True
        self._unobserved_told = False
        self._announce = Announcer()  # says once how batch-statistics layers are probed
        if self.enabled:
            self._open(storage_options)
            if cfg.handle_sigterm:
                self._sigterm.install()

    def _open(self, storage_options: dict | None) -> None:
        attrs = root_attributes(self.config, self.trackers, self.model, self.world_size)
        views = {name: natural_view(tuple(p.shape)) for t in self.trackers
                 for name, p in zip(t.plan.param_names, t.params, strict=True)}
        self._output.open(attrs, views, storage_options, self.rank, self.world_size)

    # --- the training-loop API ---------------------------------------------------------------------------
    @property
    def _active(self) -> bool:
        return self.enabled and not self._output.stopped and not self._closed

    def should_log(self, step: int) -> bool:
        """Whether ``record(step)`` will log (enabled, not stopped by an error, and ``step % every == 0``)."""
        return self._active and step % self.config.every == 0

    def record(self, step: int, *, index: Any = None, labels: Any = None, group: Any = None,
               true_labels: Any = None) -> contextlib.AbstractContextManager[Recording]:
        """Arm the hooks for the forward and backward passes of one training step.

        On steps not selected by ``every`` (or when disabled) no hook is installed and the block runs untouched.

        Args:
            step: The training step (must increase from one logged step to the next).
            index: ``[n]`` dataset index of each example (stored; −1 pads).
            labels: ``[n]`` training labels.
            group: ``[n]`` position of each example's group in ``groups``.
            true_labels: ``[n]`` labels before corruption, when known.

        Returns:
            A context manager yielding a :class:`Recording` (``rec.loss(per_example_losses)`` stores losses).

        Raises:
            ValueError: Bad step order or inputs whose length differs from the number of examples.
        """
        return self._record(step, schema.STREAM_BATCH, self.config.loss_reduction == "mean",
                            index=index, labels=labels, group=group, true_labels=true_labels)

    @contextlib.contextmanager
    def _record(self, step: int, stream: str, scale_by_batch: bool, mode: str | None = None,
                **meta: Any) -> Iterator[Recording]:
        selected = self.should_log(step) if stream == schema.STREAM_BATCH else self._active
        if selected:
            self._output.check_order(stream, step)
            self._output.raise_if_failed()
        if not selected or self._output.stopped:
            yield Recording(None)
            return
        with collector_paused():
            yield from self._recorded(step, stream, scale_by_batch, mode, meta)

    def _recorded(self, step: int, stream: str, scale_by_batch: bool, mode: str | None,
                  meta: dict[str, Any]) -> Iterator[Recording]:
        """The body of a selected :meth:`_record` (the generator its context manager runs), collector paused."""
        local = self.world_size == 1 and self.batch_sums_from_grad
        references = None if self._reference is None else self._reference.for_step(
            step, self.model, [t.params for t in self.trackers], mode or self.config.probe_mode)
        record, scheduled = None, False
        try:
            with self._recorder.record(len(self.config.group_names), scale_by_batch,
                                       probe=stream == schema.STREAM_PROBE, group=meta["group"], local_grads=local,
                                       keep_forms=self.config.alignment, references=references) as state:
                checks, scheduled = self._guard.next_step(stream), True
                for tracker, check in zip(self.trackers, checks, strict=True):
                    tracker.results.checked = check
                self._verifier.arm(state, self.trackers, self._declared, stream == schema.STREAM_BATCH)
                state.check_reduction = stream == schema.STREAM_BATCH and self.reduction_checks
                rec = Recording(state)
                yield rec
            if state.unobserved() and not self._unobserved_told:
                self._unobserved_told = True
                warn_unobserved(self._declared)
            record = self._reducer.reduce(step, state, self._reference, **meta)
        finally:
            if scheduled and record is None:  # no step stored (no backward pass, an error): its checks come next
                self._guard.unused(stream)
            for tracker in self.trackers:  # whatever happened: kept activations never outlive the step
                tracker.results.drop_forms()
        if record is not None and record.reconciled is not None and not record.reconciled.all():
            self._guard.flagged()
        summary = {} if record is None else record_summary(record, self.config.group_names)
        rec.close(summary)
        if record is not None:
            self._output.publish(self.summary_writer, stream, step, summary)
            self._output.put(stream, step, record)

    def last_coherence(self, stream: str = schema.STREAM_BATCH) -> float:
        """Whole-network m-coherence of the last step logged to ``stream``, for progress bars (no store read).

        NaN before the first step, or when a layer of the step is not finite or not reconciled.
        """
        return self._output.last_coherence(stream)

    def probe(self, step: int, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable, *, every: int = 1,
              batch_size: int = 256, mode: str | None = None, index: Any = None, labels: Any = None,
              group: Any = None, true_labels: Any = None, statistics: torch.Tensor | None = None) -> bool:
        """Measure a fixed sample of examples without disturbing training; writes the stream ``probe``.

        The sample is processed in micro-batches with gradients taken by ``torch.autograd.grad`` (``.grad`` is
        never touched, no optimizer step); train/eval modes, buffers (BatchNorm running statistics and
        ``num_batches_tracked``) and the RNG states are restored exactly afterwards, so training with probes is
        bitwise identical to training without.
        Group sums accumulate in float64 across micro-batches. The logger's ``every`` does not apply to probes.

        Args:
            step: The training step (probes must be taken at increasing steps).
            inputs: ``[m, ...]`` probe inputs (moved to the model's device per micro-batch).
            targets: ``[m, ...]`` probe targets.
            loss_fn: ``loss_fn(outputs, targets) -> [n]`` per-example losses (``reduction="none"``).
            every: Probe only when ``step % every == 0``.
            batch_size: Micro-batch size (bounds memory).
            mode: How BatchNorm layers that use batch statistics are probed (default: the logger's ``probe_mode``,
                ``"constant"`` unless configured): ``"constant"`` normalises them with the statistics of the whole
                sample (or of ``statistics``) held constant, exact per-example gradients of the network as it
                normalises now; ``"eval"`` uses running statistics (exact, but they lag the trained network);
                ``"train"`` uses each micro-batch's statistics with the gradient through them (contributions).
                Without such layers the probe runs in eval mode (``"train"``: train mode, dropout on).
            index: ``[m]`` dataset index of each probe example.
            labels: ``[m]`` training labels.
            group: ``[m]`` group positions (required when groups were declared).
            true_labels: ``[m]`` labels before corruption.
            statistics: ``[s, ...]`` inputs whose statistics the ``"constant"`` mode holds instead of the probe
                sample's (e.g. the current training batch). With several processes every rank uses the whole
                sample (or these inputs), so all ranks probe one function.

        Returns:
            True when a probe was taken at this step.

        Raises:
            ValueError: A bad mode, or (``"constant"``) a BatchNorm module called more than once per forward pass.
        """
        mode = self.config.probe_mode if mode is None else mode
        if mode not in PROBE_MODES:
            raise ValueError(f"mode={mode!r} is not valid; use one of {', '.join(map(repr, PROBE_MODES))}")
        int_at_least("every", every, 1)
        int_at_least("batch_size", batch_size, 1)
        if step % every or not self._active:
            return False
        meta = {"index": index, "labels": labels, "group": group, "true_labels": true_labels}
        self._announce(self.model, mode)
        if self._reference is not None:  # R first, of the network in this mode (not inside the probe's state)
            self._reference.for_step(step, self.model, [t.params for t in self.trackers], mode)
        run_probe(self.model, lambda m: self._record(step, schema.STREAM_PROBE, False, mode, **m), inputs, targets,
                  loss_fn, mode=mode, batch_size=batch_size, statistics=statistics, meta=meta, rank=self.rank,
                  world_size=self.world_size, device=self.trackers[0].params[0].device)
        return True

    def project_grad(self) -> dict[str, torch.Tensor]:
        """Sketch the gradient currently in the parameters' ``.grad`` with each layer's projection.

        Returns:
            ``{layer name: tensor[k]}``. With ``loss_reduction="sum"`` the per-example sketches of a step sum to
            the ``project_grad()`` of that step's batch gradient.

        Raises:
            ValueError: The logger was created with ``sketch_dim=0``.
        """
        if not self.config.sketch_dim:
            raise ValueError("project_grad() needs sketches; create the logger with sketch_dim > 0")
        return {t.name: t.project() for t in self.trackers}

    def flush(self) -> None:
        """Write and commit every step logged so far."""
        self._output.flush()

    def close(self) -> None:
        """Flush, commit and stop the writer; idempotent. No hook remains on the model afterwards."""
        if self._closed:
            return
        self._closed = True
        self._sigterm.restore()
        for tracker in self.trackers:
            tracker.detach()
            tracker.results.drop_forms()
        self._output.close()

    def __enter__(self) -> GradientLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
