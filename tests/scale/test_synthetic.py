"""The synthetic store (scripts/make_synthetic_store.py) recovers the analytic m-coherence of its generative model.

Model: g_i = μ + σ ε_i i.i.d., so E[m-coherence] = 1 + (m − 1) α_pop with α_pop = ‖μ‖²/(‖μ‖² + Pσ²) (the population
m-coherence of Chatterjee & Zielinski). Tolerance: the T steps are independent, so the mean over steps has
standard deviation sd/√T, where sd is the delta-method per-step standard deviation of
:func:`make_synthetic_store.expected`
(Var‖Σg‖² = Σ_l 4m³σ²‖μ_l‖² + 2m²P_lσ⁴, plus the Σ‖g‖² term; it ignores the positive covariance of numerator and
denominator, so it overestimates). We allow 4 standard deviations (a false failure would have probability < 1e-4;
the seeds are fixed, so the test is deterministic). The bias of a ratio of expectations is O(1/(mP)), far below that.
"""

from __future__ import annotations

import math

import make_synthetic_store  # scripts/ is on the path (conftest.py); an import error must fail, not skip
import numpy as np
import pytest
from gradcoh import analysis

T = 24


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    spec = make_synthetic_store.Spec(steps=T, m=256, alpha=0.02, sketch_dim=64, sketch_dtype="float16", seed=3)
    path = tmp_path_factory.mktemp("syn") / "syn.zarr"
    truth = make_synthetic_store.make_synthetic_store(str(path), spec)
    return spec, path, truth


def test_sd_formula_matches_monte_carlo():
    """The per-step sd formula against a direct simulation (fast, small P)."""
    spec = make_synthetic_store.Spec(steps=1, m=64, layers=((4, 8),), alpha=0.05, sketch_dim=0)
    truth = make_synthetic_store.expected(spec)
    mu = make_synthetic_store._means(spec)[0]
    rng = np.random.default_rng(0)
    g = mu + rng.standard_normal((4000, spec.m, mu.size))
    coh = (g.sum(1) ** 2).sum(-1) / (g**2).sum((1, 2))
    assert coh.mean() == pytest.approx(truth["m_coherence"], abs=4 * truth["m_coherence_sd"] / math.sqrt(4000))
    assert 0.8 * truth["m_coherence_sd"] < coh.std() <= 1.05 * truth["m_coherence_sd"]


def test_network_and_per_layer_m_coherence(synthetic):
    spec, path, truth = synthetic
    ds = analysis.open_store(path)
    assert ds.attrs["gradcoh_synthetic"]["expected"]["m_coherence"] == pytest.approx(truth["m_coherence"])
    coh = analysis.m_coherence(ds).values
    assert coh.mean() == pytest.approx(truth["m_coherence"], abs=4 * truth["m_coherence_sd"] / math.sqrt(T))
    per_layer = analysis.m_coherence(ds, per_layer=True).mean("step").values
    for j, value in enumerate(per_layer):
        tol = 4 * truth["m_coherence_layer_sd"][j] / math.sqrt(T)
        assert value == pytest.approx(truth["m_coherence_layer"][j], abs=tol), j
    alpha = float(analysis.debiased_alpha(ds).mean("step"))
    assert alpha == pytest.approx(truth["alpha_pop"], abs=4 * truth["m_coherence_sd"] / (spec.m - 1) / math.sqrt(T))


def test_groups_follow_their_own_size(synthetic):
    """Each group is an i.i.d. sample of m_a examples: E = 1 + (m_a − 1) α_pop given m_a."""
    spec, path, truth = synthetic
    coh = analysis.m_coherence(analysis.open_store(path), by="group").compute()
    for name in coh["group"].values:
        values, m = coh.sel(group=name).values, coh["m"].sel(group=name).values
        expected = 1 + (m - 1) * truth["alpha_pop"]
        sds = np.array([make_synthetic_store.expected(spec, int(k))["m_coherence_sd"] for k in m])
        assert abs((values - expected).mean()) <= 4 * math.sqrt((sds**2).sum()) / T, name


def test_sketch_estimate(synthetic):
    """Sketch numerators add the TensorSketch error, relative sd ≈ sqrt(2/k) per layer.

    The projection is fixed (same seed every step) and the numerator is dominated by the fixed m²‖μ_l‖², so this
    error does **not** average out over steps (measured: the per-layer ratio sketch/exact is 1.24, 1.25, 0.88, 1.09
    with a step-to-step sd of only ~0.1). Across layers it averages with weights w_l = each layer's share of the
    numerator: relative sd sqrt(2/k)·‖w‖₂.
    """
    spec, path, truth = synthetic
    coh = analysis.m_coherence(analysis.open_store(path), source="sketch").values
    sizes = np.array([r * c for r, c in spec.layers], dtype=float)  # equal α_l: numerators ∝ P_l
    rel = math.sqrt(2 / spec.sketch_dim) * np.linalg.norm(sizes / sizes.sum())
    sd = math.hypot(truth["m_coherence_sd"] / math.sqrt(T), truth["m_coherence"] * rel)
    assert coh.mean() == pytest.approx(truth["m_coherence"], abs=4 * sd)
