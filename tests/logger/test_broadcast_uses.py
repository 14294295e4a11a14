"""Parameters used directly in broadcasting ``*``, ``+``, ``-`` with the batch (RMSNorm's ``weight * x``,
``x + pos_embed``): the direct route of gradcoh.logger.usegrads._broadcast_use against the per-example loop oracle."""

from __future__ import annotations

import pytest
import torch
from gradcoh.logger import usegrads
from oracle import per_example_grads_loop
from test_exact import check_step, run_logged, target_for
from torch import nn


class Broadcasts(nn.Module):
    """Every sign and broadcast of the direct route; ``shift`` is used twice (cross terms see a wrong sign)."""

    def __init__(self, t: int = 5, d: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.scale = nn.Parameter(torch.randn(d))  # weight * x (trailing axis)
        self.pos = nn.Parameter(torch.randn(1, t, d))  # x + pos (aligned, batch axis 1)
        self.shift = nn.Parameter(torch.randn(t, 1))  # x - shift and shift - x (broadcast along the features)
        self.gate = nn.Parameter(torch.randn(d))  # x * (1 - gate): a derived tensor, pulled back
        self.bias = nn.Parameter(torch.randn(d))  # rsub and in-place add
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.scale * self.inp(x)
        h = h + self.pos
        h = torch.tanh(h - self.shift) + 0.5 * torch.sin(self.shift - h)
        h = h * (1 - self.gate)
        h = torch.tanh(torch.rsub(h, self.bias))  # bias - h
        h = h.clone()
        h += 0.3 * self.bias.detach() + self.bias
        return self.head(h).sum(1)


def test_broadcast_uses_match_loop_oracle(tmp_path, monkeypatch):
    torch.manual_seed(41)
    model = Broadcasts()
    x = torch.randn(6, 5, 3)
    y = target_for(model, x)
    calls = []
    route = usegrads._broadcast_use

    def counted(use, n):
        out = route(use, n)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(usegrads, "_broadcast_use", counted)
    ds = run_logged(model, [[(x, y)]], tmp_path / "s.zarr")
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)
    assert sum(calls) >= 6  # the direct route took the uses (not the vmap fallback)


def test_broadcast_use_with_alpha_takes_the_general_route(tmp_path):
    torch.manual_seed(42)

    class Alpha(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.add(self.inp(x), self.b, alpha=2.5).tanh().sum(1)

    model = Alpha()
    x = torch.randn(5, 2, 3)
    y = target_for(model, x)
    ds = run_logged(model, [[(x, y)]], tmp_path / "s.zarr")
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)


@pytest.mark.parametrize("shape", [(4,), (1, 1, 4), (2, 1)])
def test_broadcast_scale_shapes(shape, tmp_path):
    torch.manual_seed(43)

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.w = nn.Parameter(torch.randn(shape))

        def forward(self, x):
            return (self.inp(x) * self.w).tanh().sum(1)

    model = Scale()
    x = torch.randn(5, 2, 3)
    y = target_for(model, x)
    ds = run_logged(model, [[(x, y)]], tmp_path / "s.zarr")
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)


class LayerScales(nn.Module):
    """ConvNeXt's ``x.mul(gamma.reshape(1, -1, 1, 1))``, a chain of reshapes, and a reshape that reorders axes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.randn(4))  # reshape(1, -1, 1, 1)
        self.beta = nn.Parameter(torch.randn(2, 2))  # view(-1).unsqueeze(1).unsqueeze(2): a chain
        self.grid = nn.Parameter(torch.randn(6, 4))  # its 24 elements in row order as [1, 1, 4, 6] (not a transpose)
        self.head = nn.Linear(4 * 4 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = h.mul(self.gamma.reshape(1, -1, 1, 1))
        h = torch.tanh(h + self.beta.view(-1).unsqueeze(1).unsqueeze(2))
        h = h * self.grid.reshape(1, 1, 4, 6)
        return self.head(h.flatten(1))


def test_reshaped_parameters_pulled_back_without_vmap(tmp_path, monkeypatch):
    torch.manual_seed(44)
    model = LayerScales()
    x = torch.randn(5, 3, 4, 6)
    y = target_for(model, x)
    vmaps = []
    vmap = torch.func.vmap

    def counted(*a, **k):
        vmaps.append(1)
        return vmap(*a, **k)

    monkeypatch.setattr(torch.func, "vmap", counted)
    ds = run_logged(model, [[(x, y)]], tmp_path / "s.zarr")
    monkeypatch.setattr(torch.func, "vmap", vmap)
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)
    assert not vmaps  # the reshapes were reversed directly


class TwoOwners(nn.Module):
    """One use of a tensor derived from two layers' parameters (``b.scale + 2 * a.scale``): each gets its part."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.a, self.b = nn.Module(), nn.Module()
        self.a.scale = nn.Parameter(torch.randn(d))
        self.b.scale = nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inp(x) * (self.b.scale + 2 * self.a.scale))).sum(1)


def test_a_use_reaches_every_layer_whose_parameters_it_derives_from(tmp_path):
    torch.manual_seed(43)
    model = TwoOwners()
    x = torch.randn(5, 3, 3)
    y = target_for(model, x)
    ds = run_logged(model, [[(x, y)]], tmp_path / "s.zarr")
    assert {"a", "b"} <= set(ds.layer.values)
    check_step(ds, 0, model, x, y, oracle=per_example_grads_loop)
