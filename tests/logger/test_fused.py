"""Fused mode: Linear weight gradients summed from the per-example ones; statistics exact, .grad equal to rounding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gradcoh.logger import GradientLogger
from oracle import expected_stats, open_logged, per_example_grads_loop
from test_exact import Shared, sq_loss
from torch import nn


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_statistics_exact_and_grad_equal_to_rounding(reduction, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.LayerNorm(20), nn.Linear(20, 6))
    x, y = torch.randn(5, 7, 12), torch.randn(5, 7, 6)
    plain = copy.deepcopy(model)
    per = sq_loss(plain(x), y)
    (per.mean() if reduction == "mean" else per.sum()).backward()
    with GradientLogger(model, tmp_path / "s.zarr", fused=True, loss_reduction=reduction, alignment=True) as glog:
        with glog.record(0):
            per = sq_loss(model(x), y)
            (per.mean() if reduction == "mean" else per.sum()).backward()
        fused_ids = glog._recorder.fused
    assert {id(model[0].weight), id(model[3].weight)} == set(fused_ids)
    want, got = _grads(plain), _grads(model)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)  # rounding, not bitwise
    assert not torch.equal(got["0.weight"], want["0.weight"]) or not torch.equal(got["3.weight"], want["3.weight"])
    ds = open_logged(tmp_path / "s.zarr")
    sq, sums, _ = expected_stats(ds, per_example_grads_loop(model, sq_loss, x, y))
    np.testing.assert_allclose(ds.sq_norm.values[0], sq, rtol=1e-4)
    np.testing.assert_allclose(ds.sum_sq_norm.values[0], sums, rtol=1e-4)
    np.testing.assert_allclose(ds.alignment.values[0].sum(0), ds.sum_sq_norm.values[0], rtol=1e-5)
    assert bool(ds.reconciled.values.all())


def test_fused_falls_back_for_a_module_called_twice(tmp_path):
    torch.manual_seed(1)
    model = Shared()
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    plain = copy.deepcopy(model)
    sq_loss(plain(x), y).sum().backward()
    with GradientLogger(model, tmp_path / "s.zarr", fused=True, loss_reduction="sum") as glog:
        with glog.record(0):
            sq_loss(model(x), y).sum().backward()
    for k, g in _grads(plain).items():
        torch.testing.assert_close(_grads(model)[k], g, rtol=1e-5, atol=1e-6)
    ds = open_logged(tmp_path / "s.zarr")
    sq, _, _ = expected_stats(ds, per_example_grads_loop(model, sq_loss, x, y))
    np.testing.assert_allclose(ds.sq_norm.values[0], sq, rtol=1e-4)


def test_fused_off_by_default_and_unlogged_steps_untouched(tmp_path):
    torch.manual_seed(2)
    model = nn.Linear(3, 2)
    plain = copy.deepcopy(model)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    sq_loss(plain(x), y).mean().backward()
    with GradientLogger(model, tmp_path / "s.zarr", every=2, fused=True) as glog:
        assert glog.config.fused
        with glog.record(1):  # not logged: plain autograd, bitwise
            sq_loss(model(x), y).mean().backward()
    assert torch.equal(model.weight.grad, plain.weight.grad) and torch.equal(model.bias.grad, plain.bias.grad)
    assert not GradientLogger(model, tmp_path / "t.zarr", enabled=False).config.fused
    with pytest.raises(ValueError, match="fused"):
        GradientLogger(model, tmp_path / "u.zarr", fused="yes")


def test_second_derivative_through_a_fused_call_raises(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        with pytest.raises(RuntimeError, match=r"once_differentiable|twice"), glog.record(0):
            (g,) = torch.autograd.grad(model(x).sum(), model[0].weight, create_graph=True)
            g.sum().backward()
