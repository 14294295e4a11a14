"""Measured kernel costs and route choices: every route exact, the choice cached, the crossover where the model says."""

from __future__ import annotations

import math

import pytest
import torch
from gradcoh.logger import costs
from gradcoh.logger.grads import materialise_is_cheaper
from gradcoh.logger.layers import _depthwise_weight_grad, _grouped_weight_grad
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


def test_fastest_times_each_route_once_then_reuses_the_choice(monkeypatch):
    cal = costs.Calibration()
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        torch.randn(300, 300) @ torch.randn(300, 300)
        return "slow"

    def fast():
        calls["fast"] += 1
        return "fast"

    assert cal.fastest("k", torch.device("cpu"), [slow, fast]) == "fast"
    before = dict(calls)
    assert cal.fastest("k", torch.device("cpu"), [slow, fast]) == "fast"
    assert calls["slow"] == before["slow"] and calls["fast"] == before["fast"] + 1  # no timing the second time
    monkeypatch.setenv("GRADCOH_CALIBRATE", "0")
    assert costs.Calibration().fastest("k", torch.device("cpu"), [slow, fast]) == "slow"  # the first route


@pytest.mark.parametrize("positions", [2, 16, 64])
def test_materialise_crossover_follows_the_cost_model(positions):
    """Factored (ghost norm, T²(r+c)) against materialised ((T+1)·r·c): the choice flips where the costs cross."""
    c = costs.ONE_CPU_CORE
    t, rows = positions, 64
    crossover = t * t * rows / ((t + 1) * rows - t * t)  # cols where T²(r+c) = (T+1)·r·c
    below, above = max(1, math.floor(crossover * 0.9)), math.ceil(crossover * 1.1) + 1
    if crossover <= 0:  # T² ≥ (T+1)·r: materialising always wins
        assert materialise_is_cheaper(4, t, rows, 8, 4, costs=c)
        return
    assert materialise_is_cheaper(4, t, rows, below, 4, costs=c)  # few columns: the batched GEMM is cheaper
    assert not materialise_is_cheaper(4, t, rows, above, 4, costs=c)  # many: the T×T Grams are


@pytest.mark.parametrize(("stride", "dilation", "padding"), [(1, 1, 3), (2, 1, 1), (1, 2, 2), (2, 2, 0)])
def test_both_depthwise_routes_match_the_vmap_oracle(stride, dilation, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 5, 3, stride=stride, dilation=dilation, padding=padding, groups=5, bias=False).double()
    x = torch.randn(4, 5, 9, 9, dtype=torch.float64)
    go = torch.randn_like(conv(x))

    def one(w, xi, gi):
        return (functional_call(conv, {"weight": w}, (xi.unsqueeze(0),)) * gi.unsqueeze(0)).sum()

    want = vmap(grad(one), in_dims=(None, 0, 0))(conv.weight.detach(), x, go).reshape(4, 5, -1)
    # float64 sums over the output positions, in two orders; each entry against Σ|x||δ| of its terms
    terms = vmap(grad(one), in_dims=(None, 0, 0))(conv.weight.detach(), x.abs(), go.abs()).reshape(4, 5, -1)
    n = 2 * go.shape[-1] * go.shape[-2]
    pads = (padding, padding)
    for route in (_depthwise_weight_grad, _grouped_weight_grad):
        assert_close(route(conv, x, go, pads), want, n=n, dtype="float64", scale=terms, err_msg=route.__name__)
