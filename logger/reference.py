"""A reference set: a fixed sample (e.g. held-out clean examples) whose mean-loss gradient each example is compared to.

``ref_alignment = g_i · R`` with ``R = ∇ (1/|S|) Σ_{r∈S} ℓ_r`` is the first-order term of In-Run Data Shapley (Wang
et al., ICLR 2025, §4: the gradient dot-product with a validation batch); with ``R`` the batch's own gradient it is
the per-example share of the m-coherence numerator. ``R`` is computed without disturbing training, exactly like a
probe: micro-batches, ``torch.autograd.grad`` (``.grad`` untouched), buffers and RNG states restored, and BatchNorm
layers with batch statistics treated as the logger's ``probe_mode`` says (:func:`gradcoh.logger.probe.prepare`; by
default ``"constant"``: the reference sample's own statistics held constant, so ``R`` is the gradient of the network
as it normalises at that step, not of the eval-mode network with stale running statistics).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import int_at_least
from .grads import natural_view
from .probe import ModelState, batch_stat_layers, prepare

log = logging.getLogger(__name__)

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def _rows(inputs: Inputs) -> int:
    if isinstance(inputs, Mapping):
        sizes = {v.shape[0] for v in inputs.values() if torch.is_tensor(v)}
        if len(sizes) != 1:
            raise ValueError("reference inputs given as a mapping need tensors with one common first dimension")
        return sizes.pop()
    return inputs.shape[0]


def _slice(inputs: Inputs, rows: slice, device: torch.device) -> Inputs:
    if isinstance(inputs, Mapping):
        return {k: v[rows].to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    return inputs[rows].to(device)


class ReferenceSet:
    """The reference sample and the last reference gradient computed from it.

    Args:
        reference: ``(inputs, targets, loss_fn)``: inputs ``[m, ...]`` (or a mapping of such tensors, passed as
            keyword arguments to the model), targets ``[m, ...]``, and ``loss_fn(outputs, targets) -> [n]``
            per-example losses.
        every: Recompute when at least this many steps passed since the last computation.
        batch_size: Micro-batch size of the reference pass.

    Raises:
        ValueError: A malformed ``reference``.
    """

    def __init__(self, reference: Any, every: int = 1, batch_size: int = 256) -> None:
        if not isinstance(reference, tuple | list) or len(reference) != 3 or not callable(reference[2]):
            raise ValueError("reference must be a tuple (inputs, targets, loss_fn) with loss_fn(outputs, targets) "
                             "returning per-example losses")
        self.inputs, self.targets, self.loss_fn = reference
        if not torch.is_tensor(self.targets) or not (torch.is_tensor(self.inputs) or isinstance(self.inputs, Mapping)):
            raise ValueError("reference=(inputs, targets, loss_fn) needs tensors: inputs a tensor (or a mapping of "
                             f"tensors) and targets a tensor, got {type(self.inputs).__name__} and "
                             f"{type(self.targets).__name__}")
        self.size = _rows(self.inputs)
        if self.size < 1 or self.targets.shape[0] != self.size:
            raise ValueError(f"reference inputs have {self.size} rows and targets {self.targets.shape[0]}; "
                             "give the same positive number of examples")
        self.every = int_at_least("reference_every", every, 1)
        self.batch_size = int_at_least("batch_size", batch_size, 1)
        self.grads: list[torch.Tensor] | None = None  # one per parameter, natural view, float32
        self.step: int | None = None
        self._versions: list[int] = []  # the parameters' versions when R was computed
        self._mode: str | None = None  # the BatchNorm treatment R was computed with

    def due(self, step: int, params: list[nn.Parameter]) -> bool:
        """Whether the reference gradient must be (re)computed before logging ``step``.

        When none was computed yet; when ``every`` steps have passed since; and when the parameters changed since
        it was computed at this same step (a probe after the optimizer step of a logged step): one step number never
        pairs gradients of different parameters with one ``R``.
        """
        if self.step is None or not 0 <= step - self.step < self.every:
            return True
        return step == self.step and [p._version for p in params] != self._versions

    def compute(self, model: nn.Module, params: list[nn.Parameter], step: int, mode: str = "constant") -> None:
        """The gradient of the reference set's mean loss with respect to ``params``, training left untouched.

        ``mode`` treats BatchNorm layers with batch statistics as a probe does (``"constant"``: the reference
        sample's statistics held constant). Modes, buffers and RNG states are restored afterwards and ``.grad`` is
        never touched; forward hooks and tensor hooks the user registered on the model do run (as for probes).

        Raises:
            ValueError: ``"constant"`` mode for a model with batch statistics and reference inputs given as a
                mapping (whose statistics pass is not defined).
        """
        device = params[0].device  # where the model takes its inputs
        if mode == "constant" and isinstance(self.inputs, Mapping) and batch_stat_layers(model):
            raise ValueError("gradcoh.logger.reference: reference inputs given as a mapping cannot set the constant "
                             "BatchNorm statistics; pass a tensor of inputs or probe_mode='eval'")
        total = [torch.zeros(natural_view(tuple(p.shape)), dtype=torch.float32, device=p.device) for p in params]
        saved = ModelState.save(model)
        try:
            with prepare(model, mode, self.inputs, self.batch_size, device):
                self._accumulate(model, params, total, device)
        finally:
            saved.restore(model)
        self.grads, self.step, self._mode = total, step, mode
        self._versions = [p._version for p in params]
        log.debug("reference gradient recomputed at step %s (%s mode)", step, mode)

    def _accumulate(self, model: nn.Module, params: list[nn.Parameter], total: list[torch.Tensor],
                    device: torch.device) -> None:
        """Add the mean-loss gradient of every reference micro-batch into ``total`` (natural views, float32)."""
        for start in range(0, self.size, self.batch_size):
            rows = slice(start, start + self.batch_size)
            x, y = _slice(self.inputs, rows, device), self.targets[rows].to(device)
            out = model(**x) if isinstance(x, Mapping) else model(x)
            per = self.loss_fn(out, y)
            if not torch.is_tensor(per) or per.dim() != 1 or per.shape[0] != y.shape[0]:
                shape = tuple(per.shape) if torch.is_tensor(per) else type(per).__name__
                raise ValueError(f"the reference loss_fn returned {shape}; it must return one loss per example, "
                                 f"a tensor [{y.shape[0]}] (use reduction='none')")
            grads = torch.autograd.grad(per.sum() / self.size, params, allow_unused=True)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc += g.detach().reshape(acc.shape).to(torch.float32)

    def split(self, counts: list[int]) -> list[list[torch.Tensor]]:
        """The reference gradient as one list per layer (``counts``: parameters per layer, in order)."""
        out, start = [], 0
        for c in counts:
            out.append(self.grads[start : start + c])
            start += c
        return out

    def for_step(self, step: int, model: nn.Module, layers: list[list[nn.Parameter]],
                 mode: str = "constant") -> list[list[torch.Tensor]]:
        """Each layer's part of the reference gradient for logging ``step``, (re)computed first if :meth:`due`.

        Args:
            step: The step about to be logged.
            model: The model.
            layers: Each logged layer's parameters, in order.
            mode: How BatchNorm layers with batch statistics are treated (the logger's ``probe_mode``).
        """
        params = [p for layer in layers for p in layer]
        if self.due(step, params) or mode != self._mode:
            self.compute(model, params, step, mode)
        return self.split([len(layer) for layer in layers])
