"""The derived tolerances of tests/tolerance.py: their formula, and that a logger off by a small relative amount
(a factor 1 + 1e-3, two examples swapped) fails the very comparisons the suite makes (the mutation check)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gradcoh.logger import GradientLogger
from oracle import assert_stats, open_logged, per_example_grads_loop
from tolerance import LAMBDA, PRODUCT, U32, U64, assert_close, bound, chain_length, sum_scale
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "logger"))
from test_exact import sq_loss, target_for

MUTATION = 1e-3
"""The relative perturbation every comparison must catch."""


def test_bound_is_the_smaller_of_the_deterministic_and_probabilistic_bounds():
    assert bound(1) == U32 and bound(64) == 64 * U32  # n·u up to n = λ² = 64
    assert bound(10_000) == pytest.approx(LAMBDA * 100 * U32)  # λ·√n·u beyond
    assert bound(100, kappa=2, dtype="float64") == pytest.approx(2 * LAMBDA * 10 * U64)
    assert bound(0) == U32  # at least one rounding


def test_assert_close_measures_cancelling_sums_against_their_terms():
    terms = np.array([1.0, -1.0 + 1e-6])  # a sum that cancels to 1e-6
    rounded = terms.sum() + 4 * U32  # a few float32 roundings of the terms
    with pytest.raises(AssertionError, match="derived tolerance"):
        assert_close(rounded, terms.sum(), n=2)  # against its own (tiny) value: fails
    assert_close(rounded, terms.sum(), n=2, kappa=2, scale=np.abs(terms).sum())  # against its terms: holds
    with pytest.raises(AssertionError, match="NaN"):
        assert_close([np.nan, 1.0], [1.0, 1.0], n=1)


@pytest.mark.parametrize("name", ["timm-efficientnet", "tv-resnet", "hf-t5"])
def test_the_largest_zoo_tolerances_are_below_the_mutation(name):
    """The deepest zoo models have the longest chains: even their bound is far below a 1e-3 error."""
    from test_zoo import _positions
    from zoo import CASES

    case = CASES[name]
    n = chain_length(case.build(), positions=_positions(case.batch(1)))
    assert PRODUCT * bound(n) < MUTATION / 2, (name, n)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A small conv + linear model logged once, with its float64 oracle gradients."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 2))
    x = torch.randn(6, 3, 8)
    y = target_for(model, x)
    path = tmp_path_factory.mktemp("m") / "s.zarr"
    with GradientLogger(model, path, loss_reduction="sum", groups=("a", "b")) as glog:
        with glog.record(0, group=torch.tensor([0, 1, 0, 1, 1, 0])):
            sq_loss(model(x), y).sum().backward()
    return open_logged(path), per_example_grads_loop(model, sq_loss, x, y), chain_length(model, x[0].numel())


def test_unmutated_statistics_pass(logged):
    ds, grads, n = logged
    assert_stats(ds, 0, grads, n=n, group=[0, 1, 0, 1, 1, 0], n_groups=2)


@pytest.mark.parametrize("variable", ["sq_norm", "sum_sq_norm", "group_gram"])
def test_a_statistic_scaled_by_1e3_fails(logged, variable):
    ds, grads, n = logged
    bad = ds.copy(deep=True)
    bad[variable] = bad[variable] * (1 + MUTATION)
    with pytest.raises(AssertionError, match=f"{variable}: error .* exceeds the derived tolerance"):
        assert_stats(bad, 0, grads, n=n, group=[0, 1, 0, 1, 1, 0], n_groups=2)


def test_two_examples_swapped_fail(logged):
    ds, grads, n = logged
    bad = ds.copy(deep=True)
    values = bad.sq_norm.values.copy()
    values[0, [0, 1]] = values[0, [1, 0]]
    bad["sq_norm"] = (bad.sq_norm.dims, values)
    with pytest.raises(AssertionError, match="sq_norm"):
        assert_stats(bad, 0, grads, n=n, group=[0, 1, 0, 1, 1, 0], n_groups=2)


def test_a_wrong_group_fails(logged):
    ds, grads, n = logged
    with pytest.raises(AssertionError, match="group_gram"):
        assert_stats(ds, 0, grads, n=n, group=[1, 0, 0, 1, 1, 0], n_groups=2)


def test_a_mutated_logger_fails_the_zoo_comparison(tmp_path):
    """End to end: the logger told that the loss was scaled by 1 + 1e-3 (it was not) fails the zoo's checks."""
    from test_zoo import check_zoo_case

    check_zoo_case("hf-gpt2", tmp_path / "ok")
    with pytest.raises(AssertionError, match=r"sq_norm: error .* exceeds the derived tolerance"):
        check_zoo_case("hf-gpt2", tmp_path / "bad", unscale=1 + MUTATION)


def test_sum_scale_is_the_size_of_the_terms():
    norms = np.array([[3.0], [4.0]])
    assert sum_scale(norms, axis=0) == pytest.approx([49.0])
    assert math.isclose(bound(1e6) / bound(1e4), 10.0)


def test_gradient_terms_closed_forms_equal_the_dense_jacobians(monkeypatch):
    """tests/gradient_terms.py: its Linear/convolution and elementwise closed forms give the generic (dense
    torch.func Jacobian) path's sizes, and every size bounds its gradient entry (g̃ ≥ |g|)."""
    import gradient_terms as terms_module

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
                          nn.ReLU(), nn.Linear(3, 2, bias=False))
    x = torch.randn(2, 4, 6, 5)
    y = target_for(model, x)
    fast = terms_module.gradient_terms(model, sq_loss, x, y)
    monkeypatch.setattr(terms_module, "_BILINEAR", ())
    monkeypatch.setattr(terms_module, "_ELEMENTWISE", ())
    dense = terms_module.gradient_terms(model, sq_loss, x, y)
    grads = per_example_grads_loop(model, sq_loss, x, y)
    assert fast.keys() == dense.keys() == grads.keys()
    for k, g in grads.items():
        assert_close(fast[k], dense[k], n=64, dtype="float64", err_msg=k)
        assert bool((fast[k] >= g.abs() * (1 - 1e-12)).all()), k


def test_gradient_terms_cover_a_cancelling_backward_sum():
    """W2ᵀδ cancels (two outputs pulling opposite ways): the first layer's gradient is 1e-4 of its terms, and the
    sizes the statistics are measured against (not the value) keep that rounding within the bound."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.copy_(torch.tensor([[1.0], [1.0]]))
    x = torch.ones(1, 1)
    y = torch.tensor([[0.0, 2.0 - 1e-4]])  # δ = 2(out − y) = (2, −2 + 2e-4): W2ᵀδ = 2e-4 from terms of size 2
    from gradient_terms import gradient_terms

    g = per_example_grads_loop(model, sq_loss, x, y)["0.weight"].abs()
    size = gradient_terms(model, sq_loss, x, y)["0.weight"]
    assert float(g) == pytest.approx(2e-4, rel=1e-3)  # (y in float32)
    assert float(size) >= 4.0  # |W2|ᵀ|δ|·|x| at least (plus the forward's share)


def test_gradient_terms_stay_a_few_times_the_gradient_where_nothing_cancels():
    """Where no sum cancels (positive weights and inputs, every output above its target), the term sizes are the
    gradient itself plus each module's forward-error share, once per module on the chain: here 1.1-4.8 times |g|
    over three modules, asserted ≤ 2·(1 + 3) = 8. The scale test_exact's statistics are measured against must stay
    that tight for its ×(1 + 1e-3) mutation check to mean anything: sizes inflated uniformly (×1000 in
    gradient_terms' output-gradient line) passed the two tests above and fail this one."""
    from gradient_terms import gradient_terms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    x, y = torch.rand(5, 3), torch.full((5, 2), -10.0)
    grads = per_example_grads_loop(model, sq_loss, x, y)
    sizes = gradient_terms(model, sq_loss, x, y)
    for k, g in grads.items():
        ratio = sizes[k] / g.abs()
        assert bool((ratio >= 1 - 1e-12).all()) and float(ratio.max()) <= 8.0, (k, float(ratio.max()))
