"""Fused mode: Linear weight gradients summed from the per-example ones; statistics exact, .grad equal to rounding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fused_grads import assert_training_grads, weight_grad_terms
from gradcoh.logger import GradientLogger
from oracle import assert_stats, open_logged, per_example_grads_loop
from test_exact import Shared, sq_loss
from tolerance import PRODUCT, assert_close, chain_length, sum_scale
from torch import nn


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _weight_grad_terms(model, run):
    """{Linear weight name: Σ_{i,t} |δ_it| |x_it|ᵀ}: the size of the terms each weight-gradient entry sums."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def keep(m, args, out, name=name):
                seen[name] = [args[0].detach()]
                out.register_hook(lambda g: seen[name].append(g.detach()))

            hooks.append(mod.register_forward_hook(keep))
    run()
    for h in hooks:
        h.remove()
    return {f"{name}.weight": torch.einsum("...o,...f->of", go.abs().double(), x.abs().double())
            for name, (x, go) in seen.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.usefixtures("unguarded")
def test_fused_statistics_exact_and_grad_equal_to_rounding(reduction, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.LayerNorm(20), nn.Linear(20, 6))
    x, y = torch.randn(5, 7, 12), torch.randn(5, 7, 6)
    plain = copy.deepcopy(model)

    def step():
        per = sq_loss(plain(x), y)
        (per.mean() if reduction == "mean" else per.sum()).backward()

    terms = _weight_grad_terms(plain, step)
    with GradientLogger(model, tmp_path / "s.zarr", fused=True, loss_reduction=reduction, alignment=True) as glog:
        with glog.record(0):
            per = sq_loss(model(x), y)
            (per.mean() if reduction == "mean" else per.sum()).backward()
        fused_ids = glog._recorder.fused
    assert {id(model[0].weight), id(model[3].weight)} == set(fused_ids)
    want, got = _grads(plain), _grads(model)
    for k in want:  # fused weights: the same 5·7 terms summed in another order (both rounded); the rest bitwise
        if k in terms:
            assert_close(got[k], want[k], n=2 * x.shape[0] * x.shape[1], scale=terms[k], err_msg=f"fused .grad {k}")
        else:
            assert torch.equal(got[k], want[k]), k
    assert not torch.equal(got["0.weight"], want["0.weight"]) or not torch.equal(got["3.weight"], want["3.weight"])
    ds = open_logged(tmp_path / "s.zarr")
    n = chain_length(model, positions=x.shape[1])
    assert_stats(ds, 0, per_example_grads_loop(model, sq_loss, x, y), n=n, what="fused")
    norms = np.sqrt(ds.sq_norm.values[0])  # Σ_i g_i·G and ‖G‖², both float32, against (Σ_i ‖g_i‖)²
    assert_close(ds.alignment.values[0].sum(0), ds.sum_sq_norm.values[0], n=2 * (n + x.shape[0]), kappa=PRODUCT,
                 scale=sum_scale(norms, axis=0), err_msg="Σ alignment = sum_sq_norm")
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
    for k, g in _grads(plain).items():  # the shared module falls back to plain autograd: bitwise
        assert torch.equal(_grads(model)[k], g), k
    ds = open_logged(tmp_path / "s.zarr")
    assert_stats(ds, 0, per_example_grads_loop(model, sq_loss, x, y), n=2 * chain_length(model, positions=1),
                 what="shared")  # the module runs twice: its chain counts twice


def test_fused_auto_by_default_and_unlogged_steps_untouched(tmp_path):
    torch.manual_seed(2)
    model = nn.Linear(3, 2)
    plain = copy.deepcopy(model)
    x, y = torch.randn(4, 5, 3), torch.randn(4, 5, 2)  # 5 positions: a fused call on logged steps
    sq_loss(plain(x), y).mean().backward()
    assert GradientLogger(model, tmp_path / "d.zarr", enabled=False).config.fused == "auto"
    with GradientLogger(model, tmp_path / "s.zarr", every=2, fused=True) as glog:
        assert glog._recorder.fused == {id(model.weight)}
        with glog.record(1):  # not logged: plain autograd, bitwise
            sq_loss(model(x), y).mean().backward()
    assert torch.equal(model.weight.grad, plain.weight.grad) and torch.equal(model.bias.grad, plain.bias.grad)
    with pytest.raises(ValueError, match="fused"):
        GradientLogger(model, tmp_path / "u.zarr", fused="yes")


@pytest.mark.usefixtures("unguarded")
def test_second_derivative_through_a_fused_call_raises(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 7, 3)  # 7 positions: the cost model fuses these calls (T = 1 calls keep autograd's op)
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        with pytest.raises(RuntimeError, match=r"fused mode: a backward pass with create_graph=True"), glog.record(0):
            (g,) = torch.autograd.grad(model(x).sum(), model[0].weight, create_graph=True)
            g.sum().backward()


def _conv_weight_grad_terms(model, run):
    """{conv weight name: Σ_{n,t} |δ_nt| |patch_nt|ᵀ} (the size of the terms of each weight-gradient entry) and the
    number of terms n·T per entry."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and not isinstance(mod.padding, str):
            def keep(m, args, out, name=name):
                seen[name] = [m, args[0].detach()]
                out.register_hook(lambda g: seen[name].append(g.detach()))

            hooks.append(mod.register_forward_hook(keep))
    run()
    for h in hooks:
        h.remove()
    out = {}
    for name, (m, x, go) in seen.items():
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode) if m.padding_mode != "zeros" else x
        pad = 0 if m.padding_mode != "zeros" else m.padding
        terms = torch.nn.grad.conv2d_weight(x.abs().double(), m.weight.shape, go.abs().double(), m.stride, pad,
                                            m.dilation, m.groups)
        out[f"{name}.weight"] = (terms, x.shape[0] * go.shape[2] * go.shape[3])
    return out


@pytest.mark.usefixtures("unguarded")
def test_fused_convolutions_grad_equal_to_rounding(tmp_path):
    """Convolutions whose per-example gradients are materialised supply their weight gradient: .grad equals plain
    autograd's to the rounding of n·T-term sums (the same terms in another order), statistics stay exact, the guard
    reconciles; a convolution with string padding ('same') is not fused and stays bitwise."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False, padding_mode="reflect"), nn.Tanh(),
                          nn.Conv2d(8, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x, y = torch.randn(6, 3, 16, 16), torch.randn(6, 5)
    plain = copy.deepcopy(model)
    terms = _conv_weight_grad_terms(plain, lambda: sq_loss(plain(x), y).mean().backward())
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        with glog.record(0):
            sq_loss(model(x), y).mean().backward()
        fused = glog._recorder.fused
    assert {id(model[i].weight) for i in (0, 2, 4, 6)} <= set(fused)
    want, got = _grads(plain), _grads(model)
    changed = 0
    for k in ("0.weight", "2.weight", "4.weight"):
        scale, n_terms = terms[k]
        assert_close(got[k], want[k], n=2 * n_terms, scale=scale, err_msg=f"fused conv .grad {k}")
        changed += not torch.equal(got[k], want[k])
    assert changed  # at least one sum came out in another order: the slot was used
    for k in want:
        if k not in ("0.weight", "2.weight", "4.weight", "8.weight"):  # 'same' padding: autograd's own kernel
            assert torch.equal(got[k], want[k]), k
    ds = open_logged(tmp_path / "s.zarr")
    assert_stats(ds, 0, per_example_grads_loop(model, sq_loss, x, y), n=chain_length(model, positions=64),
                 what="fused conv")
    assert bool(ds.reconciled.values.all())


@pytest.mark.usefixtures("unguarded")
def test_the_fused_grad_comparison_fails_a_mutation(tmp_path):
    """tests/fused_grads.py (the zoo's and test_exact's .grad check) passes a fused step and fails a fused weight's
    .grad scaled by 1 + 1e-3 (tests/test_tolerance.py's MUTATION), and any change to an unfused parameter's."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 4))
    plain = copy.deepcopy(model)
    x, y = torch.randn(6, 32, 12), torch.randn(6, 32, 4)
    terms = weight_grad_terms(plain, lambda: sq_loss(plain(x), y).mean().backward())
    with GradientLogger(model, tmp_path / "s.zarr", fused=True) as glog:
        with glog.record(0):
            sq_loss(model(x), y).mean().backward()
        fused = glog._recorder.fused
    assert assert_training_grads(model, plain, fused, terms) >= 1
    model[0].weight.grad.mul_(1 + 1e-3)
    with pytest.raises(AssertionError, match=r"fused \.grad 0\.weight: error .* exceeds the derived tolerance"):
        assert_training_grads(model, plain, fused, terms)
    model[0].weight.grad.copy_(plain[0].weight.grad)
    model[0].bias.grad[0] = torch.nextafter(model[0].bias.grad[0], torch.tensor(1.0))
    with pytest.raises(AssertionError, match=r"0\.bias: \.grad differs .* not a fused weight"):
        assert_training_grads(model, plain, fused, terms)


@pytest.mark.parametrize(("name", "level"), [("timm-resnet", True), ("hf-gpt2", "auto")])
def test_the_guard_catches_a_fused_grad_that_is_not_the_per_example_sum(name, level, tmp_path, monkeypatch, unguarded):
    """A fused weight gradient scaled by 1 + 1e-3 on a zoo model, at a step where the guard checks no layer (GPT-2:
    its Conv1D calls at level "auto", the fixed call cost set to 0 at this small batch): the float64 oracle comparison
    of .grad fails (tests/fused_grads.py); the fused sum's own check."""
    from gradcoh.logger import tracker as tracker_module
    from test_zoo import check_zoo_case

    real = tracker_module.fill_slot

    def scaled(grad, slot, projector=None):
        out = real(grad, slot, projector)
        if slot.weight_grad is not None:
            slot.weight_grad = slot.weight_grad * (1 + 1e-3)
        return out

    monkeypatch.setattr(tracker_module, "fill_slot", scaled)
    monkeypatch.setattr("gradcoh.logger.fused.spares_enough", lambda *shape: True)
    with pytest.raises(AssertionError, match="exceeds the derived tolerance"):
        check_zoo_case(name, tmp_path, fused=level)


@pytest.mark.parametrize("fused", ["auto", False])
def test_the_guard_flags_a_wrong_per_example_gradient_of_a_fused_weight(fused, tmp_path, monkeypatch):
    """A rule error (a Linear's per-example gradients scaled by 1.01) on a weight fused mode takes (T = 32
    positions, a k = 64 sketch: materialised anyway; the fixed call cost waived): the guard flags its layer at a
    checked step with fused mode on as off, and that step's .grad is autograd's, exact (a checked layer is not fused,
    so its .grad stays independent of the per-example sum). Fails if checked layers are fused (the sum is then .grad
    itself and agrees with it)."""
    import xarray as xr
    from gradcoh.logger import layers as layers_module

    real = layers_module.linear.linear
    monkeypatch.setattr(layers_module.linear, "linear", lambda x, delta, **kw: real(x, delta * 1.01, **kw))
    monkeypatch.setattr("gradcoh.logger.fused.spares_enough", lambda *shape: True)  # (a small layer, fused anyway)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Tanh(), nn.Linear(64, 4))
    plain = copy.deepcopy(model)
    x, y = torch.randn(8, 32, 64), torch.randn(8, 32, 4)
    sq_loss(plain(x), y).sum().backward()
    with GradientLogger(model, tmp_path / "s.zarr", loss_reduction="sum", sketch_dim=64, fused=fused,
                        on_mismatch="flag") as glog:
        with glog.record(0):
            sq_loss(model(x), y).sum().backward()
    ds = xr.open_zarr(tmp_path / "s.zarr", group="batch", consolidated=False)
    assert ds.guard_checked.values[0].all() and not ds.reconciled.values[0][0]
    assert torch.equal(model[0].weight.grad, plain[0].weight.grad)


class _ClassToken(nn.Module):
    """Two Linears over every position and a loss that reads position 0 only (a ViT's last block and its head): the
    output gradients are zero at every other position, which Factored.live drops before the materialising GEMM."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 20), nn.Linear(20, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))[:, 0]


@pytest.mark.parametrize("sketch_dim", [0, 64])
@pytest.mark.usefixtures("unguarded")
def test_fused_grad_and_statistics_exact_where_positions_carry_no_gradient(sketch_dim, tmp_path, monkeypatch):
    from gradcoh.logger import grads

    torch.manual_seed(1)
    model = _ClassToken()
    x, y = torch.randn(5, 7, 12), torch.randn(5, 6)
    plain = copy.deepcopy(model)

    def step():
        sq_loss(plain(x), y).mean().backward()

    terms = _weight_grad_terms(plain, step)
    live, dropped = grads.Factored.live, []
    monkeypatch.setattr(grads.Factored, "live", lambda f: dropped.append(f.positions - live(f).positions) or live(f))
    with GradientLogger(model, tmp_path / "s.zarr", fused=True, sketch_dim=sketch_dim) as glog:
        with glog.record(0):
            sq_loss(model(x), y).mean().backward()
        fused_ids = glog._recorder.fused
    assert max(dropped) == x.shape[1] - 1  # (six of the seven positions formed no gradient)
    assert {id(model.a.weight), id(model.b.weight)} == set(fused_ids)
    assert_training_grads(model, plain, fused_ids, {k: (v, x.shape[0] * x.shape[1]) for k, v in terms.items()},
                          "class token")  # (fused weights to the rounding of their sums, the rest bitwise)
    ds = open_logged(tmp_path / "s.zarr")
    assert_stats(ds, 0, per_example_grads_loop(model, sq_loss, x, y), n=chain_length(model, positions=x.shape[1]),
                 what="class token")


@pytest.mark.parametrize("fused", [True, False])
def test_the_projection_class_comes_from_the_nominal_positions_not_the_live_ones(fused, tmp_path):
    """A weight (64 × 32) over 16 positions of which one carries a gradient: the cost model gives a CountSketch to
    T = 16 and a TensorSketch mean to T = 1; the store records the former (the same kind on every rank and resume
    whatever the data), while the gradients are formed from the live position only."""
    import zarr
    from gradcoh.logger.sketch import choose_projection

    assert choose_projection((64, 32), 64, [("factored", 16)]) != choose_projection((64, 32), 64, [("factored", 1)])
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 64, bias=False))
    x, y = torch.randn(4, 16, 32), torch.randn(4, 64)
    with GradientLogger(model, tmp_path / "s.zarr", fused=fused, sketch_dim=64) as glog:
        with glog.record(0):
            sq_loss(model(x)[:, 0], y).mean().backward()
    stored = zarr.open_group(str(tmp_path / "s.zarr"), mode="r").attrs["gradcoh_projections"]
    assert stored["params"]["0.weight"]["kind"] == choose_projection((64, 32), 64, [("factored", 16)])
