"""Normalisation layers seen as parameter uses (timm's ``BatchNormAct2d``): the fused running-statistics route.

``usegrads._norm_use`` takes eval-mode ``F.batch_norm`` calls with enough positions per channel through
``ops.norm.running_affine`` (one ATen batch-norm backward over (example, channel) pairs); every value is checked
against the float64 per-example loop, with running statistics far from (0, 1) so that a mix-up of channels, examples
or ``eps`` shows.
"""

from __future__ import annotations

import pytest
import torch
from gradcoh.logger.ops import norm
from oracle import per_example_grads_loop
from test_exact import check_step, target_for
from test_review import log_one
from tolerance import assert_close
from torch import nn


def _timm_layers():
    """``timm.layers`` (skipped without timm), imported by the tests that build its layers: with torchvision and
    torch._dynamo it costs ≈ 2 s of CPU, which every xdist worker would pay collecting this file."""
    return pytest.importorskip("timm.layers")


class _Rows(nn.Module):
    """Each example's channels split into two rows of the norm's batch axis (``[B, 2C, ...] -> [2B, C, ...]``)."""

    def __init__(self, norm_layer: nn.Module) -> None:
        super().__init__()
        self.norm = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c2, h, w = x.shape
        return self.norm(x.reshape(2 * b, c2 // 2, h, w)).reshape(b, c2, h, w)


def _model(size: int, rows: bool, freeze: str | None) -> nn.Sequential:
    torch.manual_seed(7 + size)
    bn = _timm_layers().BatchNormAct2d(3, act_layer=nn.Tanh, eps=1e-3)
    with torch.no_grad():  # running statistics far from (0, 1), different per channel; affine parameters too
        bn.running_mean.copy_(torch.tensor([2.5, -1.0, 0.3]))
        bn.running_var.copy_(torch.tensor([0.2, 3.0, 1.7]))
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.9]))
        bn.bias.copy_(torch.tensor([0.1, 0.4, -0.6]))
    if freeze:
        getattr(bn, freeze).requires_grad_(False)
    conv = nn.Conv2d(2, 6 if rows else 3, 3, padding=1)
    with torch.no_grad():
        conv.bias.add_(1.0)  # inputs centred away from zero
    body = _Rows(bn) if rows else bn
    return nn.Sequential(conv, body, nn.Flatten(), nn.Linear((6 if rows else 3) * size * size, 2)).eval()


@pytest.mark.parametrize(("size", "rows", "freeze", "fused"), [
    (4, False, None, True),  # 16 positions: the fused route
    (5, False, "weight", True),
    (6, False, "bias", True),
    (4, True, None, True),  # two rows of the norm's batch per example
    (3, False, None, False),  # 9 positions: normalise and sum
])
def test_batchnormact_eval_against_loop(tmp_path, monkeypatch, size, rows, freeze, fused):
    calls = []
    real = norm.running_affine

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(norm, "running_affine", spy)
    model = _model(size, rows, freeze)
    x = torch.randn(5, 2, size, size)
    y = target_for(model, x)
    ds = log_one(model, x, y, tmp_path / "s.zarr", reduction="sum")
    layer = next(entry for entry in ds.attrs["gradcoh_layers"] if entry["name"] in ("1", "1.norm"))
    assert layer["rule"] == "uses"
    assert bool(calls) == fused
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)


def test_running_affine_matches_normalise_and_sum():
    """The fused kernel against ``Σ x̂·δ`` in float64, per (example, channel), within the float32 bound of its
    roundings: per term ``x − mean``, ``·δ``, ``·invstd`` and invstd's own three (``var + eps``, ``sqrt``, ``1/·``),
    plus the sum over the T positions: n = T + 6 against ``Σ |x̂||δ|``; the bias ``Σ δ``: n = T against ``Σ |δ|``."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 3, 7, generator=g) * 3 + 10
    delta = torch.randn(4, 5, 3, 7, generator=g)
    mean, var = torch.randn(5, generator=g) + 10, torch.rand(5, generator=g) * 8 + 0.1
    got = norm.running_affine(x, delta, mean, var, 1e-4, weight=True, bias=True)
    xhat = (x.double() - mean.double()[:, None, None]) / (var.double()[:, None, None] + 1e-4).sqrt()
    want_w = (xhat * delta.double()).sum((2, 3))
    want_b = delta.double().sum((2, 3))
    positions = x[0, 0].numel()
    scale_w, scale_b = (xhat.abs() * delta.double().abs()).sum((2, 3)), delta.double().abs().sum((2, 3))
    assert_close(got.blocks[0].squeeze(-1), want_w, n=positions + 6, scale=scale_w, err_msg="Σ x̂·δ")
    assert_close(got.blocks[1].squeeze(-1), want_b, n=positions, scale=scale_b, err_msg="Σ δ")
    only_bias = norm.running_affine(x, delta, mean, var, 1e-4, weight=False, bias=True)
    assert len(only_bias.blocks) == 1
    assert_close(only_bias.blocks[0].squeeze(-1), want_b, n=positions, scale=scale_b, err_msg="Σ δ alone")


class _SeqFirst(nn.Module):
    """A norm called on ``[T, B, d]`` (the batch on axis 1 of the norm's input)."""

    def __init__(self, norm_layer: nn.Module) -> None:
        super().__init__()
        self.norm = norm_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(0, 1)).transpose(0, 1)


def _ln_model(kind: str, freeze: str | None) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(11)
    d = 6
    if kind == "layernorm2d":  # ConvNeXt's norm: F.layer_norm over the channels of a permuted map
        ln = _timm_layers().LayerNorm2d(d, eps=1e-3)
        body: nn.Module = nn.Sequential(nn.Conv2d(2, d, 3, padding=1), ln, nn.Flatten(), nn.Linear(d * 16, 2))
        shape: tuple[int, ...] = (2, 4, 4)
    else:  # timm's LayerNorm calls F.layer_norm itself (a use); nn.LayerNorm has a module rule
        ln = nn.LayerNorm(d, eps=1e-3) if kind.startswith("nn_") else _timm_layers().LayerNorm(d, eps=1e-3)
        inner = _SeqFirst(ln) if kind.endswith("seq_first") else ln
        body = nn.Sequential(nn.Linear(4, d), inner, nn.Flatten(), nn.Linear(3 * d, 2))
        shape = (3, 4)
    with torch.no_grad():  # affine parameters far from (1, 0), inputs off-centre: a mix-up of x̂ and x shows
        ln.weight.copy_(torch.linspace(-1.5, 2.0, d))
        ln.bias.copy_(torch.linspace(0.5, -0.8, d))
        body[0].bias.add_(3.0)
    if freeze:
        getattr(ln, freeze).requires_grad_(False)
    return body, shape


@pytest.mark.parametrize(("kind", "freeze"), [("layernorm", None), ("seq_first", None), ("layernorm2d", None),
                                              ("layernorm", "weight"), ("layernorm", "bias"), ("nn_layernorm", None),
                                              ("nn_seq_first", None), ("nn_layernorm", "weight")])
def test_layer_norm_from_forward_stats_against_loop(tmp_path, monkeypatch, kind, freeze):
    """timm's ``LayerNorm``/``LayerNorm2d`` (``F.layer_norm`` uses) and ``nn.LayerNorm`` (its module rule): ``x̂`` from
    the mean and ``1/σ`` the forward kernel saved (:func:`norm.layer_norm_affine`), never a second normalisation,
    exact against the float64 loop."""
    calls, recomputed = [], []
    real, real_ln = norm.layer_norm_affine, norm.layer_norm
    monkeypatch.setattr(norm, "layer_norm_affine", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(norm, "layer_norm", lambda *a, **k: recomputed.append(a[0].shape) or real_ln(*a, **k))
    model, shape = _ln_model(kind, freeze)
    x = torch.randn(5, *shape)
    y = target_for(model, x)
    ds = log_one(model, x, y, tmp_path / "s.zarr", reduction="sum")
    layer = next(entry for entry in ds.attrs["gradcoh_layers"] if entry["name"] in ("1", "1.norm"))
    assert (layer["rule"] == "uses") != kind.startswith("nn_")
    assert calls and not recomputed
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)


def test_layer_norm_affine_matches_normalise_and_sum():
    """``layer_norm_affine`` from ATen's saved statistics against ``Σ x̂·δ`` in float64 (inputs far off-centre)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 9, generator=g) * 4 + 20
    delta = torch.randn(3, 7, 9, generator=g)
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, [9], None, None, 1e-5)
    got = norm.layer_norm_affine(x, mean, rstd, delta, (1,), weight=True, bias=True)
    xd = x.double()
    xhat = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    # x̂ from 9-term moments of values |x|·rstd times its size (the subtraction's conditioning), summed over 7 rows
    kappa = float((x.abs() * rstd).max())
    terms = xhat * delta.double()
    assert_close(got.blocks[0].squeeze(-1), terms.sum(1), n=9 + 7 + 3, kappa=kappa, scale=terms.abs().sum(1),
                 err_msg="sum x_hat*delta")
    assert_close(got.blocks[1].squeeze(-1), delta.double().sum(1), n=7, scale=delta.double().abs().sum(1),
                 err_msg="sum delta")
    only_bias = norm.layer_norm_affine(x, mean, rstd, delta, (1,), weight=False, bias=True)
    assert len(only_bias.blocks) == 1
