"""What one ``record`` block accumulates across its forward/backward passes, and the end of each backward pass.

A :class:`StepState` is shared by the step's layer trackers, its use tracker and its ``Recording``: the hooks change
it through its methods (:meth:`StepState.batch_size`, :meth:`StepState.in_backward`), the ``Recording`` appends the
losses and metadata given per micro-batch, and :func:`end_of_backward` closes a micro-batch once per backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import reduction
from .ghost import GramCache
from .uses import UseTracker

if TYPE_CHECKING:
    from .tracker import LayerTracker


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
        keep_forms: Keep each layer's per-example gradients (factors) until the end of the step, for their inner
            products with the batch sum, known only then (``alignment=True``).
        device: The model's device (for group ids given per micro-batch).
        trackers: The layer trackers filling this state.
        group: ``[n_total]`` group of each example on the model's device, or None.
        params_reached: The running backward pass reached a parameter (False for e.g. ``autograd.grad`` with
            respect to the inputs only: such a pass is not a micro-batch and is discarded).
        sizes: Examples in each completed or current micro-batch.
        micro: Index of the current micro-batch (advanced at the end of each backward pass).
        callback_queued: Whether the end-of-backward callback is queued for the running backward pass.
        losses: Per-example losses passed to ``Recording.loss``.
        meta_parts: Per-micro-batch metadata passed to ``Recording.examples`` (key -> list over micro-batches).
        loss_scale: The factor the backward loss was multiplied by (a loss scaler's), divided out when storing.
        mixed: ``(op, module)`` of an op that mixes the examples along the batch axis and that the running backward
            pass went through: the per-example gradients of the layers before it cannot be split by example.
        observed: Micro-batch -> the weight each example's loss term carries in the backward loss, read from the
            backward pass when per-example losses are given (``rec.loss``); it replaces ``scale_by_batch``.
        declared: The ``loss_reduction`` the user declared (None: not declared), checked against ``observed``.
        on_loss: Called with the per-example losses given to ``rec.loss`` (the verifier).
        on_terms: Called with the loss terms given to ``rec.terms`` (the verifier, for trainer callbacks).
        wants_terms: Returns whether terms given now would be verified (callbacks compute them only then).
        check_reduction: Observe how the loss combines the examples (:mod:`~gradcoh.logger.reduction`; batch stream,
            not under trainer callbacks, which store contributions).
        reductions: Micro-batch -> ``(op, "mean" | "sum")``: the reduction observed (without ``rec.loss``).
        given: Micro-batches whose per-example losses were given attached to the graph (``rec.loss``).
        truth: The verifier's captured example gradient (:class:`~gradcoh.logger.verify.Truth`), or None.
        grams: Gram blocks of the factors of the running backward pass, shared by the layers that read the same
            tensor (cleared at its end).
    """

    n_groups: int
    scale_by_batch: bool
    uses: UseTracker
    acc_dtype: torch.dtype = torch.float32
    from_grad: bool = False
    keep_forms: bool = False
    device: torch.device | None = None
    trackers: list[LayerTracker] = field(default_factory=list)
    group: torch.Tensor | None = None
    params_reached: bool = False
    sizes: list[int] = field(default_factory=list)
    micro: int = 0
    callback_queued: bool = False
    losses: list[torch.Tensor] = field(default_factory=list)
    meta_parts: dict[str, list] = field(default_factory=dict)
    loss_scale: float = 1.0
    mixed: tuple[str, str] | None = None
    observed: dict[int, float] = field(default_factory=dict)
    declared: str | None = None
    on_loss: Any = None
    on_terms: Any = None
    wants_terms: Any = None
    truth: Any = None
    check_reduction: bool = False
    reductions: dict[int, tuple[str, str]] = field(default_factory=dict)
    given: set[int] = field(default_factory=set)
    grams: GramCache = field(default_factory=GramCache)

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
        mean = self.reductions[micro][1] == "mean" if micro in self.reductions else self.scale_by_batch
        return float(self.sizes[micro]) if mean else 1.0

    def observe(self, micro: int, grad: torch.Tensor) -> None:
        """The gradient reaching the per-example losses of micro-batch ``micro``: each term's weight in the loss.

        Raises:
            ValueError: The weights differ between examples, or contradict the declared ``loss_reduction``.
        """
        w = grad.detach().reshape(-1).to(torch.float64)
        lo, hi = torch.aminmax(w)
        first, lo, hi = torch.stack([w[0], lo, hi]).tolist()  # one device sync per logged micro-batch with losses
        if first == 0.0 or max(hi - first, first - lo) > 1e-5 * abs(first):
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

    def reduced(self, out: torch.Tensor, op: str, func: Any, args: tuple, kwargs: dict) -> None:
        """The forward reduced the batch axis to the scalar ``out`` (op ``op``): read its weight in the backward."""
        kind = reduction.kind(op, func, args, kwargs) if self.check_reduction else None
        if kind is None:
            return
        micro, n = self.micro, self.n
        out.register_hook(lambda g: None if self.uses.verifying else self._reduced_weight(micro, n, op, kind, g))

    def _reduced_weight(self, micro: int, n: int, op: str, kind: str, grad: torch.Tensor) -> None:
        """The gradient reaching a reduced loss: the reduction in effect, checked against the declared one.

        Raises:
            ValueError: A declared ``loss_reduction`` contradicts it.
        """
        if micro in self.given:  # rec.loss: the weights are read from the per-example losses themselves
            return
        found = reduction.effective(kind, float(grad.sum()) / self.loss_scale, n)  # one device sync per micro-batch
        self.reductions.setdefault(micro, (op, found))
        if self.declared is not None and n > 1 and found != self.declared:
            raise reduction.contradiction(self.declared, found, op, n)

    def unobserved(self) -> bool:
        """Some micro-batch's loss weights were neither observed nor read from ``rec.loss`` (they are declared)."""
        return self.check_reduction and any(m not in self.reductions and m not in self.observed
                                            for m in range(self.micro))

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

    def add_groups(self, group: Any) -> None:
        """Append the groups of a micro-batch's examples (given per micro-batch by ``Recording.examples``)."""
        g = torch.as_tensor(group).reshape(-1).to(self.device)
        self.group = g if self.group is None else torch.cat([self.group, g])

    def in_backward(self, reached_parameter: bool = False) -> None:
        """A hook of the running backward pass fired: queue :func:`end_of_backward` once per pass.

        Args:
            reached_parameter: The hook was a parameter's (the pass is a micro-batch, not a gradient of inputs).
        """
        self.params_reached |= reached_parameter
        if not self.callback_queued:
            self.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(lambda: end_of_backward(self))


def end_of_backward(state: StepState | None) -> None:
    """Close the current micro-batch: process open calls of every tracker, then advance the micro-batch index."""
    if state is None or not state.callback_queued:
        return
    for tracker in state.trackers:
        tracker.flush_calls()
    state.grams.clear()
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
