"""Fused mode: which calls it takes over is a fixed function of the shapes (gradcoh.logger.fused)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from gradcoh.logger.fused import call_is_fused, conv_arguments, fused_is_cheaper
from gradcoh.logger.grads import Dense, Factored
from oracle import assert_stats, open_logged, per_example_grads_loop
from test_exact import sq_loss
from tolerance import chain_length
from torch import nn

pytestmark = pytest.mark.usefixtures("unguarded")  # a layer the guard checks is not fused at that step (conftest)


@pytest.mark.parametrize(("shape", "want"), [
    ((8, 128, 256, 256), True),  # Llama q_proj: materialising costs about the ghost norm, and spares the GEMM
    ((16, 65, 576, 192), True),  # a ViT qkv
    ((32, 256, 64, 576), True),  # ResNet-18 layer1 conv
    ((32, 4, 512, 4608), False),  # ResNet-18 layer4 conv: n·rows·cols = 75 M floats to form, against T = 4
    ((32, 1, 256, 256), False),  # one position: the factored route is two vectors
])
def test_the_cost_model_picks_what_the_kernels_measured(shape, want):
    n, t, rows, cols = shape
    assert fused_is_cheaper(n, t, rows, cols, 4) is want


@pytest.mark.parametrize(("x_shape", "conv"), [
    ((4, 3, 16, 16), nn.Conv2d(3, 8, 3, padding=1)),
    ((4, 8, 17, 15), nn.Conv2d(8, 16, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(1, 2))),
    ((2, 4, 33), nn.Conv1d(4, 6, 5, stride=4)),
    ((4, 16, 8, 8), nn.Conv2d(16, 512, 3, stride=2, padding=1)),
])
def test_a_convolution_is_judged_by_its_output_positions(x_shape, conv):
    x = torch.randn(x_shape)
    out = conv(x)
    n = x.shape[0]
    positions = out[0, 0].numel()
    func = {2: F.conv2d, 1: F.conv1d}[x.dim() - 2]
    args = conv_arguments(func, (x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups), {})
    want = fused_is_cheaper(n, positions, conv.weight.shape[0], conv.weight[0].numel() + 1, 4)
    assert call_is_fused(n, x, conv.weight, conv.bias, args, level=True) is want


def test_grouped_convolutions_and_linears_by_positions():
    w = torch.randn(8, 1, 3, 3)
    x = torch.randn(2, 8, 6, 6)
    args = conv_arguments(F.conv2d, (x, w, None, 1, 1, 1, 8), {})
    assert call_is_fused(2, x, w, None, args, level=True)  # depthwise: materialised anyway
    lin = torch.randn(256, 256)
    assert not call_is_fused(8, torch.randn(8, 256), lin, None, level=True)
    assert call_is_fused(8, torch.randn(8, 128, 256), lin, None, level=True)


def test_one_position_layers_keep_autograds_op_bitwise(tmp_path):
    """In fused mode an MLP (one position per example) is not fused: .grad is bitwise a plain step's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    plain = copy.deepcopy(model)
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    F.cross_entropy(plain(x), y).backward()
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        with glog.record(0):
            F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_many_position_layers_are_fused(tmp_path):
    """A Linear over 32 positions per example is fused: its .grad is summed from the per-example ones
    (another order of the same sums: not bitwise; test_fused.py bounds the difference)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 4))
    plain = copy.deepcopy(model)
    x, y = torch.randn(6, 32, 12), torch.randn(6, 32, 4)
    ((plain(x) - y) ** 2).mean().backward()
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        with glog.record(0):
            ((model(x) - y) ** 2).mean().backward()
    assert not torch.equal(model[0].weight.grad, plain[0].weight.grad) or not torch.equal(
        model[2].weight.grad, plain[2].weight.grad)


def test_in_place_op_after_a_fused_linear_on_3d_input(tmp_path):
    """F.linear on 3-D input returns a view; the fused Function returns a copy, so ReLU(inplace=True) after it works
    and the statistics stay exact against the per-example oracle."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
    x, y = torch.randn(4, 12, 5), torch.randn(4, 12, 3)
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        with glog.record(0):
            sq_loss(model(x), y).mean().backward()
        fused_ids = glog._recorder.fused
    assert id(model[0].weight) in fused_ids
    ds = open_logged(tmp_path / "s.zarr")
    assert_stats(ds, 0, per_example_grads_loop(model, sq_loss, x, y), n=chain_length(model, positions=x.shape[1]),
                 what="in-place after fused")
    assert bool(ds.reconciled.values.all())


def _count_fused_calls(monkeypatch):
    """Weights of the calls that run through a fused Function (spies on gradcoh.logger.uses)."""
    from gradcoh.logger import uses as uses_module

    seen = []
    real_linear, real_conv = uses_module._apply_fused_linear, uses_module.FusedConv

    def linear(slot, x, weight, *args, **kwargs):
        seen.append(id(weight))
        return real_linear(slot, x, weight, *args, **kwargs)

    class Conv:
        @staticmethod
        def apply(x, weight, *args):
            seen.append(id(weight))
            return real_conv.apply(x, weight, *args)

    monkeypatch.setattr(uses_module, "_apply_fused_linear", linear)
    monkeypatch.setattr(uses_module, "FusedConv", Conv)
    return seen


def test_non_reentrant_checkpointing_keeps_autograds_op_inside(tmp_path, monkeypatch):
    """Inside a non-reentrant checkpoint the recomputation in the backward must save what the forward saved: fused
    mode leaves those calls to autograd (bitwise .grad) and fuses the calls outside; statistics stay exact."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(4, 24, 6), torch.randn(4, 24, 3)

    def forward(m, x):
        h = m[1](m[0](x))
        h = checkpoint(lambda h: m[3](m[2](h)), h, use_reentrant=False)
        return m[4](h)

    plain = copy.deepcopy(model)
    sq_loss(forward(plain, x), y).mean().backward()
    seen = _count_fused_calls(monkeypatch)
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        with glog.record(0):
            sq_loss(forward(model, x), y).mean().backward()
    assert id(model[0].weight) in seen and id(model[4].weight) in seen and id(model[2].weight) not in seen
    assert torch.equal(model[2].weight.grad, plain[2].weight.grad)
    ds = open_logged(tmp_path / "s.zarr")
    assert_stats(ds, 0, per_example_grads_loop(model, sq_loss, x, y),  # (the same function without checkpoint)
                 n=chain_length(model, positions=x.shape[1]), what="checkpointed")
    assert bool(ds.reconciled.values.all())


def test_autocast_convolution_keeps_autograds_op(tmp_path, monkeypatch):
    """Under bf16 autocast fused mode leaves convolutions and Linears to autograd (the fused Function would save the
    float32 inputs and meet a bf16 output gradient): the step runs, .grad is bitwise a plain autocast step's."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 3))
    x, y = torch.randn(6, 3, 16, 16), torch.randn(6, 3)
    plain = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain(x)
    sq_loss(out.float(), y).mean().backward()
    seen = _count_fused_calls(monkeypatch)
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        assert call_is_fused(6, x, model[0].weight, model[0].bias, conv_arguments(
            F.conv2d, (x, model[0].weight, model[0].bias, 1, 1, 1, 1), {}), level=True)  # fused without autocast
        with glog.record(0):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            sq_loss(out.float(), y).mean().backward()
    assert not seen
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    assert bool(open_logged(tmp_path / "s.zarr").finite.values.all())


def _linear_stack():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 160), nn.Tanh(), nn.Linear(160, 160), nn.Tanh(),
                         nn.Linear(160, 3))


@pytest.mark.parametrize("sketch_dim", [0, 16, 64])
def test_auto_fuses_exactly_what_the_unfused_route_materialises(sketch_dim, tmp_path, monkeypatch):
    """Level "auto" (the default): the calls fused at the forward are exactly those whose per-example weight
    gradients the unfused step materialises (the rule's Dense or choose_route's choice with the weight's sketch
    projection), with the kernel costs both weigh fixed to SKETCH_COSTS and the fixed-cost threshold at 0; every
    fused slot is filled; the projection kinds are those of an unfused run; .grad equals the plain step's to the
    rounding of the fused sums, every other .grad bitwise; statistics exact against the float64 loop."""
    from fused_grads import assert_training_grads, weight_grad_terms
    from gradcoh.logger import grads as grads_module
    from gradcoh.logger import tracker as tracker_module
    from gradcoh.logger.costs import SKETCH_COSTS

    monkeypatch.setattr("gradcoh.logger.fused.spares_enough", lambda *shape: True)
    monkeypatch.setattr(grads_module, "kernel_costs", lambda device, dtype: SKETCH_COSTS)
    x, y = torch.randn(5, 40, 6), torch.randn(5, 40, 3)
    real_route, real_fill = grads_module.choose_route, tracker_module.fill_slot
    runs = {}
    for level in (False, "auto"):
        model = _linear_stack()
        materialised, filled = set(), []

        def route(grad, projector, materialised=materialised):
            out = real_route(grad, projector)
            if isinstance(out, Dense) and isinstance(grad, Factored) and grad.u is not None:
                materialised.add((grad.n_rows, grad.n_cols))
            return out

        def fill(grad, slot, projector=None, filled=filled):
            out = real_fill(grad, slot, projector)
            filled.append(slot.weight_grad is not None)
            return out

        monkeypatch.setattr(tracker_module, "choose_route", route)
        monkeypatch.setattr(tracker_module, "fill_slot", fill)
        with GradientLogger(model, tmp_path / f"{level}.zarr", fused=level, sketch_dim=sketch_dim) as glog:
            with glog.record(0):
                sq_loss(model(x), y).mean().backward()
            kinds = {n: p.kind for t in glog.trackers for n, p in zip(t.plan.param_names, t.projectors,
                                                                      strict=True) if p is not None}
        runs[level] = (model, materialised, filled, kinds)
    unfused_materialised = runs[False][1]
    model, left, filled, kinds = runs["auto"]
    assert len(filled) == len(unfused_materialised) and all(filled)  # fused exactly those, every slot filled
    assert not left  # (the fused ones reach the route materialised already: none left to materialise)
    assert kinds == runs[False][3]
    plain = _linear_stack()
    terms = weight_grad_terms(plain, lambda: sq_loss(plain(x), y).mean().backward())
    fused_ids = {id(m.weight) for m in model if isinstance(m, nn.Linear)
                 and (m.out_features, m.in_features) in unfused_materialised}
    assert_training_grads(model, plain, fused_ids, terms, "auto")
    assert_training_grads(runs[False][0], plain, set(), terms, "off")  # fused=False: every .grad bitwise
    if sketch_dim == 0:
        assert (12, 6) in unfused_materialised and (160, 160) not in unfused_materialised  # ghost norm 8× cheaper
    ds = open_logged(tmp_path / "auto.zarr")
    assert_stats(ds, 0, per_example_grads_loop(model, sq_loss, x, y), n=chain_length(model, positions=40),
                 what="auto")


def test_auto_skips_calls_whose_gemm_does_not_pay_the_fused_call():
    """"auto" fuses a call materialised anyway only where the GEMM it spares, n·T·rows·cols multiply-adds at
    SKETCH_COSTS.gemm, reaches FUSED_CALL_NS plus the slot's sum, n·rows·cols elements at FUSED_SUM_NS (True and
    False ignore it): a small depthwise convolution is refused by the fixed cost, a large one fused; a Linear whose
    CountSketch materialises it is refused at T = 4 (the sum costs more than the GEMM) and fused at T = 64."""
    from gradcoh.logger.costs import FUSED_CALL_NS, FUSED_SUM_NS, SKETCH_COSTS

    def pays(n, t, rows, cols):
        return SKETCH_COSTS.gemm * n * t * rows * cols >= FUSED_CALL_NS + FUSED_SUM_NS * n * rows * cols

    w = torch.randn(64, 1, 3, 3)
    small, big = torch.randn(2, 64, 8, 8), torch.randn(32, 64, 32, 32)
    assert not pays(2, 64, 64, 9) and pays(32, 1024, 64, 9)
    for x, want in ((small, False), (big, True)):
        args = conv_arguments(F.conv2d, (x, w, None, 1, 1, 1, 64), {})
        assert call_is_fused(x.shape[0], x, w, None, args) is want
        assert call_is_fused(x.shape[0], x, w, None, args, level=True)
        assert not call_is_fused(x.shape[0], x, w, None, args, level=False)
    x = big.requires_grad_()  # its backward forms the weight gradient with the input's: nothing to spare
    assert not call_is_fused(32, x, w, None, conv_arguments(F.conv2d, (x, w, None, 1, 1, 1, 64), {}))
    lin, bias = torch.randn(1280, 320), torch.randn(1280)
    seen = []

    def countsketch(weight, form):
        seen.append(form)
        return "countsketch", 256

    assert not pays(32, 4, 1280, 321) and pays(32, 64, 1280, 321)
    assert not call_is_fused(32, torch.randn(32, 4, 320), lin, bias, sketch=countsketch)
    assert call_is_fused(32, torch.randn(32, 64, 320), lin, bias, sketch=countsketch)
    assert seen == [("factored", 64)]  # the sketch's kind asked for with the rule's form (after the cost check)
    assert not call_is_fused(32, torch.randn(32, 64, 320), lin, bias)  # exact: the ghost norm, not materialised


def test_auto_fuses_a_first_convolution_and_runs_interior_ones_as_they_are(tmp_path, monkeypatch):
    """Through the logger at level "auto": a first convolution (its input an image, no gradient) whose per-example
    gradients its rule materialises runs through FusedConv; the convolutions whose input needs a gradient run as
    the model calls them (never bound nor weighed: gradcoh.logger.uses). .grad of the fused stem equals the plain
    step's to rounding, the others bitwise; statistics exact against the float64 loop."""
    from fused_grads import assert_training_grads, weight_grad_terms
    from gradcoh.logger import fused as fused_module
    from gradcoh.logger import uses as uses_module

    monkeypatch.setattr(fused_module, "spares_enough", lambda *shape: True)

    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),
                             nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 12 * 12, 5))

    x, y = torch.randn(4, 3, 12, 12), torch.randn(4, 5)
    model, plain = make(), make()
    applied = []
    real_apply = fused_module.FusedConv.apply
    monkeypatch.setattr(fused_module.FusedConv, "apply",
                        lambda *a: applied.append(a[1]) or real_apply(*a))
    bound = []
    real_bind = uses_module.conv_arguments
    monkeypatch.setattr(uses_module, "conv_arguments", lambda f, a, k: bound.append(a[1]) or real_bind(f, a, k))
    with GradientLogger(model, tmp_path / "s.zarr") as glog:
        with glog.record(0):
            sq_loss(model(x), y).mean().backward()
    assert [id(w) for w in applied] == [id(model[0].weight)]
    assert [id(w) for w in bound] == [id(model[0].weight)]  # interior convolutions: not even bound
    terms = weight_grad_terms(plain, lambda: sq_loss(plain(x), y).mean().backward())
    assert_training_grads(model, plain, {id(model[0].weight)}, terms, "auto")
    ds = open_logged(tmp_path / "s.zarr")
    assert_stats(ds, 0, per_example_grads_loop(model, sq_loss, x, y), n=chain_length(model, positions=144),
                 what="auto conv")
