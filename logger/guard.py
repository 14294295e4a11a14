"""The reconciliation guard's schedule: which layers check ``Σᵢ gᵢ`` against the batch gradient at a logged step.

The guard itself (:meth:`~gradcoh.logger.results.LayerResults.reconciled`) compares ``Σᵢ aᵀ gᵢ b`` with
``aᵀ (Σᵢ gᵢ) b`` of the gradient the parameters received. Its values ``aᵀ gᵢ b`` read every per-example gradient
that a rule materialises once more (``n·P`` floats: 358 M for ResNet-18 at batch 32, 6.6% of a plain step), and
``aᵀ G b`` reads the layer's batch gradient. Checking every layer at every logged step therefore costs 4–8% of a
plain step on the zoo; the schedule spreads the checks so that the guard costs about ``1/guard_every`` of that,
amortised, while keeping these guarantees (``R = guard_every``, counts per stream of logged steps in this process):

* the first logged step of each stream checks every layer (so does the first after every resume);
* every layer is checked at exactly one logged step out of every ``R`` consecutive ones (fixed phases): a persistent
  fault, one present at every step (a penalty on the weights inside the loss, an in-place op gradcoh cannot follow,
  a second backward pass, ``.grad`` modified inside the block), is detected within ``R`` logged steps, by the same
  check, with the same tolerance and strength, as when every layer is checked every step;
* a fault at one step only, in one layer, is checked with probability ``1/R`` (for a step independent of the
  schedule); a fault in every layer (a penalty on all weights, ``.grad`` scaled) is checked at that very step,
  since every step checks about ``1/R`` of the layers (the phases are never empty: ``R`` is capped at the number of
  layers);
* steps that the verifier checks (:mod:`gradcoh.logger.verify`) check every layer, and once a layer has been
  flagged, every layer is checked at every following step.

A layer not checked at a step is stored not flagged, ``reconciled`` True, with ``guard_checked`` False: no verdict
was made (the store says which layer-steps were checked; ``gradcoh info`` counts them). Detection over a run is
therefore as strong as checking every step for persistent faults (after a delay of at most ``R − 1`` logged steps,
stored unchecked) and for faults in every layer, and weaker by the factor ``R`` for a one-step fault in one layer.
``guard_every=1`` checks every layer at every step. Phases balance the layers' sizes (largest first, each into the
phase with the fewest parameters so far), so each step reads about ``1/R`` of the parameters; the assignment
depends only on the layers' sizes.
"""

from __future__ import annotations


class GuardSchedule:
    """Which layers the reconciliation guard checks at each logged step (see the module docstring).

    Args:
        every: Check each layer once every ``every`` logged steps (1: every layer at every step).
        sizes: Number of parameters of each layer, in the trackers' order.
    """

    def __init__(self, every: int, sizes: list[int]) -> None:
        self.every = max(1, min(every, len(sizes)))
        load = [0] * self.every
        self.phase = [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            p = min(range(self.every), key=lambda p: (load[p], p))
            self.phase[i] = p
            load[p] += sizes[i]
        self.seen: dict[str, int] = {}  # logged steps per stream
        self.everywhere = False  # a layer was flagged: check every layer from now on

    def next_step(self, stream: str) -> list[bool]:
        """Whether each layer is checked at the next logged step of ``stream`` (advances the stream's count)."""
        count = self.seen.get(stream, 0)
        self.seen[stream] = count + 1
        if count == 0 or self.everywhere or self.every == 1:
            return [True] * len(self.phase)
        return [p == count % self.every for p in self.phase]

    def unused(self, stream: str) -> None:
        """The step :meth:`next_step` scheduled stored nothing (no backward pass, an error in the block).

        Its count is given back, so the next stored step gets its checks (a stream's first stored step checks every
        layer).
        """
        self.seen[stream] -= 1

    def flagged(self) -> None:
        """A layer failed the guard: check every layer at every following step."""
        self.everywhere = True
