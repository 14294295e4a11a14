"""``GradientLogger``: the facade a training loop uses. It only wires trackers, the record step and the writer.

Data flow: ``record`` arms the layer trackers for one step → the trackers turn each layer's inputs and output
gradients into per-example statistics and sketches during the normal backward pass → at the end of the block the
results are packed into one buffer, copied to the host once, and handed to the background writer.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import schema
from .config import LoggerConfig, int_at_least
from .grads import natural_view
from .layers import LayerRules, default_rules
from .plan import plan_layers
from .record import ModelState, or_default, rank_and_world, share, step_metadata, to_host
from .sketch import SKETCH_KIND, SKETCH_VERSION
from .store import HostRecord, StreamWriter, open_root
from .tracker import LayerTracker, StepState, end_of_backward
from .uses import Use, UseTracker
from .writer import AsyncWriter, WriterError

log = logging.getLogger(__name__)


class Recording:
    """What ``GradientLogger.record`` yields: lets the loop attach per-example losses to the step."""

    def __init__(self, state: StepState | None) -> None:
        self._state = state

    @property
    def active(self) -> bool:
        """True when this step is being logged."""
        return self._state is not None

    def loss(self, values: torch.Tensor) -> None:
        """Record per-example losses ``[n]`` of the current micro-batch (call once per forward)."""
        if self._state is not None:
            self._state.losses.append(values.detach().reshape(-1).to(torch.float32))


class GradientLogger:
    """Logs exact per-example gradient statistics (and optional sketches) of a model's training steps to Zarr.

    Args:
        model: The model being trained.
        store: Path (or fsspec URL) of the Zarr store to write.
        every: Log steps with ``step % every == 0``.
        sketch_dim: Sketch dimension per layer (0: no sketches).
        seed: Seed of the sketch projections.
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loss combines the examples.
        groups: Names of example groups (e.g. ``("clean", "corrupted")``).
        enabled: False turns the logger into a no-op that writes nothing.
        rules: Layer rules (default: :func:`~gradcoh.logger.layers.default_rules`).
        storage_options: fsspec options for URL stores.
        rank: This process's rank (default: from an initialised ``torch.distributed`` process group, else 0).
        world_size: Number of processes (default: from ``torch.distributed``, else 1). With several processes,
            each rank writes its own group of the store and the group sums are all-reduced every logged step.
        **options: Further :class:`~gradcoh.logger.config.LoggerConfig` fields (``sketch_dtype``, ``layers``,
            ``fallback``, ``queue_size``, ``on_full``, ``mode``, ``on_error``, ``flush_secs``).

    Example:
        >>> with GradientLogger(model, "runs/exp.zarr", every=10) as glog:  # doctest: +SKIP
        ...     for step, (x, y, idx) in enumerate(loader):
        ...         with glog.record(step, index=idx, labels=y):
        ...             F.cross_entropy(model(x), y).backward()
        ...         opt.step(); opt.zero_grad()
    """

    def __init__(self, model: nn.Module, store: str | Path, *, every: int = 1, sketch_dim: int = 0,
                 seed: int = 0, loss_reduction: str = "mean", groups: tuple[str, ...] = (),
                 enabled: bool = True, rules: LayerRules | None = None, storage_options: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, **options: Any) -> None:
        self.config = LoggerConfig(every=every, sketch_dim=sketch_dim, seed=seed, loss_reduction=loss_reduction,
                                   groups=groups, **options)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # hook the wrapped module: names without "module.", probes bypass the reducer
        self.model = model
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self.path = str(store)
        self.enabled = bool(enabled)
        self._stopped = False
        self._closed = False
        self._last_step: dict[str, int] = {}
        self.trackers = self._make_trackers(model, rules or default_rules())
        self._writer: AsyncWriter | None = None
        self._sigterm: tuple[Callable, Any] | None = None
        if self.enabled:
            self._open(storage_options)
            if self.config.handle_sigterm:
                self._install_sigterm()

    # --- setup -------------------------------------------------------------------------------------------
    def _make_trackers(self, model: nn.Module, rules: LayerRules) -> list[LayerTracker]:
        cfg = self.config
        plans = plan_layers(model, rules, cfg.layers, cfg.fallback)
        return [LayerTracker(plan, cfg.seed, cfg.sketch_dim) for plan in plans]

    def _attrs(self) -> dict[str, Any]:
        cfg = self.config
        layers = [
            {"name": t.name, "type": "+".join(dict.fromkeys(t.plan.types)), "size": t.size,
             "shapes": [list(p.shape) for p in t.params], "params": t.plan.param_names,
             "views": [list(natural_view(s)) for s in t.shapes], "rule": "+".join(t.plan.rule_names),
             "modules": [s.name for s in t.plan.sources] + t.plan.loose}
            for t in self.trackers
        ]
        sketch = None
        if cfg.sketch_dim:
            sketch = {"kind": SKETCH_KIND, "version": SKETCH_VERSION, "dim": cfg.sketch_dim, "seed": cfg.seed,
                      "dtype": cfg.sketch_dtype}
        bn = [t.name for t in self.trackers
              if any(isinstance(s.module, nn.modules.batchnorm._BatchNorm) for s in t.plan.sources)]
        notes = []
        if bn:
            notes.append(
                "BatchNorm layers " + ", ".join(bn) + ": in train mode the batch statistics couple the examples; "
                "per-example values are then each example's contribution to the batch gradient (they sum exactly "
                "to it), and the gradients of earlier layers are coupled the same way. In eval mode they are exact."
            )
        config = cfg.to_dict()
        config["identity"] = cfg.store_identity()
        return {
            schema.FORMAT_KEY: schema.FORMAT_VERSION,
            schema.CONFIG_KEY: config,
            schema.LAYERS_KEY: layers,
            schema.SKETCH_KEY: sketch,
            schema.VERSIONS_KEY: _versions(),
            schema.MODEL_KEY: f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            schema.NOTES_KEY: notes,
        }

    def _open(self, storage_options: dict | None) -> None:
        cfg = self.config
        attrs = self._attrs()
        attrs[schema.WORLD_SIZE_KEY] = self.world_size
        if self.world_size == 1:
            root, _ = open_root(self.path, cfg.mode, attrs, storage_options)
        else:
            # Rank 0 creates (or checks) the run; the others wait, then each writes only its own group.
            if self.rank == 0:
                open_root(self.path, cfg.mode, attrs, storage_options)
            torch.distributed.barrier()
            top, _ = open_root(self.path, "append", attrs, storage_options)
            root = top.require_group(schema.rank_group(self.rank))
        for name in schema.STREAMS:
            if name in root:
                group = root[name]
                committed = int(group.attrs.get(schema.COMMITTED_KEY, 0))
                if committed:
                    self._last_step[name] = int(group[schema.STEP][committed - 1])
        layers = attrs[schema.LAYERS_KEY]
        groups = cfg.group_names

        def make_stream(name: str) -> StreamWriter:
            return StreamWriter(root, name, layers, groups, cfg.sketch_dim, cfg.sketch_dtype)

        self._writer = AsyncWriter(make_stream, self.path, cfg.queue_size, cfg.on_full, cfg.flush_secs)

    # --- the training-loop API ---------------------------------------------------------------------------
    @property
    def _active(self) -> bool:
        return self.enabled and not self._stopped and not self._closed

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
    def _record(self, step: int, stream: str, scale_by_batch: bool, *, index: Any, labels: Any, group: Any,
                true_labels: Any) -> Iterator[Recording]:
        selected = self.should_log(step) if stream == schema.STREAM_BATCH else self._active
        if not selected:
            yield Recording(None)
            return
        last = self._last_step.get(stream)
        if last is not None and step <= last:
            raise ValueError(f"step {step} is not after the last logged step {last} of stream '{stream}'; "
                             "steps must keep increasing (a resumed run continues after the stored steps)")
        self._raise_writer_error()
        if self._stopped:
            yield Recording(None)
            return
        probe = stream == schema.STREAM_PROBE
        from_grad = not probe and self.world_size == 1 and all(p.grad is None for t in self.trackers for p in t.params)
        uses = UseTracker(self._params, self._on_use, self._on_use_grad)
        state = StepState(len(self.config.group_names), scale_by_batch, uses,
                          acc_dtype=torch.float64 if probe else torch.float32, from_grad=from_grad)
        state.trackers = self.trackers
        if group is not None:
            state.group = torch.as_tensor(group).reshape(-1).to(self.trackers[0].params[0].device)
        for tracker in self.trackers:
            tracker.attach(state)
        handles = self._module_hooks(state)
        try:
            with uses:
                yield Recording(state)
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
        record = self._finish(step, state, index, labels, group, true_labels)
        if record is not None:
            self._last_step[stream] = step
            self._put(stream, record)

    @property
    def _params(self) -> dict[int, nn.Parameter]:
        return {id(p): p for t in self.trackers for p in t.params}

    def _module_hooks(self, state: StepState) -> list:
        """Hooks that tell the use tracker where a model call starts (its data) and which rule is running."""
        uses = state.uses
        depth = [0]
        modules: dict[int, tuple[nn.Module, frozenset[int] | None]] = {id(self.model): (self.model, None)}
        for t in self.trackers:
            for source in t.plan.sources:
                modules[id(source.module)] = (source.module, frozenset(id(p) for p in source.params))
            for name in t.plan.loose:
                module = self.model if name == "root" else self.model.get_submodule(name)
                modules.setdefault(id(module), (module, None))

        def before(module: nn.Module, args: tuple, kwargs: dict, owned: frozenset[int] | None) -> None:
            if depth[0] == 0 and not uses.paused:
                n = uses.new_batch(args, kwargs)
                if n is not None:
                    state.batch_size(n)
            depth[0] += 1
            if owned is not None:
                uses.owned.append(owned)

        def after(owned: frozenset[int] | None) -> None:
            depth[0] = max(depth[0] - 1, 0)
            if owned is not None and uses.owned:
                uses.owned.pop()

        handles = []
        for module, owned in modules.values():
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, owned=owned: before(m, a, k, owned), with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, a, o, owned=owned: after(owned), always_call=True))
        return handles

    def _on_use(self, use: Use) -> None:
        state = self.trackers[0]._state
        params = {id(p) for src in use.diff.values() for p in state.uses.roots(src)}
        use.layers = [t for t in self.trackers if any(id(p) in params for p in t.params)]
        for t in use.layers:
            t.add_use(use)

    def _on_use_grad(self, use: Use) -> None:
        for t in use.layers:
            t.on_use_grad()

    def _finish(self, step: int, state: StepState, index: Any, labels: Any, group: Any,
                true_labels: Any) -> HostRecord | None:
        sizes = state.sizes[: state.micro]
        if not sizes:
            log.warning("record(%s) saw no backward pass; nothing was logged for this step", step)
            return None
        n = sum(sizes)
        meta = {key: step_metadata(key, value, n) for key, value in
                (("index", index), ("label", labels), ("group", group), ("true_label", true_labels))}
        g = self.config.group_names
        if group is None and len(g) == 1:
            meta["group"] = np.zeros(n, dtype=np.int64)
        elif meta["group"] is None:
            raise ValueError("groups were declared, so record(..., group=...) must give every example's group")
        sq, sketches = zip(*(t.per_example(sizes) for t in self.trackers), strict=True)
        sq_norm = torch.stack(sq, 1).to(torch.float64)  # [n, L]
        grams, sums = self._grams(len(g))  # [L, G, G], [L] float64
        finite = torch.isfinite(sq_norm).all(0) & torch.isfinite(grams).flatten(1).all(1)
        reconciled = torch.stack([t.reconciled() for t in self.trackers]) | ~finite
        device_tensors = {"sq_norm": sq_norm, "sum_sq_norm": sums, "group_gram": grams, "finite": finite,
                          "reconciled": reconciled}
        if state.losses:
            device_tensors["loss"] = torch.cat(state.losses)
        if self.config.sketch_dim:
            dtype = torch.float16 if self.config.sketch_dtype == "float16" else torch.float32
            device_tensors["sketch"] = torch.stack(sketches, 1).to(dtype)  # [n, L, k]
        host = to_host(device_tensors)  # the one device→host copy of the step
        loss = host.get("loss", np.full(n, np.nan, dtype=np.float32))
        if loss.shape[0] != n:
            raise ValueError(f"rec.loss() received {loss.shape[0]} values for {n} examples")
        if (meta["group"] < 0).any() or (meta["group"] >= len(g)).any():
            raise ValueError(f"group values must lie in [0, {len(g)}) for groups {g}; got "
                             f"{sorted(set(meta['group'].tolist()) - set(range(len(g))))}")
        self._check_reconciled(step, host["reconciled"])
        missing = np.full(n, -1, dtype=np.int64)
        return HostRecord(
            step=int(step), wall_time=time.time(), sq_norm=host["sq_norm"], sum_sq_norm=host["sum_sq_norm"],
            group_gram=host["group_gram"], index=or_default(meta["index"], missing),
            label=or_default(meta["label"], missing), true_label=or_default(meta["true_label"], missing),
            group=meta["group"], loss=loss,
            finite=host["finite"], reconciled=host["reconciled"], sketch=host.get("sketch"),
        )

    def _check_reconciled(self, step: int, ok: np.ndarray) -> None:
        """The reconciliation guard: raise (``on_mismatch="raise"``) or keep the flags (``"flag"``)."""
        bad = [t.name for t, good in zip(self.trackers, ok, strict=True) if not good]
        if not bad or self.config.on_mismatch == "flag":
            if bad:
                log.warning("step %s: per-example gradients of %s do not sum to the batch gradient; flagged", step,
                            ", ".join(bad))
            return
        raise RuntimeError(
            f"step {step}: the per-example gradients of layer(s) {', '.join(repr(b) for b in bad)} do not sum to the "
            "batch gradient their parameters received. Likely causes: a parameter used outside the modules gradcoh "
            "sees in a way it cannot split by example (a penalty on the weights inside the loss: apply it in the "
            "optimizer, e.g. weight_decay), or gradients changed between the backward pass and the end of the "
            "record block. Run gradcoh.logger.validate(model, ...) to see "
            "which layers are exact, exclude the layer with layers=..., or pass on_mismatch='flag' to store the "
            "step with the layer flagged"
        )

    def _grams(self, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer group Gram matrices ``[L, G, G]`` and ``‖Σ_i g_i‖²`` ``[L]``, in float64.

        ``‖Σ_i g_i‖²`` is the sum of the Gram entries (Σ_a Σ_b ⟨S_a, S_b⟩ = ‖Σ_a S_a‖²). One process: layer by layer,
        in the accumulator's type. Several processes: the group-sum vectors of all layers are summed over ranks with
        one float64 all-reduce first; the Gram of summed vectors is the exact global one (a sum of per-rank Grams
        would miss the cross-rank terms).
        """
        if self.world_size == 1:
            grams = torch.stack([t.gram(n_groups) for t in self.trackers])
        else:
            sums = [t.group_sum_matrix(n_groups) for t in self.trackers]  # [G, P_l] each
            flat = torch.cat([s.reshape(-1).to(torch.float64) for s in sums])
            torch.distributed.all_reduce(flat)  # SUM over ranks
            grams = torch.stack([part.view_as(s) @ part.view_as(s).T
                                 for part, s in zip(flat.split([s.numel() for s in sums]), sums, strict=True)])
        return grams, grams.sum((1, 2))

    def _put(self, stream: str, record: HostRecord) -> None:
        try:
            self._writer.put(stream, record)
        except WriterError as err:
            self._writer_failed(err)

    def _raise_writer_error(self) -> None:
        if self._writer is None:
            return
        try:
            self._writer.raise_if_failed()
        except WriterError as err:
            self._writer_failed(err)

    def _writer_failed(self, err: WriterError) -> None:
        """A writer failure stops logging for good; ``on_error="raise"`` raises it (once), ``"warn"`` logs it."""
        first = not self._stopped
        self._stopped = True
        if self.config.on_error == "raise":
            raise err
        if first:
            log.warning("%s; logging stopped, training continues (on_error='warn')", err)

    # --- SIGTERM: turn a polite kill into a clean exit, so ``with`` blocks close the logger and commit -----------
    def _install_sigterm(self) -> None:
        """Install a SIGTERM handler raising ``SystemExit(143)`` in the main thread, while the logger is open.

        Only from the main thread, and only over the default action: a handler the program installed itself (a
        launcher's, a framework's) is left alone. ``close`` puts the default back.
        """
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
            return
        try:
            previous = signal.getsignal(signal.SIGTERM)
            if previous is not signal.SIG_DFL:
                return

            def on_sigterm(signum: int, frame: Any) -> None:
                raise SystemExit(128 + signum)  # unwinds the training loop; the logger's close commits

            signal.signal(signal.SIGTERM, on_sigterm)
        except (ValueError, OSError):  # not allowed here (embedded interpreters)
            return
        self._sigterm = (on_sigterm, previous)

    def _restore_sigterm(self) -> None:
        if self._sigterm is None:
            return
        handler, previous = self._sigterm
        if threading.current_thread() is not threading.main_thread():
            return  # (closed from another thread, e.g. at exit: the process is ending anyway)
        self._sigterm = None
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is handler:
                signal.signal(signal.SIGTERM, previous)

    def probe(self, step: int, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Callable, *, every: int = 1,
              batch_size: int = 256, mode: str = "eval", index: Any = None, labels: Any = None, group: Any = None,
              true_labels: Any = None) -> bool:
        """Measure a fixed sample of examples without disturbing training; writes the stream ``probe``.

        The sample is processed in micro-batches with gradients taken by ``torch.autograd.grad`` (``.grad`` is
        never touched, no optimizer step); train/eval modes, buffers (BatchNorm running statistics) and the RNG
        states are restored exactly afterwards, so training with probes is bitwise identical to training without.
        Group sums accumulate in float64 across micro-batches. The logger's ``every`` does not apply to probes.

        Args:
            step: The training step (probes must be taken at increasing steps).
            inputs: ``[m, ...]`` probe inputs (moved to the model's device per micro-batch).
            targets: ``[m, ...]`` probe targets.
            loss_fn: ``loss_fn(outputs, targets) -> [n]`` per-example losses (``reduction="none"``).
            every: Probe only when ``step % every == 0``.
            batch_size: Micro-batch size (bounds memory).
            mode: ``"eval"`` (default; BatchNorm uses running statistics, exact per example) or ``"train"``.
            index: ``[m]`` dataset index of each probe example.
            labels: ``[m]`` training labels.
            group: ``[m]`` group positions (required when groups were declared).
            true_labels: ``[m]`` labels before corruption.

        Returns:
            True when a probe was taken at this step.
        """
        if mode not in ("eval", "train"):
            raise ValueError(f"mode={mode!r} is not valid; use 'eval' or 'train'")
        int_at_least("every", every, 1)
        int_at_least("batch_size", batch_size, 1)
        if step % every or not self._active:
            return False
        if self.world_size > 1:  # each rank measures its contiguous share of the sample, once
            rows = slice(*share(inputs.shape[0], self.rank, self.world_size))
            inputs, targets = inputs[rows], targets[rows]
            index, labels, group, true_labels = (None if v is None else v[rows]
                                                 for v in (index, labels, group, true_labels))
        model = self.model
        device = self.trackers[0].params[0].device
        params = [p for p in model.parameters() if p.requires_grad]
        saved = ModelState.save(model)
        try:
            model.train(mode == "train")
            with self._record(step, schema.STREAM_PROBE, False, index=index, labels=labels, group=group,
                              true_labels=true_labels) as rec:
                for start in range(0, inputs.shape[0], batch_size):
                    x = inputs[start : start + batch_size].to(device)
                    y = targets[start : start + batch_size].to(device)
                    per = loss_fn(model(x), y)
                    rec.loss(per)
                    torch.autograd.grad(per.sum(), params, allow_unused=True)
        finally:
            saved.restore(model)
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
        if self._writer is not None:
            try:
                self._writer.flush()
            except WriterError as err:
                self._writer_failed(err)

    def close(self) -> None:
        """Flush, commit and stop the writer; idempotent. No hook remains on the model afterwards."""
        if self._closed:
            return
        self._closed = True
        self._restore_sigterm()
        for tracker in self.trackers:
            tracker.detach()
        if self._writer is not None:
            try:
                self._writer.close()
            except WriterError as err:
                self._writer_failed(err)

    def __enter__(self) -> GradientLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("gradcoh", "torch", "zarr", "numpy", "numcodecs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out
