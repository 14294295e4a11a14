"""Derived tolerances for every numerical comparison in the suite (one home; tests import from here).

A value computed in floating point with unit roundoff u (2⁻²⁴ for float32, 2⁻⁵³ for float64) by accumulating n
rounded operations differs from the exact value by at most

    γ_n · (Σ |terms|) ≤ n·u/(1 − n·u) · scale                 (Higham, *Accuracy and Stability of Numerical
                                                                  Algorithms*, 2nd ed., §3.1, Lemma 3.1)

where ``scale`` bounds the sum of the magnitudes of the terms, **not** the result: a sum that cancels (‖Σ gᵢ‖² of
opposing gradients, gᵢ·G, a cross-group Gram entry) is compared against the size of its largest terms, never
against its own small value. The worst case grows like n; rounding errors of independent operations are
mean-independent, and Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4) show that then

    |error| ≤ λ·√n·u · scale       with probability ≥ 1 − 2n·exp(−λ²(1 − u)²/2).

:func:`bound` takes the smaller of the two, ``min(n, λ√n)·u·κ``: the deterministic bound for short accumulations
(n ≤ λ² = 64) and the probabilistic one beyond, with λ = :data:`LAMBDA` = 8 (a false failure per compared value has
probability below 2n·e⁻³², under 1e-9 for any n in this suite). κ (``kappa``) is the conditioning of the quantity
relative to ``scale``: how much an error in the inputs of the last accumulation is amplified (1 for a sum of
computed terms measured against their sizes, :data:`PRODUCT` = 2 for a squared norm or a dot product of two computed
vectors measured against the product of their norms; stated where it is anything else).

**n, the accumulation length**, is what a test states: the longest chain of rounded operations the compared value
depends on. For a single reduction it is its length (features × positions of a per-example weight gradient, the
number of examples of a batch sum). For a whole network (the logger's statistics against a float64 oracle through
float32 forward and backward passes) it is :func:`chain_length`: every weight's fan-in (forward) plus fan-out
(backward) plus the positions its gradient sums over, added along the network. No safety factor is applied on top.
Those roundings are relative to the terms each sum adds, so a per-example gradient compared against *its own value*
assumes its forward and backward sums do not cancel; where they may (random small models), the scale is the size of
its terms, propagated through the network as |W|ᵀ|δ| (tests/gradient_terms.py; ``assert_stats(..., terms=...)``).

**Mutation check**: every tolerance used in tests/ is far below 1e-3, so a logger that is off by a relative 1e-3
(a scale, a swapped example) fails; tests/test_tolerance.py perturbs the code under test and checks that.

Set ``GRADCOH_TOLERANCE_LOG=FILE`` to append, for each comparison, the largest ``error / allowed`` seen (a JSON line
per call) — the margin each derived tolerance keeps on this machine.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

PER_MODULE = 4
"""Roundings per leaf module outside its accumulations: output, input gradient, the logger's statistic, the loss."""
U32 = 2.0**-24
"""float32 unit roundoff."""
U64 = 2.0**-53
"""float64 unit roundoff."""
PRODUCT = 2.0
"""κ of a square or a product of two computed values (δ(ab) = a·δb + b·δa): ‖g‖², gᵢ·G, a Gram entry."""
LAMBDA = 8.0
"""Confidence of the probabilistic bound (Higham & Mary 2019): P(false failure per value) < 2n·exp(−λ²/2)."""


def unit_roundoff(dtype) -> float:
    """u of a floating dtype (NumPy or torch dtype, or its name); ``"decimalD"``: text printed to D significant
    digits (half a unit in the last digit)."""
    name = str(dtype).replace("torch.", "")
    if name.startswith("decimal"):
        return 0.5 * 10.0 ** (1 - int(name[len("decimal"):]))
    return {"float32": U32, "float64": U64, "bfloat16": 2.0**-8, "float16": 2.0**-11}[name]


def bound(n: float, *, kappa: float = 1.0, dtype="float32") -> float:
    """Relative error bound of a value accumulated over ``n`` rounded operations: ``min(n, λ√n)·u·κ``.

    Args:
        n: Accumulation length (number of rounded operations the value depends on, ≥ 1).
        kappa: Conditioning of the value relative to the scale it is compared against (≥ 1).
        dtype: Working precision (float32 unless stated).

    Returns:
        The bound, relative to the scale of the largest terms (see the module docstring).

    """
    n = max(float(n), 1.0)
    return min(n, LAMBDA * math.sqrt(n)) * unit_roundoff(dtype) * kappa


def chain_length(model, positions: int = 1) -> int:
    """Accumulation length of a whole network's per-example gradients (an upper bound, forward and backward).

    Σ over weights (≥ 2 dims) of fan-in (the forward's dot products) + fan-out (the backward's) + ``positions`` (the
    weight gradient's sum over positions); ``positions`` for every other parameter (bias, norm, scale); and
    :data:`PER_MODULE` roundings for each leaf module (its elementwise output, its input gradient, the statistic the
    logger forms from it, the loss).

    Args:
        model: The ``nn.Module``.
        positions: The most positions (tokens, pixels of the largest map) a weight gradient sums over per example.

    """
    n = PER_MODULE * sum(1 for m in model.modules() if not list(m.children()))
    for p in model.parameters():
        if p.ndim >= 2:
            n += p.numel() // p.shape[0] + p.shape[0] + positions
        else:
            n += positions
    return n


def _record(err_ratio: float, err_msg: str) -> None:
    path = os.environ.get("GRADCOH_TOLERANCE_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "what": err_msg, "ratio": err_ratio}) + "\n")


def assert_close(actual, expected, *, n: float, kappa: float = 1.0, scale=None, dtype="float32",
                 err_msg: str = "") -> None:
    """Assert ``|actual − expected| ≤ bound(n, kappa, dtype) · scale`` element by element.

    Args:
        actual: Value under test (array-like; NaN must match NaN).
        expected: Oracle value (float64 where possible).
        n: Accumulation length of ``actual`` (see the module docstring).
        kappa: Conditioning relative to ``scale``.
        scale: Size of the largest terms behind each value (broadcastable to ``expected``); ``|expected|`` when
            the value is a sum of same-signed terms (a squared norm), or the ``scale`` an :class:`Expected`
            carries. Use :func:`dot_scale`/:func:`sum_scale` for values that can cancel.
        dtype: Working precision of ``actual``.
        err_msg: Names the compared quantity in the failure message.

    """
    if scale is None:
        scale = getattr(expected, "scale", None)
    actual, expected = np.broadcast_arrays(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64))
    ref = np.abs(expected) if scale is None else np.broadcast_to(np.asarray(scale, dtype=np.float64), expected.shape)
    tol = bound(n, kappa=kappa, dtype=dtype)
    allowed = tol * ref
    err = np.abs(actual - expected)
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    if not np.array_equal(nan_a, nan_e):
        raise AssertionError(f"{err_msg}: NaN positions differ\nactual {actual}\nexpected {expected}")
    err, allowed = err[~nan_e], allowed[~nan_e]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, err / allowed, np.where(err > 0, np.inf, 0.0))
    worst = float(ratio.max()) if ratio.size else 0.0
    _record(worst, err_msg)
    if worst > 1.0:
        k = int(np.argmax(ratio))
        raise AssertionError(
            f"{err_msg}: error {err[k]:.3g} exceeds the derived tolerance {allowed[k]:.3g} = bound(n={n:g}, "
            f"kappa={kappa:g}, {dtype}) {tol:.3g} x scale {allowed[k] / tol:.3g} ({np.sum(ratio > 1)} of "
            f"{ratio.size} values; worst at flat index {k})\n"
            f"actual   {actual.ravel()[:8]}\nexpected {expected.ravel()[:8]}"
        )


class Expected(np.ndarray):
    """Oracle values that carry the size of their terms (``scale``), for :func:`assert_close` to compare against."""

    scale: np.ndarray


def expected(values, scale) -> Expected:
    """``values`` (float64) carrying ``scale``, the size of the terms behind each value (broadcast to its shape)."""
    out = np.asarray(values, dtype=np.float64).view(Expected)
    out.scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), out.shape)
    return out


def dot_scale(norms_a, norms_b):
    """Scale of dot products aᵢ·bⱼ: ‖aᵢ‖‖bⱼ‖ (Cauchy–Schwarz bound on Σ|a_k b_k|), as an outer product."""
    return np.multiply.outer(np.asarray(norms_a, dtype=np.float64), np.asarray(norms_b, dtype=np.float64))


def sum_scale(norms, axis=-1):
    """Scale of ‖Σᵢ gᵢ‖²: (Σᵢ ‖gᵢ‖)², the square of the terms' total size, whatever their signs."""
    return np.asarray(norms, dtype=np.float64).sum(axis) ** 2


def assert_sketch_sum(per_example, projected, *, n: float, err_msg: str = "") -> None:
    """Σᵢ sᵢ (per-example sketches ``[m, k]``) against the sketch of the batch gradient ``[k]``.

    Each coordinate sums ± projected entries of every gᵢ: its terms are as large as ‖sᵢ‖ (Johnson–Lindenstrauss:
    ‖sᵢ‖ ≈ ‖gᵢ‖), so the scale is Σᵢ ‖sᵢ‖ whatever the sum cancels to. ``n``: the chain behind each gᵢ plus the
    entries the projection sums (the layer's parameters).
    """
    per_example = np.asarray(per_example, dtype=np.float64)
    assert_close(per_example.sum(0), projected, n=n, scale=np.linalg.norm(per_example, axis=-1).sum(),
                 err_msg=err_msg or "sketch sum")


def model_size(model) -> int:
    """Number of parameter entries: the longest sum a sketch projection of one layer can make."""
    return sum(p.numel() for p in model.parameters())
