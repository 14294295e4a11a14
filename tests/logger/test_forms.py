"""Per-parameter forms: cross terms, rank-one probes, splitting and folding against materialised matrices."""

from __future__ import annotations

import itertools

import pytest
import torch
from gradcoh.logger.grads import Composite, Dense, Factored, MatrixView, as_dense, bilinear, fold, inner, split_params

N, T, R, C = 3, 4, 5, 6


def forms():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(N, T, R, generator=g, dtype=torch.float64)
    v = torch.randn(N, T, C, generator=g, dtype=torch.float64)
    idx = torch.randint(0, R, (N, T + 1), generator=g)
    v2 = torch.randn(N, T + 1, C, generator=g, dtype=torch.float64)
    return {
        "factored": Factored(u, v),
        "indexed": Factored(None, v2, rows_index=idx, n_rows=R),
        "dense": Dense(torch.randn(N, R, C, generator=g, dtype=torch.float64)),
        "factored_short": Factored(u[:, :2], v[:, :2]),
    }


@pytest.mark.parametrize("a,b", list(itertools.combinations_with_replacement(sorted(forms()), 2)))
def test_inner_equals_materialised_inner_product(a, b):
    fa, fb = forms()[a], forms()[b]
    want = (as_dense(fa).m * as_dense(fb).m).sum((1, 2))
    torch.testing.assert_close(inner(fa, fb), want)
    torch.testing.assert_close(inner(fb, fa), want)


@pytest.mark.parametrize("name", sorted(forms()))
def test_bilinear_equals_dense_rank_one_products(name):
    f = forms()[name]
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(R, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    want = torch.einsum("nrc,r,c->n", as_dense(f).m, left, right)
    torch.testing.assert_close(bilinear(f, left, right), want)


def test_split_params_of_linear_with_bias_and_composite():
    u, v = torch.randn(N, T, R, dtype=torch.float64), torch.randn(N, T, C, dtype=torch.float64)
    view = MatrixView.of([(R, C), (R,)])
    parts = split_params(Factored(u, v, bias=True), view)
    full = as_dense(Factored(u, v, bias=True)).m  # [n, R, C+1]
    torch.testing.assert_close(as_dense(parts[0]).m, full[:, :, :C])
    torch.testing.assert_close(as_dense(parts[1]).m, full[:, :, C:])
    comp = Composite([(Dense(torch.randn(N, 7, 1, dtype=torch.float64)), MatrixView.of([(7,)])),
                      (Factored(u, v), MatrixView.of([(R, C)]))])
    pieces = split_params(comp, MatrixView.of([(7,), (R, C)]))
    assert [tuple(p.m.shape) if isinstance(p, Dense) else "factored" for p in pieces] == [(N, 7, 1), "factored"]


def test_fold_sums_rows_of_each_example():
    u, v = torch.randn(N * 2, T, R, dtype=torch.float64), torch.randn(N * 2, T, C, dtype=torch.float64)
    folded = fold(Factored(u, v), 2)
    want = as_dense(Factored(u, v)).m.reshape(N, 2, R, C).sum(1)
    torch.testing.assert_close(as_dense(folded).m, want)
    torch.testing.assert_close(fold(Dense(as_dense(Factored(u, v)).m), 2).m, want)
