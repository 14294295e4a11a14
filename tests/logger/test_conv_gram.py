"""Convolution ghost norms through the input map's Gram (gradcoh.logger.ops.conv.Patches / PatchFactored).

The patches' Gram and the guard's patch products are checked against the formed im2col patches in float64 for every
geometry; whole logged steps of CNNs whose convolutions take the route against the float64 per-example loop, with
the guard on every step, sketches (which read the patches) and a module called twice.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradcoh.logger.ops import conv as conv_ops
from oracle import per_example_grads_loop
from test_exact import check_step, run_logged, target_for
from tolerance import PRODUCT, assert_close, assert_sketch_sum, chain_length, model_size
from torch import nn

GEOMETRIES = [  # (dims, C_in, kernel, stride, dilation, padding, input size)
    (2, 3, 3, 1, 1, 1, (6, 5)), (2, 3, 3, 2, 1, 1, (7, 6)), (2, 3, 3, 1, 2, 2, (8, 7)), (2, 2, 3, 1, 1, 0, (5, 5)),
    (2, 3, (2, 3), (2, 1), 1, (1, 0), (6, 7)), (1, 3, 3, 1, 2, 1, (9,)), (1, 2, 5, 2, 1, 2, (11,)),
    (3, 2, 3, (1, 2, 1), 1, 1, (5, 6, 4)),
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_patch_gram_and_products_match_the_formed_patches(geometry):
    nd, cin, kernel, stride, dilation, padding, size = geometry
    torch.manual_seed(0)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][nd - 1](cin, 4, kernel, stride=stride, dilation=dilation,
                                                     padding=padding).double()
    x = torch.randn(3, cin, *size, dtype=torch.float64)
    out = conv(x).shape[2:]
    patches = conv_ops.Patches(x, tuple(conv.kernel_size), tuple(conv.dilation), tuple(conv.padding),
                               tuple(conv.stride), tuple(out))
    a = torch.nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2) \
        if nd == 2 else patches.unfold()
    assert a.shape == (3, math.prod(out), patches.cols)
    want = torch.bmm(a, a.transpose(1, 2))
    scale = torch.bmm(a.abs(), a.abs().transpose(1, 2))  # Σ|a_t||a_s| over the columns
    assert_close(patches.gram(), want, n=patches.cols, kappa=PRODUCT, dtype="float64", scale=scale)
    b = torch.randn(patches.cols, dtype=torch.float64)
    assert_close(patches.columns_dot(b), a @ b, n=patches.cols, dtype="float64", scale=a.abs() @ b.abs())


class WideCNN(nn.Module):
    """Convolutions with many channels on small maps (ResNet's layer2–4 shapes, scaled down): the map route."""

    def __init__(self, c: int = 48) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")  # padded explicitly first
        self.c = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.shared = nn.Conv2d(c, c, 3, padding=1)  # called twice: its positions are concatenated
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.tanh(self.a(h))
        h = torch.tanh(self.b(h)) + h
        h = torch.tanh(self.c(h))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.head(h.mean((2, 3)))


@pytest.fixture
def counted_map_route(monkeypatch):
    """Counts the ghost norms through the map's Gram, the guard products as convolutions, the patches formed."""
    calls = {"gram": 0, "columns_dot": 0, "unfold": 0}
    for name in calls:
        original = getattr(conv_ops.Patches, name)

        def counting(self, *a, _name=name, _original=original, **k):
            calls[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(conv_ops.Patches, name, counting)
    return calls


def test_map_route_statistics_match_the_loop_oracle(tmp_path, counted_map_route):
    torch.manual_seed(3)
    model = WideCNN()
    x = torch.randn(5, 3, 8, 8)
    y = target_for(model, x)
    ds = run_logged(model, [[(x, y)], [(x[:3], y[:3])]], tmp_path / "s.zarr", guard_every=1)
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)
    check_step(ds, 1, model, x[:3], y[:3], oracle=per_example_grads_loop)
    # (the guard ran on every layer at both steps with on_mismatch="raise": a wrong product would have raised)
    # a, b, c each step (the shared module's concatenated positions form their patches: the plain route)
    assert counted_map_route["gram"] >= 6
    assert counted_map_route["columns_dot"] >= 6  # the guard checked them without forming the patches


def test_map_route_sketches_sum_to_the_projected_batch_gradient(tmp_path, counted_map_route):
    from gradcoh.logger import GradientLogger
    from oracle import open_logged

    torch.manual_seed(4)
    model = WideCNN()
    x = torch.randn(4, 3, 8, 8)
    y = target_for(model, x)
    with GradientLogger(model, tmp_path / "s.zarr", sketch_dim=64, sketch_dtype="float32",
                        loss_reduction="sum") as glog:
        with glog.record(0):
            ((model(x) - y) ** 2).sum().backward()
        projected = {name: v.numpy() for name, v in glog.project_grad().items()}
    ds = open_logged(tmp_path / "s.zarr", "batch")
    n = chain_length(model, positions=8 * 8) + model_size(model)
    for i, name in enumerate(ds.layer.values):
        assert_sketch_sum(ds.sketch.values[0, :, i], projected[str(name)], n=n, err_msg=str(name))
    assert counted_map_route["unfold"] >= 3  # a, b, c: the CountSketch materialised them from the unformed patches


def test_map_route_is_chosen_from_the_shapes():
    """ResNet-18 at 64 px: stride-1 3×3 convolutions of layer2–4 take it; layer1's materialise, strided ones do not."""

    def route(c_in, c_out, size, stride):
        x = torch.empty(32, c_in, size, size)
        out = (size + 2 - 3) // stride + 1
        p = conv_ops.Patches(x, (3, 3), (1, 1), (1, 1), (stride, stride), (out, out))
        return p.map_route(c_out)

    assert route(128, 128, 8, 1) and route(256, 256, 4, 1) and route(512, 512, 2, 1)
    assert not route(64, 128, 16, 2)  # the map's Gram of the 16×16 input costs more than the 8×8 patches'
    assert not route(3, 8, 8, 1)  # few channels: forming the patches is cheaper
    one = conv_ops.Patches(torch.empty(2, 64, 4, 4), (1, 1), (1, 1), (0, 0), (1, 1), (4, 4))
    assert not one.map_route(64)  # kernel 1: the patches are the input itself


@pytest.mark.parametrize(("size", "freeze", "fused"), [
    (4, None, True), (4, "weight", True), (4, "bias", True), (3, None, False),  # 9 positions: normalise and sum
])
def test_eval_batchnorm_module_rule_against_loop(tmp_path, monkeypatch, size, freeze, fused):
    """``nn.BatchNorm2d`` in eval mode (ResNet's): one batch-norm backward over (example, channel) pairs."""
    from gradcoh.logger.ops import norm

    calls = []
    real = norm.running_affine
    monkeypatch.setattr(norm, "running_affine", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():  # running statistics far from 0/1, and a mean offset larger than the spread
        bn.running_mean.copy_(torch.randn(6) * 3)
        bn.running_var.copy_(torch.rand(6) + 0.5)
        bn.weight.copy_(torch.randn(6))
        bn.bias.copy_(torch.randn(6))
    if freeze:
        getattr(bn, freeze).requires_grad_(False)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), bn, nn.Tanh(), nn.Flatten(), nn.Linear(6 * size * size, 2))
    model.eval()
    x = torch.randn(5, 2, size, size)
    y = target_for(model, x)
    ds = run_logged(model, [[(x, y)]], tmp_path / "s.zarr", guard_every=1)
    assert bool(calls) == fused
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)
