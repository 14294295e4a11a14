"""Factored.reduced: the materialised route's norms, sum and sketch taken chunk by chunk, against float64 oracles."""

from __future__ import annotations

from dataclasses import replace

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


def _with_dead_positions(seed: int, bias: bool = False) -> Factored:
    """Factors whose row factor is zero for every example at positions 1, 2 and 4, for examples 0–2 only at 3, and
    at 0 not positive anywhere, zero in places (its largest entry 0: a test for zero without ``abs`` drops it)."""
    f = _factors(seed, bias)
    u = f.u.clone()
    u[:, [1, 2, 4]] = 0
    u[:3, 3] = 0  # (zero for some examples only: kept)
    u[:, 0] = -u[:, 0].abs()  # (no positive entry, not zero: kept)
    u[:, 0, ::2] = 0  # (e.g. an output gradient masked by a ReLU: zero in places, negative elsewhere)
    return replace(f, u=u)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.usefixtures("chunks_of_three")
def test_positions_zero_for_every_example_are_dropped_and_change_no_value(bias):
    f = _with_dead_positions(6, bias)
    live = f.live()
    assert live.positions == T - 3 and torch.equal(live.u, f.u[:, [0, 3]]) and torch.equal(live.v, f.v[:, [0, 3]])
    proj = Projection.create(0, "w", (R, C + bias), 16, "countsketch")
    red, total = f.reduced(proj, summed=True)
    assert red.factors.positions == T - 3  # (the GEMM formed 2 of 5 positions)
    want = _oracle(f)
    if bias:
        want = torch.cat([want, f.u.double().sum(1).unsqueeze(2)], 2)
    scale = (f.u.double().abs().transpose(1, 2) @ f.v.double().abs())
    assert_close(red.sq_norms(), want.square().sum((1, 2)), n=T + R * (C + 1), kappa=PRODUCT, err_msg="sq norms")
    assert_close(total, want[:, :, :C].sum(0), n=T + N, scale=scale.sum(0), err_msg="Σ_n G_n")
    assert_close(red.sketch(proj), proj.dense(want.float()).double(), n=T + R * (C + 1),
                 scale=want.abs().flatten(1).sum(1, keepdim=True), err_msg="sketch")
    for projector in (None, proj):  # the route chosen for the live positions: the same values
        routed = choose_route(f, projector)
        assert routed.n == N and (routed.factors if isinstance(routed, Reduced) else routed).positions == T - 3
        assert_close(routed.sq_norms(), want.square().sum((1, 2)), n=T + R * (C + 1), kappa=PRODUCT,
                     err_msg="sq norms (routed)")


def test_a_non_finite_column_factor_at_a_dropped_position_keeps_its_nan():
    f = _with_dead_positions(7)
    f.v[2, 4, 1] = float("inf")  # 0·inf = nan: example 2's true gradient (and autograd's) is nan
    assert f.live() is f
    red, total = f.reduced(None, summed=True)
    sq = red.sq_norms()
    assert torch.isnan(sq[2]) and torch.isfinite(sq[[0, 1, 3, 4, 5, 6]]).all() and torch.isnan(total).any()
    assert torch.isnan(choose_route(f, None).sq_norms()[2])
    g = _with_dead_positions(7)
    g.u[:, 3] = 0  # (positions 1–4 dead)
    g.u[5, 1, 2] = float("nan")  # a nan row factor is not zero: its position stays
    assert g.live().positions == 2 and torch.isnan(g.live().sq_norms()[5])
    g.u[5, 4, 0] = float("nan")  # (at the last position: nothing dropped)
    assert g.live() is g
    for values in ([float("nan")], [float("-inf")], [float("inf"), float("-inf")]):  # (a sum of ±inf is nan)
        h = _with_dead_positions(7)
        h.v[1, 2, : len(values)] = torch.tensor(values)
        assert h.live() is h
    h = _with_dead_positions(7)
    h.v[:, 1] = 3e38  # finite entries whose sum overflows: kept (a cost), and the gradients stay finite
    assert h.live() is h and torch.isfinite(h.reduced(None)[0].sq_norms()).all()


def test_dead_positions_are_kept_unless_the_middle_and_last_are_dead_and_they_are_at_least_half():
    """A causal LM's last position carries no gradient in any layer (its logits predict no label): one of T
    positions, too few to pay for copying the factors, so nothing is dropped; nor when the middle one is live."""
    f = _factors(9)
    u = f.u.clone()
    u[:, -1] = 0
    assert replace(f, u=u).live().u is u  # (the last position dead only: a causal LM)
    u[:, 2] = 0
    assert replace(f, u=u).live().u is u  # (the middle and the last dead, 2 of 5: fewer than half)
    u[:, 3] = 0
    assert replace(f, u=u).live().positions == 2  # (2, 3 and 4 dead: at least half)
    w = torch.zeros_like(f.u)
    w[:, 2] = f.u[:, 2]
    assert replace(f, u=w).live().u is w  # (all dead but the middle one: not looked for — a cost, never a value)


def test_all_positions_zero_keeps_one_and_gives_zero_gradients():
    f = _factors(8)
    f = replace(f, u=torch.zeros_like(f.u))
    live = f.live()
    assert live.positions == 1
    red, total = f.reduced(Projection.create(0, "w", (R, C), 16, "countsketch"), summed=True)
    assert torch.equal(red.sq_norms(), torch.zeros(N)) and torch.equal(total, torch.zeros(R, C))


def test_no_examples_or_no_rows_drop_nothing():
    for n, rows in ((0, R), (N, 0)):
        f = Factored(torch.zeros(n, T, rows), torch.randn(n, T, C))
        assert f.live() is f and choose_route(f, None).sq_norms().shape == (n,)


@pytest.mark.parametrize(("rows", "cols", "t"), [(R, C, T), (C, R, T), (R, C, 1), (C, R, 1), (R, C, 3), (C, R, 2)])
@pytest.mark.parametrize("kind", KINDS)
def test_both_orientations_and_one_position_match_the_oracle(monkeypatch, rows, cols, t, kind):
    """More rows than columns: the transposes are formed and a CountSketch scatters them with its transposed hash;
    one position: a broadcast product instead of the GEMM (bitwise the same values); up to
    FACTOR_REDUCTION_POSITIONS positions (T = 5 is above): the norms and the sum over examples from the factors."""
    monkeypatch.setattr(grads, "MATERIALISE_ELEMENTS", 3 * rows * cols)
    g = torch.Generator().manual_seed(11)
    f = Factored(torch.randn(N, t, rows, generator=g), torch.randn(N, t, cols, generator=g))
    proj = Projection.create(0, "w", (rows, cols), 16, kind)
    red, total = f.reduced(proj, summed=True)
    want = _oracle(f)
    scale = f.u.double().abs().transpose(1, 2) @ f.v.double().abs()  # Σ_t |u||v| per entry
    assert total.shape == (rows, cols) and total.is_contiguous()
    assert_close(red.sq_norms(), want.square().sum((1, 2)), n=t + rows * cols, kappa=PRODUCT, err_msg="sq norms")
    assert_close(total, want.sum(0), n=t + N, scale=scale.sum(0), err_msg="Σ_n G_n")
    assert_close(red.sketch(proj), proj.dense(want.float()).double(), n=t + rows * cols,
                 scale=scale.flatten(1).sum(1, keepdim=True).numpy(), err_msg="sketch")
    assert T > grads.FACTOR_REDUCTION_POSITIONS >= 3  # (the cases cover both sides of it)
    if t <= grads.FACTOR_REDUCTION_POSITIONS:  # (from the factors: the same with or without a sketch)
        without = f.reduced(None, summed=True)
        assert torch.equal(without[0].sq_norms(), red.sq_norms()) and torch.equal(without[1], total)
    dense = f.materialise().blocks[0]
    assert torch.equal(dense, torch.bmm(f.u.transpose(1, 2), f.v))  # (t = 1: one rounded product either way)
    if kind == "countsketch":
        mt = dense.transpose(1, 2).contiguous()
        assert_close(proj.dense_transposed(mt), proj.dense(dense).double(), n=rows * cols,
                     scale=dense.abs().flatten(1).sum(1, keepdim=True).double().numpy(), err_msg="transposed hash")
