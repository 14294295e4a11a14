"""Probe mode: exact statistics of a fixed sample, and training bitwise unchanged by probing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import xarray as xr
from gradcoh.logger import GradientLogger
from oracle import assert_stats, open_logged, per_example_grads_vmap
from tolerance import assert_close, chain_length
from torch import nn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def train(path, probe: bool):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    px, py = torch.randn(10, 1, 8, 8, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    groups = torch.tensor([0, 1] * 5)
    torch.manual_seed(2)
    with GradientLogger(model, path, every=2, groups=("a", "b"), sketch_dim=16) as glog:
        for step in range(6):
            x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
            with glog.record(step, group=torch.zeros(8, dtype=torch.long)):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if probe:
                glog.probe(step, px, py, ce, every=3, batch_size=4, group=groups, labels=py)
    return model, (px, py, groups)


def test_probe_leaves_training_bitwise_identical(tmp_path):
    plain, _ = train(tmp_path / "a.zarr", probe=False)
    probed, _ = train(tmp_path / "b.zarr", probe=True)
    for (name, p), q in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    ds = xr.open_zarr(tmp_path / "b.zarr", group="probe", consolidated=False)
    assert list(ds.step.values) == [0, 3]


def test_probe_statistics_match_oracle_in_eval_mode(tmp_path):
    model = make_model()
    model.train()
    gen = torch.Generator().manual_seed(3)
    px, py = torch.randn(10, 1, 8, 8, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    groups = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 1])
    with GradientLogger(model, tmp_path / "s.zarr", groups=("a", "b")) as glog:
        assert glog.probe(0, px, py, ce, batch_size=3, group=groups, mode="eval")
    assert model.training  # restored
    ds = open_logged(tmp_path / "s.zarr", "probe")
    model.eval()
    grads = per_example_grads_vmap(model, lambda o, y: F.cross_entropy(o, y.long(), reduction="none"), px, py)
    n = chain_length(model, positions=8 * 8)
    assert_stats(ds, 0, grads, n=n, group=groups.numpy(), n_groups=2)
    logits = model(px).detach().double()  # loss = logsumexp(z) − z_y: the terms are as large as the logits
    want = F.cross_entropy(logits, py, reduction="none").numpy()
    assert_close(ds.loss.values[0], want, n=n, scale=want + logits.abs().amax(1).numpy(), err_msg="probe loss")
