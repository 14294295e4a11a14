"""The verifier: one example's true gradient against what the logger stored for it, layer by layer.

The reconciliation guard compares Σᵢ gᵢ with ``.grad``; mixing examples (rows attributed to the wrong example, two
examples' gradients swapped) leaves that sum unchanged, so the guard cannot see it. When the training loop gives
per-example losses (``rec.loss(losses)``, a tensor still attached to the graph), the verifier picks a random example
``j`` of the step's first micro-batch and computes its true gradient with one extra autograd pass through the
still-alive graph (``torch.autograd.grad(losses[j], params, retain_graph=True)``: ``.grad`` untouched, the
logger's hooks ignore the pass). After the step it compares, for every layer, the stored squared norm, the guard's
random rank-one projection ``aᵀ gⱼ b`` (a random projection of the whole gradient), the sketch and the alignment
with that gradient. A mismatch raises (``on_mismatch="raise"``) or flags the layer (``reconciled`` False).

Trainer callbacks store each example's contribution to the loss the trainer optimises instead of its own term's
gradient; they give the terms attached to the graph (``rec.terms``), the weight those terms carry in the backward loss
is read from the backward pass (the gradient reaching the model's loss, or the terms themselves), and the captured
gradient is compared after multiplying by it (:class:`Truth` ``contribution``).

It checks the first logged step with per-example losses and then every ``verify_every``-th one. The extra pass costs
about one backward pass of the step (``scripts/bench_verifier.py``: a verified step takes 1.21× an MLP's logged step,
1.55× a Transformer layer's, on a 2-core CPU); ``verify_every=100`` (the default) keeps that to 0.2–0.6% of the
logged steps' time.

Tolerance: each compared value is a float32 sum computed in two different orders (the logger's factored forms and
autograd's), so the two differ by the rounding of those sums, about ``u·√K`` relative to the magnitude of the terms
for ``K`` terms (u = 2⁻²⁴); ``TOLERANCE`` = 1e-3 covers ``K`` up to 10⁶ terms of equal sign with a margin of 15×
(5e-2 for half-precision layers). A wrong example's gradient moves the values by O(1) relative.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .grads import natural_view

log = logging.getLogger(__name__)

TOLERANCE = 1e-3
"""Relative tolerance of a float32 comparison (see the module docstring)."""
HALF_TOLERANCE = 5e-2
"""The same for layers that saw half-precision activations or gradients."""


@dataclass
class Truth:
    """One example's true gradient, captured during the step.

    Attributes:
        example: Its position in the step (0-based over the step's examples).
        grads: Per layer, per parameter: the gradient of the example's own loss term (natural views, float64).
        contribution: The stored values are the example's contribution to the backward loss (trainer callbacks,
            ``loss_reduction="sum"``): ``weight`` times the gradient of its term, not the term's own gradient.
        weight: With ``contribution``: the weight its term carries in the backward loss (accumulation, loss scale),
            read from the backward pass; None until the pass reaches it.
    """

    example: int
    grads: list[list[torch.Tensor]]
    contribution: bool = False
    weight: float | None = None


class Verifier:
    """Schedules and runs the per-step verification (see the module docstring).

    Args:
        every: Verify the first logged step with per-example losses, then every ``every``-th (0: never).
        seed: Seed of the choice of example.
    """

    def __init__(self, every: int, seed: int = 0) -> None:
        self.every = every
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = 0  # logged steps with per-example losses so far

    def arm(self, state: Any, trackers: list, declared: str | None, batch: bool) -> None:
        """Prepare a recorded step for the per-example losses given to ``rec.loss``.

        On the batch stream their observed weights are checked against the declared ``loss_reduction``, and the
        first micro-batch's losses are verified when due.
        """
        state.declared = declared if batch else None
        if not batch:
            return

        def on_loss(losses: torch.Tensor) -> None:
            if state.truth is None and state.micro == 0 and self.due():
                state.truth = self.capture(losses, trackers, state.uses, 0)

        def on_terms(terms: torch.Tensor, total: torch.Tensor | None) -> None:
            if state.truth is None and state.micro == 0 and self.due():
                state.truth = truth = self.capture(terms, trackers, state.uses, 0)
                if truth is not None:
                    truth.contribution = True
                    read_weight(truth, state.uses, terms if total is None else total, total is None)

        state.on_loss = on_loss
        state.on_terms = on_terms
        state.wants_terms = lambda: state.truth is None and state.micro == 0 and self.peek()

    def peek(self) -> bool:
        """Whether the next logged step with per-example losses is verified (without advancing the count)."""
        return bool(self.every) and self.seen % self.every == 0

    def due(self) -> bool:
        """Whether the current logged step (with per-example losses) is verified; advances the count."""
        if not self.every:
            return False
        due = self.seen % self.every == 0
        self.seen += 1
        return due

    def capture(self, losses: torch.Tensor, trackers: list, uses, offset: int) -> Truth | None:
        """The true gradient of one random example's loss term, by one extra backward pass (tracking off).

        Args:
            losses: ``[n]`` per-example losses, attached to the graph.
            trackers: The layer trackers (their parameters define the layers).
            uses: The step's use tracker (its hooks ignore the pass while ``verifying``).
            offset: Examples of the step before this micro-batch.
        """
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for t in trackers for s in t.plan.sources for m in (s.module,)):
            log.info("verifier skipped: train-mode BatchNorm couples the examples (contributions are stored)")
            return None
        flat = losses.reshape(-1)
        j = int(torch.randint(flat.shape[0], (1,), generator=self.gen))
        params = [p for t in trackers for p in t.params]
        uses.verifying = True
        try:
            with uses.paused():
                grads = torch.autograd.grad(flat[j], params, retain_graph=True, allow_unused=True)
        finally:
            uses.verifying = False
        out, k = [], 0
        for t in trackers:
            part = []
            for p, shape in zip(t.params, t.shapes, strict=True):
                g = grads[k]
                k += 1
                g = torch.zeros_like(p) if g is None else g
                part.append(g.detach().to(torch.float64).reshape(natural_view(shape)))
            out.append(part)
        return Truth(offset + j, out)


def read_weight(truth: Truth, uses, source: torch.Tensor, own: bool) -> None:
    """Set ``truth.weight`` from the gradient the backward pass brings to ``source``.

    Args:
        truth: The captured example (``contribution``).
        uses: The step's use tracker (the verifier's own pass is ignored).
        source: The scalar loss the terms sum to (a model's ``loss``), or the terms themselves.
        own: ``source`` is the terms: the weight is the gradient's entry of the captured example.
    """

    def hook(grad: torch.Tensor) -> None:
        if not uses.verifying and truth.weight is None:  # one device sync per verified step
            truth.weight = float(grad.reshape(-1)[truth.example] if own else grad.sum())

    source.register_hook(hook)


def _expected(truth: Truth, inv_scale: float) -> list[list[torch.Tensor]] | None:
    """Per layer, per parameter: what the stored values of ``truth.example`` must equal (None: cannot be known)."""
    if not truth.contribution:
        return truth.grads  # the example's own term
    if truth.weight is None:
        log.info("verifier skipped: the backward pass never reached the loss the callback's terms belong to")
        return None
    factor = truth.weight * inv_scale  # its contribution to the backward loss, unscaled like the stored values
    return [[g * factor for g in part] for part in truth.grads]


def compare(truth: Truth, trackers: list, sizes: list[int], inv_scale: float,
            alignment: tuple[list, object] | None = None) -> list[str]:
    """Layers whose stored values for ``truth.example`` differ from its true gradient, each with what differs.

    Args:
        truth: The captured gradient.
        trackers: The layer trackers, holding the step's per-example values (before the step's record is built).
        sizes: Examples per micro-batch.
        inv_scale: Factor applied to stored values (the inverse loss scale).
        alignment: ``(batch sums per layer (natural views), stored alignment [n, L])`` when alignment is stored.
    """
    j = truth.example
    expected = _expected(truth, inv_scale)
    if expected is None:
        return []
    bad = []
    for li, (t, grads) in enumerate(zip(trackers, expected, strict=True)):
        results = t.results
        tol = HALF_TOLERANCE if results.half else TOLERANCE
        sq_true = sum(float(g.square().sum()) for g in grads)
        norm = sq_true**0.5
        sq, sketch = results.per_example(sizes)
        wrong = []
        if abs(float(sq[j]) * inv_scale**2 - sq_true) > tol * sq_true + 1e-30:
            wrong.append(f"squared norm {float(sq[j]) * inv_scale**2:.6g}, true {sq_true:.6g}")
        guarded = all(s.guard is not None for s in results.stats.values())  # (the guard's schedule)
        checks = torch.cat([results.stats[m].guard if m in results.stats and guarded
                            else torch.zeros(n, device=sq.device) for m, n in enumerate(sizes)])
        probe = sum(float(left.double() @ g @ right.double()) for (left, right), g in zip(t.guard_vectors, grads,
                                                                                        strict=True))
        if guarded and abs(float(checks[j]) * inv_scale - probe) > tol * norm + 1e-30:
            wrong.append(f"random projection {float(checks[j]) * inv_scale:.6g}, true {probe:.6g}")
        if sketch is not None:
            want = sum(t.projector(i, []).dense(g.float().unsqueeze(0))[0].double() for i, g in enumerate(grads))
            got = sketch[j].double() * inv_scale
            if float((got - want).norm()) > tol * max(float(want.norm()), norm) + 1e-30:
                wrong.append("sketch")
        if alignment is not None:
            totals, stored = alignment
            want_a = sum(float((g * m.double()).sum()) for g, m in zip(grads, totals[li], strict=True))
            mag = norm * sum(float(m.double().square().sum()) for m in totals[li]) ** 0.5
            if abs(float(stored[j, li]) - want_a) > tol * mag + 1e-30:
                wrong.append(f"alignment {float(stored[j, li]):.6g}, true {want_a:.6g}")
        if wrong:
            bad.append(f"'{t.name}' ({'; '.join(wrong)})")
    return bad
