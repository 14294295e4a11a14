"""Factored.reduced: the materialised route's norms, sum and sketch taken chunk by chunk, against float64 oracles."""

from __future__ import annotations

import pytest
import torch
from gradcoh.logger import grads
from gradcoh.logger.grads import Dense, Factored, MatrixView, Reduced, choose_route, split_params
from gradcoh.logger.sketch import KINDS, Projection
from tolerance import PRODUCT, assert_close

N, T, R, C = 7, 5, 6, 4  # 7 examples in chunks of 3 (MATERIALISE_ELEMENTS below): two whole chunks and one of 1


@pytest.fixture
def chunks_of_three(monkeypatch):
    monkeypatch.setattr(grads, "MATERIALISE_ELEMENTS", 3 * R * C)


def _factors(seed: int = 0, bias: bool = False) -> Factored:
    g = torch.Generator().manual_seed(seed)
    return Factored(torch.randn(N, T, R, generator=g), torch.randn(N, T, C, generator=g), bias=bias)


def _oracle(f: Factored) -> torch.Tensor:
    """``[n, R, C]`` per-example gradients in float64 (the bias column not included)."""
    return torch.einsum("ntr,ntc->nrc", f.u.double(), f.v.double())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("chunks_of_three")
def test_reduced_norms_sum_and_sketch_exact_in_chunks(kind):
    f = _factors()
    proj = Projection.create(0, "w", (R, C), 16, kind)
    red, total = f.reduced(proj, summed=True)
    want = _oracle(f)  # [n, R, C]
    entries = want.abs().flatten(1)
    assert_close(red.sq_norms(), want.square().sum((1, 2)), n=T + R * C, kappa=PRODUCT, err_msg="sq norms")
    assert_close(total, want.sum(0), n=T + N, scale=(f.u.double().abs().transpose(1, 2) @ f.v.double().abs()).sum(0),
                 err_msg="Σ_n G_n")
    dense64 = Projection.create(0, "w", (R, C), 16, kind)
    want_sketch = dense64.dense(want.float()).double()  # the same projection of the float64 gradients (rounded once)
    assert_close(red.sketch(proj), want_sketch, n=T + R * C, scale=entries.sum(1, keepdim=True).numpy(),
                 err_msg="sketch")
    assert red._blocks is None  # (nothing materialised for these three)
    assert_close(red.m, want, n=T, scale=(f.u.double().abs().transpose(1, 2) @ f.v.double().abs()).numpy())


@pytest.mark.usefixtures("chunks_of_three")
def test_reduced_results_do_not_alias_the_workspace():
    f, other = _factors(0), _factors(1)
    proj = Projection.create(0, "w", (R, C), 16, "countsketch")
    red, total = f.reduced(proj, summed=True)
    kept = (red.sq_norms().clone(), red.sketch(proj).clone(), total.clone())
    other.reduced(proj, summed=True)  # the same workspace, other values
    assert torch.equal(red.sq_norms(), kept[0]) and torch.equal(red.sketch(proj), kept[1])
    assert torch.equal(total, kept[2])


@pytest.mark.usefixtures("chunks_of_three")
def test_reduced_with_bias_splits_without_materialising_and_other_projections_recompute():
    f = _factors(2, bias=True)
    proj = Projection.create(0, "w", (R, C), 16, "countsketch")
    red, total = f.reduced(proj, summed=True)
    assert total.shape == (R, C)
    full = torch.cat([_oracle(f), f.u.double().sum(1).unsqueeze(2)], 2)  # [n, R, C + 1] float64: weight | bias
    terms = torch.cat([f.u.double().abs().transpose(1, 2) @ f.v.double().abs(),
                       f.u.double().abs().sum(1).unsqueeze(2)], 2)  # Σ_t |u||v| per entry (the bias: Σ_t |u|)
    assert_close(red.sq_norms(), full.square().sum((1, 2)), n=T + R * (C + 1), kappa=PRODUCT, err_msg="sq norms")
    weight, bias = split_params(red, MatrixView.of([(R, C), (R,)]))
    assert isinstance(weight, Reduced) and weight._blocks is None and red._blocks is None
    assert_close(bias.m, full[:, :, C:], n=T, scale=terms[:, :, C:].numpy(), err_msg="bias column")
    assert weight.sketch(proj) is red._sketch  # the weight's sketch taken while forming it
    other = Projection.create(1, "w", (R, C), 16, "countsketch")
    assert_close(weight.sketch(other), other.dense(full[:, :, :C].float()).double(), n=T + R * C,
                 scale=terms[:, :, :C].flatten(1).sum(1, keepdim=True).numpy(), err_msg="another projection")
    assert_close(red.m, full, n=T, scale=terms.numpy(), err_msg="the lazy blocks: weight | bias")


def test_choose_route_reduces_where_materialising_is_cheaper(monkeypatch):
    monkeypatch.setattr(grads, "materialise_is_cheaper", lambda *a, **k: True)
    f = _factors(3)
    proj = Projection.create(0, "w", (R, C), 16, "countsketch")
    routed = choose_route(f, proj)
    assert isinstance(routed, Reduced) and isinstance(routed, Dense)
    want = proj.dense(_oracle(f).float()).double()  # the projection of the float64 gradients (rounded once)
    assert_close(routed.sketch(proj), want, n=T + R * C, err_msg="sketch",
                 scale=(f.u.double().abs().transpose(1, 2) @ f.v.double().abs()).flatten(1).sum(1, keepdim=True))


@pytest.mark.usefixtures("chunks_of_three")
def test_reductions_not_taken_read_the_factors_not_a_materialised_copy():
    from gradcoh.logger.grads import bilinear, dot, inner

    f = _factors(4)
    red, _ = f.reduced(None)
    g = torch.Generator().manual_seed(5)
    left, right, m = torch.randn(R, generator=g), torch.randn(C, generator=g), torch.randn(R, C, generator=g)
    want = _oracle(f)
    scale = (f.u.double().abs().transpose(1, 2) @ f.v.double().abs())  # Σ_t |u||v| per entry
    assert_close(bilinear(red, left, right), torch.einsum("nrc,r,c->n", want, left.double(), right.double()),
                 n=T + R + C, scale=torch.einsum("nrc,r,c->n", scale, left.double().abs(), right.double().abs()),
                 err_msg="guard values")
    assert_close(dot(red, m), (want * m.double()).sum((1, 2)), n=T + R * C,
                 scale=(scale * m.double().abs()).sum((1, 2)), err_msg="dot")
    assert_close(inner(red, red), want.square().sum((1, 2)), n=2 * T + R * C, kappa=PRODUCT, err_msg="inner")
    w = torch.rand(N, 2, generator=g)
    assert_close(red.group_sums(w), torch.einsum("ng,nrc->grc", w.double(), want), n=T + N,
                 scale=torch.einsum("ng,nrc->grc", w.double(), scale), err_msg="group sums")
    assert red._blocks is None  # none of them materialised the gradients again
