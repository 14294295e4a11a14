"""A logged step runs with Python's cyclic garbage collector paused, and leaves the collector as it found it."""

from __future__ import annotations

import gc

import pytest
import torch
from gradcoh.logger import GradientLogger
from torch import nn


def _model_and_seen() -> tuple[nn.Module, list[bool]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    seen: list[bool] = []  # gc.isenabled() in the forward and in the backward of each step
    model[0].register_forward_hook(lambda m, a, o: seen.append(gc.isenabled()))
    model[2].register_full_backward_hook(lambda m, gi, go: seen.append(gc.isenabled()))
    return model, seen


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_in_the_forward_and_backward_of_a_logged_step_and_resumed_after(tmp_path, collector_on):
    model, seen = _model_and_seen()
    x = torch.randn(5, 4)
    with GradientLogger(model, tmp_path / "s.zarr", every=2) as glog:
        for step in range(3):
            with glog.record(step):
                model(x).square().sum().backward()
            assert gc.isenabled()
    assert seen == [False, False, True, True, False, False]  # step 1 is not logged: untouched


def test_resumed_when_the_block_raises(tmp_path, collector_on):
    model, _ = _model_and_seen()
    with GradientLogger(model, tmp_path / "s.zarr") as glog:
        with pytest.raises(KeyError), glog.record(0):
            model(torch.randn(5, 4)).sum().backward()
            raise KeyError("user error")
        assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled(tmp_path, collector_on):
    model, seen = _model_and_seen()
    gc.disable()
    with GradientLogger(model, tmp_path / "s.zarr") as glog, glog.record(0):
        model(torch.randn(5, 4)).sum().backward()
    assert not gc.isenabled()
    assert seen == [False, False]
