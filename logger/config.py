"""The logger's configuration: one frozen dataclass, validated once at the edge, persisted in the store."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from . import schema

LossReduction = Literal["mean", "sum"]
Mode = Literal["create", "append", "overwrite"]
OnFull = Literal["block", "drop"]
OnError = Literal["raise", "warn"]
OnMismatch = Literal["raise", "flag"]


def _choice(name: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; use one of {', '.join(map(repr, allowed))}")
    return value


def int_at_least(name: str, value: Any, low: int) -> int:
    """Return ``value`` if it is an integer ``>= low``; raise a ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


PROBE_MODES = ("constant", "eval", "train")
"""How probes treat BatchNorm layers that use batch statistics (:mod:`gradcoh.logger.probe`)."""

_CHOICES: dict[str, tuple] = {
    "loss_reduction": ("mean", "sum"), "sketch_dtype": schema.SKETCH_DTYPES, "on_full": ("block", "drop"),
    "mode": ("create", "append", "overwrite"), "on_error": ("raise", "warn"), "on_mismatch": ("raise", "flag"),
    "probe_mode": PROBE_MODES,
}


def _names(value: Any) -> tuple[str, ...]:
    """A name or a sequence of names as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class LoggerConfig:
    """Everything that shapes what :class:`~gradcoh.logger.GradientLogger` writes.

    Attributes:
        every: Log every ``every``-th step passed to ``record`` (``step % every == 0``).
        sketch_dim: Sketch dimension ``k`` per layer; 0 disables sketches.
        seed: Seed of the sketch projections.
        loss_reduction: How the training loss combines examples: ``"mean"`` or ``"sum"``. Per-example gradients
            are those of each example's own loss term either way.
        groups: Names of the example groups (e.g. ``("clean", "corrupted")``); ``record(group=...)`` gives each
            example's position in this tuple. Empty: one group ``"all"``.
        sketch_dtype: Storage type of sketches: ``"float16"`` (default), ``"float32"`` or ``"bfloat16"``.
        layers: Layer selection: names, glob patterns or module type names; empty selects every module that owns
            trainable parameters.
        fallback: Use the ``torch.func`` fallback for modules without a rule; False raises instead.
        queue_size: Logged steps the background writer may hold before ``on_full`` applies.
        on_full: ``"block"`` waits for the writer, ``"drop"`` drops the step and counts it in the store.
        mode: ``"create"`` refuses an existing store, ``"append"`` continues it, ``"overwrite"`` replaces it.
        on_error: ``"raise"`` re-raises writer failures in the training thread; ``"warn"`` logs them, stops
            logging and keeps training.
        flush_secs: The writer commits buffered steps at least this often.
        handle_sigterm: While the logger is open, turn SIGTERM into ``SystemExit(143)`` in the main thread (only
            when no other SIGTERM handler is installed), so that ``with`` blocks close the logger and commit.
        on_mismatch: What the reconciliation guard does when a layer's per-example gradients do not sum to the
            batch gradient its parameters received: ``"raise"`` a clear error naming the layer (default), or
            ``"flag"``: store the step with ``reconciled(step, layer)`` False, which every analysis reports.
        alignment: Also store ``alignment(step, example, layer)``, each example's inner product with the step's
            batch gradient, ``g_{i,l} · Σ_j g_{j,l}`` (exact; keeps each layer's per-example factors until the
            end of the step, about the memory of the activations).
        reference_size: Examples in the reference set (set by ``GradientLogger(reference=...)``; 0: none).
        reference_every: Recompute the reference gradient at a logged step when at least this many steps have
            passed since it was last computed (1: at every logged step); between, the last one is reused and
            ``ref_step`` says which.
        fused: Fused mode (:mod:`gradcoh.logger.fused`) for ``nn.Linear``, convolution and Hugging Face ``Conv1D``
            layers: on logged steps a fused call's batch weight gradient is summed from its per-example gradients
            (``Σ_n G_n``) instead of autograd's second GEMM, so that weight's ``.grad`` equals the unfused path's to
            the rounding of its ``n·T``-term sum, not bitwise (every other ``.grad`` bitwise). ``"auto"`` (default):
            only the calls whose per-example weight gradients the step materialises anyway (Linears whose sketch
            projection needs them, a first convolution: convolutions whose input needs a gradient spare nothing on
            CPU), and only where the spared GEMM pays the fused call's fixed cost and its sum (a fixed cost model of
            the shapes: the same calls on every machine) — it only removes work. True: also materialise factored
            ones where that costs less once the spared GEMM is counted (slower than ``"auto"`` on transformers'
            exact statistics, docs/benchmarks.md). False: every ``.grad`` bitwise as without gradcoh. Calls under
            autocast or saved-tensor hooks (non-reentrant checkpointing) are never fused, nor a layer at a step
            where the reconciliation guard checks it (its ``.grad`` then comes from autograd's GEMM, so the guard
            flags wrong per-example gradients as without fused mode, within ``guard_every`` logged steps).
        batch_inputs: Which inputs of the model's outermost call carry the batch (one entry per example on
            dimension 0): positions of positional arguments and names of keyword arguments. Empty (default): the
            first tensor argument only; any other input is a constant shared by every example (prototypes, a
            memory bank), whatever its length.
        verify_every: With per-example losses (``rec.loss``), verify the first logged step and then every
            ``verify_every``-th against one random example's true gradient (:mod:`gradcoh.logger.verify`); 0: never.
            The default keeps the cost under 1% of the logged steps' time. One process only (off under DDP).
        guard_every: The reconciliation guard checks each layer once every ``guard_every`` logged steps (fixed
            phases balancing the layers' sizes), every layer at the first logged step, at verified steps and, once a
            layer was flagged, at every step (:mod:`gradcoh.logger.guard`): a persistent fault is detected within
            ``guard_every`` logged steps for about ``1/guard_every`` of the guard's cost; a one-step fault in one
            layer with probability ``1/guard_every``. A skipped layer-step is stored ``reconciled`` True (not flagged)
            with ``guard_checked`` False (no verdict). 1: every layer every step.
        probe_mode: How ``probe`` treats BatchNorm layers that normalise with batch statistics: ``"constant"``
            (default: the probe sample's statistics, held constant; exact per-example gradients of the network as
            it normalises at that step), ``"eval"`` (running statistics) or ``"train"`` (per-micro-batch statistics:
            contributions). See :mod:`gradcoh.logger.probe`; ``probe(mode=...)`` overrides it for one call.
        extra: JSON-ready user metadata stored with the configuration (e.g. the experiment's settings).
    """

    every: int = 1
    sketch_dim: int = 0
    seed: int = 0
    loss_reduction: LossReduction = "mean"
    groups: tuple[str, ...] = ()
    sketch_dtype: str = "float16"
    layers: tuple[str, ...] = ()
    fallback: bool = True
    queue_size: int = 16
    on_full: OnFull = "block"
    mode: Mode = "create"
    on_error: OnError = "raise"
    flush_secs: float = 10.0
    handle_sigterm: bool = True
    on_mismatch: OnMismatch = "raise"
    alignment: bool = False
    reference_size: int = 0
    reference_every: int = 1
    fused: bool | str = "auto"
    batch_inputs: tuple[int | str, ...] = ()
    verify_every: int = 100
    guard_every: int = 4
    probe_mode: str = "constant"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, low in (("every", 1), ("sketch_dim", 0), ("seed", 0), ("queue_size", 1), ("reference_size", 0),
                          ("reference_every", 1), ("verify_every", 0), ("guard_every", 1)):
            int_at_least(name, getattr(self, name), low)
        for name, allowed in _CHOICES.items():
            _choice(name, getattr(self, name), allowed)
        groups = _names(self.groups)
        if len(set(groups)) != len(groups) or not all(isinstance(g, str) and g for g in groups):
            raise ValueError(f"groups must be distinct non-empty names, got {self.groups!r}")
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "layers", _names(self.layers))
        inputs = (self.batch_inputs,) if isinstance(self.batch_inputs, int | str) else tuple(self.batch_inputs)
        if any(isinstance(k, bool) or not isinstance(k, int | str) or (isinstance(k, int) and k < 0) for k in inputs):
            raise ValueError(f"batch_inputs must be positions (int >= 0) or keyword names, got {self.batch_inputs!r}")
        object.__setattr__(self, "batch_inputs", inputs)
        if not isinstance(self.alignment, bool):
            raise ValueError(f"alignment must be True or False, got {self.alignment!r}")
        if not isinstance(self.fused, bool) and self.fused != "auto":
            raise ValueError(f"fused must be 'auto', True or False, got {self.fused!r}")
        if self.flush_secs <= 0:
            raise ValueError(f"flush_secs must be positive, got {self.flush_secs!r}")

    @property
    def group_names(self) -> tuple[str, ...]:
        """The stored group names (``("all",)`` without user groups)."""
        return self.groups or (schema.DEFAULT_GROUP,)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the root attributes."""
        out = dataclasses.asdict(self)
        out["groups"] = list(self.groups)
        out["layers"] = list(self.layers)
        out["batch_inputs"] = list(self.batch_inputs)
        return out

    def store_identity(self) -> dict[str, Any]:
        """The fields that must match when appending to an existing store."""
        keys = ("sketch_dim", "seed", "loss_reduction", "groups", "sketch_dtype", "layers", "alignment")
        return {k: self.to_dict()[k] for k in keys} | {"reference": self.reference_size > 0}

    @property
    def optional_variables(self) -> tuple[str, ...]:
        """The optional store variables (other than sketches) this configuration writes."""
        out = (schema.ALIGNMENT,) if self.alignment else ()
        return out + (schema.REFERENCE_VARIABLES if self.reference_size else ())
