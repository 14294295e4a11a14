"""How the loss combines the examples, observed in the recorded forward and backward passes (without ``rec.loss``).

Without per-example losses the logger has only the declared ``loss_reduction`` to turn the batch loss's terms into
each example's own term (``n ×`` for a mean, ``1 ×`` for a sum); a wrong declaration scales every stored value by
``n`` (``n²`` for squared norms) and the guard cannot see it (the sums still reconcile). So the reduction is observed:

* **forward**: the use tracker (:mod:`~gradcoh.logger.uses`) sees the op that reduces the batch axis of a
  batch-carrying tensor to a scalar (its layout becomes :class:`~gradcoh.logger.layout.Reduced`): a torch loss
  function with ``reduction="mean"``/``"batchmean"``/``"sum"`` (``F.cross_entropy``, ``nn.MSELoss``, ...; a
  ``"mean"`` of ``cross_entropy``/``nll_loss`` with ``weight`` or ``ignore_index`` divides by the weights of the kept
  targets, still a mean) or ``sum``/``mean``/``nansum``/``nanmean`` over all axes or the batch axis;
* **backward**: the gradient reaching that scalar is the common factor ``c`` the loss applies after it (``loss / k``
  for accumulation, a loss scale). ``sum() / n`` (``c = 1/n``) is a mean in effect and ``mean() * n`` a sum.

Then a declared ``loss_reduction`` that contradicts the observed one raises naming the fix; without a declaration,
the observed one is used. A loss whose reduction is not observed (a custom reduction, a loss computed outside the
recorded forward's tensors) warns once that the weights are declared, not verified, and how to verify them
(``rec.loss(losses)``: the weights are then read from the per-example losses themselves).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

from .arguments import bind

log = logging.getLogger(__name__)

_KINDS = {"sum": "sum", "nansum": "sum", "mean": "mean", "nanmean": "mean"}
_LOSS_KINDS = {"mean": "mean", "batchmean": "mean", "sum": "sum"}


def kind(name: str, func: Any, args: tuple, kwargs: dict) -> str | None:
    """``"mean"`` or ``"sum"``: how the op ``name`` (which reduced the batch axis) combines the examples, or None."""
    if name in _KINDS:
        return _KINDS[name]
    bound = bind(name, func, args, kwargs) or {}  # a loss function: its reduction, defaults included
    if bound.get("size_average") is not None or bound.get("reduce") is not None:  # legacy arguments: not read
        return None
    return _LOSS_KINDS.get(bound.get("reduction"))


def effective(op_kind: str, factor: float, n: int) -> str:
    """The reduction in effect: the op's, unless the factor after it is ``1/n`` on a sum or ``n`` on a mean."""
    if n > 1 and op_kind == "sum" and math.isclose(factor * n, 1.0, rel_tol=1e-5):
        return "mean"
    if n > 1 and op_kind == "mean" and math.isclose(factor, n, rel_tol=1e-5):
        return "sum"
    return op_kind


def contradiction(declared: str, observed: str, op: str, n: int) -> ValueError:
    """The error for a declared ``loss_reduction`` that the observed loss contradicts."""
    return ValueError(
        f"loss_reduction={declared!r} was declared but the loss is the {observed} over the {n} examples (op '{op}'): "
        f"every stored per-example value would be off by a factor {n} ({n * n} for squared norms). Fix: "
        f"loss_reduction={observed!r} (or leave it out: the reduction is observed), or make the loss a {declared}; "
        "with rec.loss(losses) the weights are read from the per-example losses themselves"
    )


def warn_unobserved(declared: str | None) -> None:
    """Say (once per logger) that the loss's reduction was not seen, so the stored values rest on a declaration."""
    assumed = f"loss_reduction={declared!r} as declared" if declared else "loss_reduction='mean' (the default)"
    warnings.warn(
        "gradcoh could not observe how the loss combines the examples (no torch loss function or sum/mean over the "
        f"batch axis produced it in the recorded step), so per-example values assume {assumed}: declared, not "
        "verified. If the loss weights the examples otherwise, every stored value is off by a common factor (n² for "
        "squared norms with a sum declared as a mean). To verify, pass the per-example losses, attached to the "
        "graph, to rec.loss(losses): their weights are then read from the backward pass",
        UserWarning, stacklevel=4,
    )
