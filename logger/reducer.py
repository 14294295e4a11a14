"""The end of a logged step: per-layer results → one host record (Grams, finite flags, the guard, metadata).

Everything the trackers hold stays on the device until the single device→host copy of the step (the tensors are
packed into one byte buffer first): the statistics cost one synchronisation per logged step. The forward may add
others where a layout rule has to read index values (an ``x[arange(B)[:, None], idx]`` index compared with
``arange`` in :mod:`gradcoh.logger.layout`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch

from .batchgrad import BatchGradient
from .config import LoggerConfig
from .distributed import global_sums
from .metadata import step_metadata
from .reference import ReferenceSet
from .step import StepState
from .store import HostRecord
from .tracker import LayerTracker
from .verify import compare

log = logging.getLogger(__name__)


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy device tensors to NumPy with a single transfer (they are packed into one byte buffer first)."""
    on_device = {k: t for k, t in tensors.items() if t.device.type != "cpu"}
    out = {k: t.numpy() for k, t in tensors.items() if t.device.type == "cpu"}
    if on_device:
        flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in on_device.values()])
        buf = flat.cpu().numpy()  # the device→host copy (synchronises once per logged step)
        offset = 0
        for key, t in on_device.items():
            nbytes = t.numel() * t.element_size()
            dtype = np.dtype(str(t.dtype).removeprefix("torch."))
            out[key] = buf[offset : offset + nbytes].view(dtype).reshape(t.shape)
            offset += nbytes
    return out


def _merge_meta(meta: dict[str, Any], parts: dict[str, list]) -> dict[str, Any]:
    """The step's metadata: from ``record(...)`` or concatenated from ``Recording.examples`` per micro-batch."""
    out = dict(meta)
    for key, values in parts.items():
        if all(v is None for v in values):
            continue
        if out.get(key) is not None:
            raise ValueError(f"{key} was given both to record() and to Recording.examples(); give it once")
        if any(v is None for v in values):
            raise ValueError(f"Recording.examples() got {key} for some micro-batches but not others")
        out[key] = np.concatenate([np.asarray(v.detach().cpu() if torch.is_tensor(v) else v).reshape(-1)
                                   for v in values])
    return out


def record_summary(record: HostRecord, groups: tuple[str, ...]) -> dict[str, float]:
    """``{"m_coherence", "m_coherence/<group>", "n"}`` of one record (see :meth:`Recording.summary`)."""
    out = {"m_coherence": record_coherence(record), "n": float(record.n)}
    if len(groups) > 1:
        usable = bool(record.finite.all()) and (record.reconciled is None or bool(record.reconciled.all()))
        per_example = np.nansum(record.sq_norm, 1)  # [n]
        for g, name in enumerate(groups):
            total = float(per_example[record.group == g].sum())
            value = float(record.group_gram[:, g, g].sum()) / total if usable and total > 0 else math.nan
            out[f"m_coherence/{name}"] = value
    return out


def record_coherence(record: HostRecord) -> float:
    """Whole-network m-coherence of one record, NaN when a layer is not finite or not reconciled.

    The logger's own value for progress bars; stores are analysed with :func:`gradcoh.analysis.m_coherence`,
    which applies the same masking.
    """
    usable = bool(record.finite.all()) and (record.reconciled is None or bool(record.reconciled.all()))
    total = float(np.nansum(record.sq_norm))
    return float(record.sum_sq_norm.sum()) / total if usable and total > 0 else math.nan


class StepReducer:
    """Turns the trackers' per-step results into a :class:`~gradcoh.logger.store.HostRecord`.

    Args:
        trackers: The layer trackers.
        config: The logger configuration.
        world_size: Number of processes (group sums are all-reduced when > 1).
    """

    def __init__(self, trackers: list[LayerTracker], config: LoggerConfig, world_size: int) -> None:
        self.trackers = trackers
        self.config = config
        self.world_size = world_size
        self._mismatch: list[str] = []

    def reduce(self, step: int, state: StepState, reference: ReferenceSet | None = None,
               **meta: Any) -> HostRecord | None:
        """The host record of one step (None when the block saw no backward pass).

        Args:
            step: The step.
            state: What the record block accumulated.
            reference: The reference set, with its gradient computed (None: no reference alignment).
            **meta: ``index``, ``labels``, ``group``, ``true_labels`` as given to ``record``.

        Raises:
            ValueError: Bad metadata.
            RuntimeError: The reconciliation guard failed with ``on_mismatch="raise"``.
        """
        sizes = state.sizes[: state.micro]
        if not sizes:
            log.warning("record(%s) saw no backward pass; nothing was logged for this step", step)
            return None
        n = sum(sizes)
        groups = self.config.group_names
        metadata = step_metadata(n, groups, **_merge_meta(meta, state.meta_parts))
        host = to_host(self._device_tensors(state, sizes, len(groups), reference))
        loss = host.get("loss", np.full(n, np.nan, dtype=np.float32))
        if loss.shape[0] != n:
            raise ValueError(f"rec.loss() received {loss.shape[0]} values for {n} examples")
        host["reconciled"] = np.array(host["reconciled"], copy=True)
        self._verified(step, host["reconciled"])
        self._guard(step, host["reconciled"], host["guard_gap"])
        return HostRecord(
            step=int(step), wall_time=time.time(), sq_norm=host["sq_norm"], sum_sq_norm=host["sum_sq_norm"],
            group_gram=host["group_gram"], index=metadata["index"], label=metadata["label"],
            true_label=metadata["true_label"], group=metadata["group"], loss=loss, finite=host["finite"],
            reconciled=host["reconciled"], guard_checked=host["guard_checked"], sketch=host.get("sketch"),
            alignment=host.get("alignment"),
            ref_alignment=host.get("ref_alignment"), ref_sq_norm=host.get("ref_sq_norm"),
            ref_step=None if reference is None else reference.step,
        )

    def _device_tensors(self, state: StepState, sizes: list[int], n_groups: int,
                        reference: ReferenceSet | None) -> dict[str, torch.Tensor]:
        sq, sketches = zip(*(t.results.per_example(sizes) for t in self.trackers), strict=True)
        inv = 1.0 / state.loss_scale  # a loss scaler's factor (fp16 training): stored values are unscaled
        sq_norm = torch.stack(sq, 1).to(torch.float64) * inv**2  # [n, L]
        grams, totals = self._grams(n_groups, state.keep_forms)  # keep_forms: alignment=True
        grams = grams * inv**2  # [L, G, G] float64
        finite = torch.isfinite(sq_norm).all(0) & torch.isfinite(grams).flatten(1).all(1)
        reconciled = torch.stack([t.results.reconciled() for t in self.trackers]) | ~finite
        # the guard compared the sums (the schedule, verified steps) and they were finite (NaN compares to nothing)
        checked = torch.tensor([t.results.guard_checked() for t in self.trackers], device=finite.device) & finite
        out = {"sq_norm": sq_norm, "sum_sq_norm": grams.sum((1, 2)), "group_gram": grams, "finite": finite,
               "reconciled": reconciled, "guard_checked": checked,
               "guard_gap": torch.stack([_on(t.results.gap, sq_norm.device) for t in self.trackers])}
        if state.losses:
            out["loss"] = torch.cat(state.losses)
        if self.config.sketch_dim:
            dtype = torch.float16 if self.config.sketch_dtype == "float16" else torch.float32
            out["sketch"] = (torch.stack(sketches, 1) * inv).to(dtype)  # [n, L, k]
        if totals is not None:  # g_i and the batch sum both carry the loss scale
            out["alignment"] = torch.stack([t.results.alignment(g, sizes) for t, g in zip(self.trackers, totals,
                                                                                  strict=True)], 1) * inv**2
        self._mismatch = [] if state.truth is None else compare(
            state.truth, self.trackers, sizes, inv, None if totals is None else
            ([[m * inv for m in g] for g in totals], out["alignment"].cpu().numpy()))
        if reference is not None:
            out["ref_alignment"] = torch.stack([t.results.ref_alignment(sizes) for t in self.trackers], 1) * inv
            out["ref_sq_norm"] = torch.stack([sum(g.to(torch.float64).square().sum() for g in t.reference)
                                              for t in self.trackers])
        return out

    def _grams(self, n_groups: int, totals: bool) -> tuple[torch.Tensor, list[list[torch.Tensor]] | None]:
        """Per-layer group Gram matrices ``[L, G, G]`` in float64, and each layer's batch sum if ``totals``.

        ``‖Σ_i g_i‖²`` is the sum of a Gram's entries; the batch sums ``Σ_i g_i`` come per parameter (natural
        views), global under DDP.
        """
        if self.world_size == 1:
            if n_groups == 1:  # (the common case: one squared norm per layer, all layers at once)
                grams = batch_sq_norms([t.batch for t in self.trackers]).reshape(-1, 1, 1)
            else:
                grams = torch.stack([t.results.gram(n_groups) for t in self.trackers])
            return grams, [t.batch.per_param() for t in self.trackers] if totals else None
        sums = global_sums([t.results.group_sum_matrix(n_groups) for t in self.trackers])
        grams = torch.stack([s @ s.T for s in sums])
        if not totals:
            return grams, None
        return grams, [t.results.unflatten(s.sum(0)) for t, s in zip(self.trackers, sums, strict=True)]

    def _verified(self, step: int, ok: np.ndarray) -> None:
        """The verifier's result (:mod:`gradcoh.logger.verify`): raise, or flag the layers (``on_mismatch``)."""
        bad, self._mismatch = self._mismatch, []
        if not bad:
            return
        names = [t.name for t in self.trackers]
        for entry in bad:
            ok[names.index(entry[1:].split("'", 1)[0])] = False
        message = (f"step {step}: the verifier recomputed one example's true gradient and the stored values of "
                   f"layer(s) {', '.join(bad)} differ from it: rows of this layer are attributed to the wrong example "
                   "(an op that moves or mixes examples between the layer and the loss), or its rule is wrong. Run "
                   "gradcoh.logger.validate(model, ...) on this model, or exclude the layer with layers=...")
        if self.config.on_mismatch == "flag":
            log.warning("%s; flagged", message)
            return
        raise RuntimeError(message)

    def _guard(self, step: int, ok: np.ndarray, gap: np.ndarray) -> None:
        """The reconciliation guard: raise (``on_mismatch="raise"``) or keep the flags (``"flag"``)."""
        bad = [f"'{t.name}' ({g:.3g}x its rounding tolerance)" for t, good, g in zip(self.trackers, ok, gap,
                                                                                    strict=True)
               if not good and g > 1]
        if not bad:
            return
        if self.config.on_mismatch == "flag":
            log.warning("step %s: per-example gradients of %s do not sum to the batch gradient; flagged", step,
                        ", ".join(bad))
            return
        raise RuntimeError(
            f"step {step}: the per-example gradients of layer(s) {', '.join(bad)} do not sum to the batch gradient "
            "their parameters received (beyond the float rounding of the two sums). Likely causes, most likely "
            "first, and how to tell them apart:\n"
            "1. an in-place op on a tensor after the layer that gradcoh cannot follow (only the layers right "
            "before the op are flagged; gradcoh.logger.validate(model, ...) shows which);\n"
            "2. a penalty on the weights inside the loss (e.g. λ·‖W‖²): every penalised layer is flagged, the gap "
            "scales with λ; apply it in the optimizer instead (weight_decay);\n"
            "3. a second backward pass through the same forward, or gradients already in .grad from outside the "
            "record block: every layer the pass reaches is flagged; combine the losses and call backward once, and "
            "zero .grad before the block;\n"
            "4. .grad modified between the backward pass and the end of the block (clipping, scaling): every "
            "layer is flagged by a common factor; do it after the block.\n"
            "Exclude a layer with layers=..., or pass on_mismatch='flag' to store the step with the layer flagged"
        )


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (no op dispatched when it is there already)."""
    return t if t.device == device else t.to(device)


def batch_sq_norms(batches: list[BatchGradient]) -> torch.Tensor:
    """``[L]`` float64 ``‖Σ_i g_i‖²`` of each layer's batch gradient, all layers at once.

    One dot product per parameter, then one op each for the scales and the per-layer sums: the values of each
    layer's :meth:`~gradcoh.logger.batchgrad.BatchGradient.sq_norm` (the same float32 dot products, scaled and
    summed in float64 in the same order) with two ops per parameter instead of six. Parameters on several devices
    or of several dtypes: per layer, as that method.
    """
    dots, scales, owner = [], [], []
    for j, batch in enumerate(batches):
        for i in range(len(batch.params)):
            t, scale = batch.param_sum(i)
            flat = t if t.dim() == 1 else t.reshape(-1)
            dots.append(torch.dot(flat, flat))
            scales.append(scale * scale)
            owner.append(j)
    device = dots[0].device if dots else torch.device("cpu")
    if not dots or any(d.device != device or d.dtype != dots[0].dtype for d in dots):
        return torch.stack([b.sq_norm().to(device) for b in batches])
    sq = torch.stack(dots).to(torch.float64)
    if any(s != 1.0 for s in scales):
        sq = sq * torch.tensor(scales, dtype=torch.float64, device=device)
    out = torch.zeros(len(batches), dtype=torch.float64, device=device)
    return out.index_add_(0, torch.tensor(owner, device=device), sq)
