"""Measured kernel costs and route choices: every route exact, the choice cached, the crossover where the model says."""

from __future__ import annotations

import math

import pytest
import torch
from gradcoh.logger import costs, ghost
from gradcoh.logger.grads import materialise_is_cheaper
from gradcoh.logger.ops import conv as conv_ops
from tolerance import assert_close
from torch import nn
from torch.func import functional_call, grad, vmap


def test_kernel_costs_are_measured_once_per_device(monkeypatch):
    cal = costs.Calibration()
    first = cal.kernel_costs(torch.device("cpu"), torch.float32)
    assert all(math.isfinite(v) and v > 0 for v in (first.gemm, first.scatter, first.fft))
    assert cal.kernel_costs(torch.device("cpu"), torch.float32) is first  # cached
    monkeypatch.setenv("GRADCOH_CALIBRATE", "0")
    assert costs.Calibration().kernel_costs(torch.device("cpu"), torch.float32) == costs.ONE_CPU_CORE


@pytest.mark.parametrize("positions", [2, 16, 64, 128])
def test_materialise_crossover_follows_the_cost_model(positions):
    """Factored (ghost norm f·T²(r+c), f: the Gram blocks' share) against materialised ((T+1)·r·c): the crossover."""
    c = costs.ONE_CPU_CORE
    t, rows = positions, 64
    f = ghost.gram_fraction(t)
    crossover = f * t * t * rows / ((t + 1) * rows - f * t * t)  # cols where f·T²(r+c) = (T+1)·r·c
    below, above = max(1, math.floor(crossover * 0.9)), math.ceil(crossover * 1.1) + 1
    if crossover <= 0:  # T² ≥ (T+1)·r: materialising always wins
        assert materialise_is_cheaper(4, t, rows, 8, 4, costs=c)
        return
    assert materialise_is_cheaper(4, t, rows, below, 4, costs=c)  # few columns: the batched GEMM is cheaper
    assert not materialise_is_cheaper(4, t, rows, above, 4, costs=c)  # many: the T×T Grams are


CONV_CASES = [  # (dims, C_in, C_out, groups, kernel, stride, dilation, padding[, input size])
    (2, 5, 5, 5, 3, 1, 1, 3), (2, 5, 5, 5, 3, 2, 1, 1), (2, 5, 5, 5, 3, 1, 2, 2), (2, 5, 5, 5, 3, 2, 2, 0),
    (2, 4, 8, 4, 3, 1, 1, 1),  # depthwise with a channel multiplier
    (2, 6, 4, 2, 3, 2, 1, 1),  # grouped, 3 input channels per group
    (2, 3, 4, 1, (2, 3), (2, 1), 1, (1, 0)),  # dense, non-square
    (2, 6, 4, 1, 1, 1, 1, 0), (2, 6, 4, 1, 1, 2, 1, 0),  # pointwise (the batched-GEMM route), strided
    (1, 4, 4, 4, 5, 2, 1, 2), (1, 3, 2, 1, 3, 1, 2, 1), (3, 2, 4, 2, 3, (1, 2, 1), 1, 1),
    (2, 6, 6, 6, 7, 1, 1, 3, (2, 3)), (2, 4, 8, 2, 5, 2, 1, 2, (3, 2)),  # padding wider than the map: padded first
    # depthwise on small maps (small_map_weight_grad): 2×2 under 5×5, strided 4×4 → 2×2, no padding, dilated 1-D,
    # 3-D, non-square kernel / stride / dilation, and one just above the pair limit
    (2, 6, 6, 6, 5, 1, 1, 2, (2, 2)), (2, 4, 4, 4, 5, 2, 1, 2, (4, 4)), (2, 5, 5, 5, 3, 1, 1, 0, (3, 3)),
    (1, 3, 3, 3, 3, 1, 2, 2, (4,)), (3, 2, 2, 2, 3, 1, 1, 1, (2, 2, 2)),
    (2, 4, 4, 4, (3, 2), (2, 1), (1, 2), (1, 1), (3, 4)), (2, 3, 3, 3, 3, 1, 1, 1, (3, 3)),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_every_conv_weight_gradient_route_matches_the_vmap_oracle(case):
    """The routes :func:`per_example_weight_grad` chooses between, each against the torch.func oracle."""
    nd, cin, cout, groups, kernel, stride, dilation, padding, *size = case
    torch.manual_seed(0)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][nd - 1](cin, cout, kernel, stride=stride, dilation=dilation,
                                                     padding=padding, groups=groups, bias=False).double()
    x = torch.randn(4, cin, *(size[0] if size else [9, 8, 7][:nd]), dtype=torch.float64)
    go = torch.randn_like(conv(x))

    def one(w, xi, gi):
        return (functional_call(conv, {"weight": w}, (xi.unsqueeze(0),)) * gi.unsqueeze(0)).sum()

    want = vmap(grad(one), in_dims=(None, 0, 0))(conv.weight.detach(), x, go).reshape(4, cout, -1)
    # float64 sums over the output positions, in two orders; each entry against Σ|x||δ| of its terms
    terms = vmap(grad(one), in_dims=(None, 0, 0))(conv.weight.detach(), x.abs(), go.abs()).reshape(4, cout, -1)
    n = 2 * go[0, 0].numel()
    pads = tuple(conv.padding)
    routes = {"grouped": lambda: conv_ops.grouped_weight_grad(conv, x, go, pads),
              "correlation": lambda: conv_ops.correlation_weight_grad(conv, x, go, pads),
              "chosen": lambda: conv_ops.per_example_weight_grad(conv, x, go, pads)}
    if all(k == 1 for k in conv.kernel_size) and not any(pads):
        routes["pointwise"] = lambda: conv_ops.pointwise_weight_grad(x, go, conv.stride)
    if groups == cin == cout and math.prod(x.shape[2:]) * math.prod(go.shape[2:]) <= conv_ops.SMALL_MAP_PAIRS:
        routes["small map"] = lambda: conv_ops.small_map_weight_grad(conv, x, go, pads)
    for name, route in routes.items():
        assert_close(route(), want, n=n, dtype="float64", scale=terms, err_msg=name)


def test_pointwise_conv_factors_are_views_of_the_input():
    """A kernel-1 convolution's column factor is its input viewed ``[n, T, C]``: no im2col copy at stride 1."""
    x = torch.randn(3, 4, 5, 6)
    a = conv_ops.unfold(x, (1, 1), (1, 1), (0, 0), (1, 1))
    assert a.data_ptr() == x.data_ptr()
    assert torch.equal(a, torch.nn.functional.unfold(x, 1).transpose(1, 2))
    strided = conv_ops.unfold(x, (1, 1), (1, 1), (0, 0), (2, 3))
    assert torch.equal(strided, torch.nn.functional.unfold(x, 1, stride=(2, 3)).transpose(1, 2))


@pytest.mark.parametrize(("cin", "groups", "kernel", "route"), [
    (6, 6, 3, "correlation_weight_grad"), (4, 2, 3, "grouped_weight_grad"), (3, 1, 3, "grouped_weight_grad"),
    (6, 1, 1, "pointwise_weight_grad"),
])
def test_conv_weight_gradient_route_is_chosen_from_the_shapes(monkeypatch, cin, groups, kernel, route):
    """Depthwise → correlation, other grouped/dense → the weight-gradient kernel, kernel 1 → bmm; no timing."""
    conv = nn.Conv2d(cin, 6, kernel, groups=groups, bias=False)
    x = torch.randn(2, cin, 5, 5)
    go = torch.randn_like(conv(x))
    _only(monkeypatch, route)
    got = conv_ops.per_example_weight_grad(conv, x, go, tuple(conv.padding))
    assert got.shape == (2, 6, cin // groups * kernel**2)


@pytest.mark.parametrize(("size", "kernel", "stride", "route"), [
    (2, 5, 1, "small_map_weight_grad"), (2, 7, 1, "small_map_weight_grad"), (4, 5, 2, "correlation_weight_grad"),
    (2, 3, 1, "correlation_weight_grad"), (4, 7, 1, "correlation_weight_grad"),
])
def test_depthwise_on_small_maps_takes_the_small_map_route_where_the_correlation_pads_first(monkeypatch, size, kernel,
                                                                                             stride, route):
    """Padding wider than the map and at most SMALL_MAP_PAIRS position pairs: the small-map route; no timing."""
    conv = nn.Conv2d(6, 6, kernel, stride=stride, padding=kernel // 2, groups=6, bias=False)
    x = torch.randn(2, 6, size, size)
    go = torch.randn_like(conv(x))
    _only(monkeypatch, route)
    got = conv_ops.per_example_weight_grad(conv, x, go, tuple(conv.padding))
    assert got.shape == (2, 6, kernel**2)


def _only(monkeypatch, route: str) -> None:
    """Every weight-gradient route but ``route`` fails the test when taken; so does timing."""
    for name in ("correlation_weight_grad", "grouped_weight_grad", "pointwise_weight_grad", "small_map_weight_grad"):
        if name != route:
            monkeypatch.setattr(conv_ops, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} taken"))
    monkeypatch.setattr(costs, "_seconds", lambda *a, **k: pytest.fail("timed"))
