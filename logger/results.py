"""One layer's results of a step: per-micro-batch statistics, group sums, and what the reducer reads from them.

The per-example math (:class:`~gradcoh.logger.tracker.LayerTracker`) adds one :class:`MicroStats` per micro-batch;
:class:`LayerResults` combines them with the batch gradient (:class:`~gradcoh.logger.batchgrad.BatchGradient`) into
the step's per-example norms and sketches, Gram matrices, alignments and the reconciliation guard's verdict.

The reconciliation guard: each parameter gets a seeded Gaussian rank-one test matrix ``a bᵀ`` (:func:`guard_vectors`);
every micro-batch stores the per-example values ``aᵀ g_i b`` (``MicroStats.guard``,
:func:`~gradcoh.logger.grads.bilinear`), and :meth:`LayerResults.reconciled` compares their sum with ``aᵀ (Σ_i g_i) b``
of the batch gradient the parameters received; the verdict is the store's ``reconciled`` variable. Which layers are
checked at a step is :mod:`gradcoh.logger.guard`'s schedule (``checked``); :meth:`LayerResults.guard_checked` says
whether the comparison was made (the store's ``guard_checked``). An unchecked layer is not flagged: ``reconciled``
True there is no verdict.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .batchgrad import BatchGradient
from .grads import ParamGrad, as_dtype, dot, natural_view

if TYPE_CHECKING:
    from .step import StepState


@dataclass
class MicroStats:
    """One layer's statistics of one micro-batch, each already scaled to per-example values.

    Attributes:
        sq: ``[n]`` squared norms of the per-example gradients.
        guard: ``[n]`` guard values ``Σ_params aᵀ g_i b``, or None when the guard does not check the layer.
        sketch: ``[n, k]`` sketches, or None without sketches.
        ref_dots: ``[n]`` float64 ``g_i · R`` with the reference gradient, or None without a reference.
        kept: ``(scale, forms per parameter)`` kept for the alignment with the batch sum, or None.
        kept_inputs: ``(tensor, version)`` of the inputs the kept forms may read (factors are views of the layer's
            inputs, not copies): checked unmodified when the alignment reads them, at the end of the step.
    """

    sq: torch.Tensor
    guard: torch.Tensor | None
    sketch: torch.Tensor | None = None
    ref_dots: torch.Tensor | None = None
    kept: tuple[float, list[list[ParamGrad]]] | None = None
    kept_inputs: list[tuple[torch.Tensor, int]] = field(default_factory=list)


class LayerResults:
    """The statistics of one layer over a step, and the readouts of the step's record.

    Args:
        batch: The layer's batch gradient.
        guard_vectors: ``(a [rows], b [cols])`` of each parameter (:func:`guard_vectors`).
        sketch_dim: Sketch dimension (0: none).
    """

    def __init__(self, batch: BatchGradient, guard_vectors: list[tuple[torch.Tensor, torch.Tensor]],
                 sketch_dim: int) -> None:
        self.batch = batch
        self.params = batch.params
        self.guard_vectors = guard_vectors
        self.sketch_dim = sketch_dim
        self.device = self.params[0].device
        self._state: StepState | None = None
        self.stats: dict[int, MicroStats] = {}
        self.group_sums: torch.Tensor | None = None  # running [G-1, P] in acc_dtype
        self.low_precision = False  # half-precision activations or gradients (autocast): a looser guard
        self.terms = 0  # entries of the output gradients summed into the batch gradient (the guard's rounding)
        self.gap = torch.zeros((), dtype=torch.float64)  # |Σ g_i − .grad| over the guard's tolerance (> 1: flagged)
        self.checked = True  # the guard checks this layer at this step (set per step by the guard's schedule)
        self._unchecked: tuple[torch.Tensor, torch.Tensor] | None = None  # (gap, verdict) of an unchecked step

    def begin(self, state: StepState) -> None:
        """Forget the previous step's results."""
        self._state = state
        self.stats = {}
        self.group_sums = None
        self.low_precision = False
        self.terms = 0

    def saw_half_precision(self, half: bool = True) -> None:
        """Half-precision activations or gradients (autocast) went into this step's values: a looser guard."""
        self.low_precision |= half

    def add(self, micro: int, stats: MicroStats, group_block: torch.Tensor | None) -> None:
        """Store a micro-batch's statistics and add its ``[G-1, P]`` group sums."""
        self.stats[micro] = stats
        if group_block is not None:
            self.group_sums = group_block if self.group_sums is None else self.group_sums + group_block

    def discard(self, micro: int) -> None:
        """Forget what a backward pass that reached no parameter produced for micro-batch ``micro``."""
        self.stats.pop(micro, None)

    def drop_forms(self) -> None:
        """Release the kept per-example forms (they hold the layer's activations)."""
        for stats in self.stats.values():
            stats.kept = None

    def per_example(self, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[n]`` squared norms and ``[n, k]`` sketches over all micro-batches (zeros where the layer was unused).

        One micro-batch that used the layer: its own tensors (no copy; the caller stacks the layers).
        """
        if len(sizes) == 1 and 0 in self.stats:
            return self.stats[0].sq, self.stats[0].sketch if self.sketch_dim else None
        sq = torch.cat([self.stats[j].sq if j in self.stats else torch.zeros(n, device=self.device)
                        for j, n in enumerate(sizes)])
        if not self.sketch_dim:
            return sq, None
        k = self.sketch_dim
        return sq, torch.cat([self.stats[j].sketch if j in self.stats else torch.zeros(n, k, device=self.device)
                              for j, n in enumerate(sizes)])

    def alignment(self, total: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        """``[n]`` float64 inner products ``g_i · G`` with the batch sum ``G``.

        ``total`` holds ``G`` per parameter (natural views); the forms kept during the step (``keep_forms``) are
        used, then dropped. Zeros where the layer was unused.
        """
        parts = []
        for j, n in enumerate(sizes):
            stats = self.stats.get(j)
            if stats is not None and any(t._version != v for t, v in stats.kept_inputs):
                raise RuntimeError(
                    f"an input of layer '{self.batch.name}' was modified in place after the backward pass, before "
                    "the end of the record block; alignment=True reads each layer's inputs then (gradcoh keeps them "
                    "uncopied). Move the in-place op after the record block, or make it out of place")
            scale, per_param = stats.kept if stats is not None and stats.kept else (1.0, [[] for _ in self.params])
            parts.append(dots(per_param, total, n, self.device) * scale)
        self.drop_forms()
        return torch.cat(parts)

    def ref_alignment(self, sizes: list[int]) -> torch.Tensor:
        """``[n]`` float64 inner products ``g_i · R`` with the reference gradient (zeros where unused)."""
        return torch.cat([self.stats[j].ref_dots if j in self.stats and self.stats[j].ref_dots is not None
                          else torch.zeros(n, dtype=torch.float64, device=self.device) for j, n in enumerate(sizes)])

    def gram(self, n_groups: int) -> torch.Tensor:
        """``[G, G]`` float64 Gram matrix of the group sums (one process)."""
        if n_groups == 1:
            return self.batch.sq_norm().reshape(1, 1)
        sums = self.group_sum_matrix(n_groups)
        return (sums @ sums.T).to(torch.float64)

    def group_sum_matrix(self, n_groups: int) -> torch.Tensor:
        """``[G, P]`` group sums ``Σ_{i∈g} g_i`` (parameters flattened in order); the last: total minus the rest."""
        total = self.batch.flat()
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

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A ``[P]`` vector in parameter order (as :meth:`group_sum_matrix` lays it out) as natural views."""
        views = [natural_view(tuple(p.shape)) for p in self.params]
        parts = flat.split([rows * cols for rows, cols in views])
        return [p.reshape(view) for p, view in zip(parts, views, strict=True)]

    def reconciled(self) -> torch.Tensor:
        """Whether the per-example gradients sum to the batch gradient the parameters received (0-d bool).

        Compares ``Σ_i aᵀ g_i b`` with ``aᵀ (Σ_i g_i) b`` for the parameter's rank-one test matrix ``a bᵀ`` (one
        matrix-vector product per parameter, no copy), up to the rounding of the accumulation. A gradient the
        per-example values miss, ``D ≠ 0``, goes unnoticed only if ``|aᵀ D b|`` falls within that rounding: for
        Gaussian ``a, b`` that has probability of order the tolerance times the ratio of the scales. True without
        a check when the layer is not checked at this step (:mod:`gradcoh.logger.guard`): not flagged, no verdict
        (:meth:`guard_checked` False).
        """
        if not self.guard_checked():
            if self._unchecked is None:  # (made once: read, never written, by the step's reduction)
                self._unchecked = (torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.bool,
                                                                                   device=self.device))
            self.gap = self._unchecked[0]
            return self._unchecked[1]
        want = None
        for i, (left, right) in enumerate(self.guard_vectors):
            m, scale = self.batch.natural(i)
            v = torch.dot(torch.mv(m, as_dtype(right, m.dtype)), as_dtype(left, m.dtype))
            v = v * scale if scale != 1.0 else v
            want = v if want is None else want + v
        want = as_dtype(want, torch.float64)
        got = as_dtype(torch.cat([s.guard for s in self.stats.values()]), torch.float64) if self.stats else \
            torch.zeros(0)
        total, spread = got.sum(0).to(want), got.abs().sum(0).to(want)
        self.gap = (total - want).abs() / (self.tolerance() * self._magnitude(spread + want.abs()) + 1e-30)
        return (self.gap <= 1).all()

    def guard_checked(self) -> bool:
        """Whether the guard compares this layer's sums at this step (every micro-batch computed its guard values).

        False when the schedule skipped the layer (:mod:`gradcoh.logger.guard`): :meth:`reconciled` is then True
        without a check.
        """
        if not self.stats:
            return self.checked
        return all(s.guard is not None for s in self.stats.values())

    @property
    def half(self) -> bool:
        """Half-precision parameters, activations or gradients (autocast)."""
        return self.low_precision or self.params[0].dtype in (torch.float16, torch.bfloat16)

    def tolerance(self) -> float:
        """The guard's tolerance relative to :meth:`_magnitude`: the float rounding of the sums it compares.

        Both sides are sums of the same ``K`` products (``K``: the entries of the output gradients the layer's
        batch gradient accumulates) in different orders, in the parameters' precision (unit roundoff ``u``), so they
        differ by about ``u·√K`` times the magnitude of the compared values (random-walk rounding); ``GUARD_MARGIN``
        covers the spread of that estimate. Half-precision layers (autocast) use a fixed 5e-2 of the sums' size.
        """
        if self.half:
            return 5e-2
        return GUARD_MARGIN * torch.finfo(self.params[0].dtype).eps / 2 * max(self.terms, 1) ** 0.5

    def _magnitude(self, spread: torch.Tensor) -> torch.Tensor:
        """Scale of the probes' rounding.

        ``√Σᵢ‖gᵢ‖²`` (a Gaussian probe of ``g`` has standard deviation ``‖g‖``), plus ``spread/√K`` for per-example
        sums that cancel (``spread``: ``Σᵢ|aᵀgᵢb| + |aᵀGb|``). Half precision: ``spread`` alone.
        """
        if self.half:
            return spread
        sq = sum((s.sq.double().sum() for s in self.stats.values()), torch.zeros((), dtype=torch.float64))
        return sq.to(spread.device).sqrt() + spread / max(self.terms, 1) ** 0.5


def dots(per_param: list[list[ParamGrad]], against: list[torch.Tensor], n: int,
         device: torch.device) -> torch.Tensor:
    """``[n]`` float64 ``Σ_params Σ_forms ⟨form_i, against[param]⟩`` (forms in the parameters' natural views)."""
    total = torch.zeros(n, dtype=torch.float64, device=device)
    for forms, m in zip(per_param, against, strict=True):
        for f in forms:
            total += dot(f, m).to(torch.float64)
    return total


GUARD_MARGIN = 6.0
"""Factor over the random-walk rounding estimate ``u·√K`` in the guard's tolerance. Measured: the largest ratio of
``|Σᵢ aᵀgᵢb − aᵀGb|`` to ``u·√K·magnitude`` over the exact cases of tests/logger (zoo included) is 1.5; a weight
penalty λ = 1e-4 on an MLP (tests/logger/test_adversarial.py) gives 13."""


def guard_vectors(name: str, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded Gaussian test vectors ``([rows], [cols])`` of one parameter for the reconciliation guard."""
    rows, cols = natural_view(shape)
    seed = int.from_bytes(hashlib.sha256(f"gradcoh-guard/{name}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, generator=gen).to(device), torch.randn(cols, generator=gen).to(device)
