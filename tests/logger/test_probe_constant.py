"""Probe mode "constant": BatchNorm layers normalise with the probe sample's statistics, held constant.

The oracle is independent of the code under test: a float64 copy of the model in train mode on the whole probe
sample as one batch gives each BatchNorm's batch mean and biased variance (forward hooks); the copy is then put in
eval mode with those statistics as its running statistics and per-example gradients are taken by an explicit loop.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from gradcoh.logger import GradientLogger
from oracle import assert_stats, expected_stats, open_logged, per_example_grads_loop
from tolerance import assert_close, chain_length
from torch import nn


def ce(out, y):
    return F.cross_entropy(out, y.long(), reduction="none")


def make_model(track: bool = True) -> nn.Module:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, affine=False, track_running_stats=track), nn.Tanh(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6, track_running_stats=track), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # BatchNorm affine parameters away from (1, 0), running statistics away from (0, 1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.track_running_stats:
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
    return model.train()


def oracle_constant_model(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Float64 copy in eval mode whose BatchNorms use the train-mode batch statistics of ``x`` (one batch)."""
    m = copy.deepcopy(model).double().train()
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    stats = {}

    def grab(mod, args):
        dims = (0, *range(2, args[0].dim()))
        stats[mod] = (args[0].mean(dims), args[0].var(dims, unbiased=False))

    bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    handles = [bn.register_forward_pre_hook(grab) for bn in bns]
    with torch.no_grad():
        m(x.double())
    for h in handles:
        h.remove()
    for bn in bns:
        bn.running_mean, bn.running_var = stats[bn]
    return m.eval()


def probe_once(path, model, x, y, group, batch_size, **kwargs):
    with GradientLogger(model, path, groups=("a", "b")) as glog:
        assert glog.probe(0, x, y, ce, batch_size=batch_size, group=group, labels=y, **kwargs)
    return open_logged(path, "probe")


def check_against(ds, oracle_model, x, y, group):
    """The stored probe statistics and losses against the float64 loop, within the derived float32 bounds."""
    grads = per_example_grads_loop(oracle_model, ce, x, y)
    n = chain_length(oracle_model, positions=x.shape[-1] * x.shape[-2])
    assert_stats(ds, 0, grads, n=n, group=group.numpy(), n_groups=2, what="constant-mode probe")
    with torch.no_grad():
        logits = oracle_model(x.double())
    want = ce(logits, y).numpy()  # loss = logsumexp(z) − z_y: the terms are as large as the logits
    assert_close(ds.loss.values[0], want, n=n, scale=want + logits.abs().amax(1).numpy(), err_msg="probe loss")
    return expected_stats(ds, grads, group.numpy(), 2)[0]


@pytest.mark.parametrize("batch_size", [16, 5], ids=["one-pass", "micro-batched"])
@pytest.mark.parametrize("track", [True, False], ids=["running-stats", "no-running-stats"])
def test_constant_mode_matches_float64_loop_with_the_same_statistics(tmp_path, batch_size, track):
    """Exact per-example gradients of the network normalised with the whole sample's statistics (default mode)."""
    model = make_model(track)
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(13, 2, 8, 8, generator=gen) * 2 + 1, torch.randint(0, 3, (13,), generator=gen)
    group = torch.tensor([0, 1] * 6 + [1])
    before = copy.deepcopy(model.state_dict())
    ds = probe_once(tmp_path / "p.zarr", model, x, y, group, batch_size)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # statistics hooks removed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    sq = check_against(ds, oracle_constant_model(model, x), x, y, group)
    # The test can fail: running statistics, or the statistics of each micro-batch, give other values.
    if track:
        eval_grads = per_example_grads_loop(copy.deepcopy(model).eval(), ce, x, y)
        eval_sq, _, _ = expected_stats(ds, eval_grads, group.numpy(), 2)
        assert np.abs(eval_sq - sq).max() > 1e-2 * np.abs(sq).max()
    first = oracle_constant_model(model, x[:5])  # statistics of the first micro-batch of 5 only
    part_grads = per_example_grads_loop(first, ce, x, y)
    part_sq, _, _ = expected_stats(ds, part_grads, group.numpy(), 2)
    assert np.abs(part_sq - sq).max() > 1e-2 * np.abs(sq).max()


def test_constant_mode_with_statistics_of_other_inputs(tmp_path):
    """``statistics=`` (e.g. the current training batch): normalised with those inputs' statistics, still exact."""
    model = make_model()
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(9, 2, 8, 8, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    batch = torch.randn(20, 2, 8, 8, generator=gen) * 3 - 1
    group = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])
    ds = probe_once(tmp_path / "p.zarr", model, x, y, group, 4, statistics=batch)
    check_against(ds, oracle_constant_model(model, batch), x, y, group)


def test_default_mode_is_constant_for_batch_statistics_and_says_so(tmp_path, caplog):
    model = make_model()
    x, y = torch.randn(6, 2, 8, 8), torch.randint(0, 3, (6,))
    with caplog.at_level(logging.WARNING, logger="gradcoh.logger"):
        with GradientLogger(model, tmp_path / "p.zarr") as glog:
            glog.probe(0, x, y, ce)
            glog.probe(1, x, y, ce)
    said = [r.getMessage() for r in caplog.records if "constant" in r.getMessage()]
    assert len(said) == 1 and "1, 5, 9" in said[0] and "mode='eval'" in said[0]
    notes = zarr.open_group(str(tmp_path / "p.zarr"), mode="r", use_consolidated=False).attrs["gradcoh_notes"]
    assert any("probe" in n and "held constant" in n for n in notes)


def test_no_batch_statistics_no_message_and_eval_semantics(tmp_path, caplog):
    """A model in eval mode (running statistics) or without BatchNorm: the probe is the eval-mode probe."""
    model = make_model().eval()
    x, y = torch.randn(6, 2, 8, 8), torch.randint(0, 3, (6,))
    group = torch.tensor([0, 1, 0, 1, 0, 1])
    with caplog.at_level(logging.WARNING, logger="gradcoh.logger"):
        ds = probe_once(tmp_path / "p.zarr", model, x, y, group, 4)
    assert not [r for r in caplog.records if "constant" in r.getMessage()]
    check_against(ds, copy.deepcopy(model).double().eval(), x, y, group)


def test_bad_mode_is_refused(tmp_path):
    with GradientLogger(make_model(), tmp_path / "p.zarr") as glog, pytest.raises(ValueError, match="mode='batch'"):
        glog.probe(0, torch.randn(2, 2, 8, 8), torch.zeros(2, dtype=torch.long), ce, mode="batch")


def test_batch_norm_called_twice_is_refused(tmp_path):
    """One module normalising two tensors in one forward has no single constant mean: a clear error."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn, self.head = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.bn(self.lin(x)) + self.bn(self.lin(-x)))

    model = Twice().train()
    before = copy.deepcopy(model.state_dict())
    for batch_size in (4, 8):  # several micro-batches (call order pass) and one (single pass)
        with GradientLogger(model, tmp_path / f"p{batch_size}.zarr") as glog, pytest.raises(ValueError,
                                                                                              match="mode='eval'"):
            glog.probe(0, torch.randn(6, 3), torch.zeros(6, dtype=torch.long), ce, batch_size=batch_size)
        assert model.training and model.bn.training and not model.bn._forward_pre_hooks
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode", ["constant", "eval"])
def test_reference_gradient_follows_the_probe_mode(tmp_path, mode):
    """R of a BatchNorm model is the mean gradient of the network the probe measures: with ``constant``, the
    reference sample's own statistics held constant (not the running ones); with ``eval``, the running statistics."""
    from test_alignment import close, oracle_alignment

    model = make_model()
    gen = torch.Generator().manual_seed(13)
    x, y = torch.randn(7, 2, 8, 8, generator=gen), torch.randint(0, 3, (7,), generator=gen)
    rx, ry = torch.randn(10, 2, 8, 8, generator=gen) * 2 - 1, torch.randint(0, 3, (10,), generator=gen)
    before = copy.deepcopy(model.state_dict())
    with GradientLogger(model, tmp_path / "r.zarr", alignment=True, reference=(rx, ry, ce), probe_mode=mode) as glog:
        assert glog.probe(0, x, y, ce, batch_size=4)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ds = open_logged(tmp_path / "r.zarr", "probe")

    def network(inputs):
        if mode == "constant":
            return oracle_constant_model(model, inputs)
        return copy.deepcopy(model).double().eval()

    ref_grads = per_example_grads_loop(network(rx), ce, rx, ry)
    _, ref, _ = oracle_alignment(ds, per_example_grads_loop(network(x), ce, x, y), ref_grads)
    close(ds.ref_alignment.values[0], ref, model, x)
    # The test can fail: R from the other statistics (running ones for constant, the sample's for eval) differs.
    other = (copy.deepcopy(model).double().eval() if mode == "constant" else oracle_constant_model(model, rx))
    _, wrong, _ = oracle_alignment(ds, per_example_grads_loop(network(x), ce, x, y),
                                   per_example_grads_loop(other, ce, rx, ry))
    assert np.abs(np.asarray(wrong) - np.asarray(ref)).max() > 1e-2 * np.abs(np.asarray(ref)).max()
