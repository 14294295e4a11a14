"""The reconciliation guard's schedule (gradcoh.logger.guard): each layer checked once every ``guard_every`` steps.

A fault in a layer that a step does not check must be caught within ``guard_every`` logged steps, the checks must
really be skipped (that is the saving), and verified steps must check every layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from gradcoh.logger import GradientLogger, schema
from gradcoh.logger import tracker as tracker_module
from gradcoh.logger.guard import GuardSchedule
from torch import nn


def test_schedule_first_step_all_then_each_layer_once_per_period():
    sizes = [1000, 10, 500, 500, 20, 7]
    sched = GuardSchedule(4, sizes)
    steps = [sched.next_step("batch") for _ in range(13)]
    assert all(steps[0])
    for start in range(1, 10):  # any R consecutive steps after the first check every layer exactly once
        window = steps[start : start + 4]
        assert [sum(s[i] for s in window) for i in range(len(sizes))] == [1] * len(sizes)
    loads = [sum(n for n, p in zip(sizes, sched.phase, strict=True) if p == q) for q in range(4)]
    assert max(loads) == 1000 and min(loads) >= 20  # largest first, each into the lightest phase
    assert all(sched.next_step("probe"))  # streams count apart: a stream's first step checks everything
    sched.flagged()
    assert all(sched.next_step("batch")) and all(sched.next_step("batch"))


def test_schedule_caps_the_period_at_the_number_of_layers():
    sched = GuardSchedule(8, [5, 5])
    steps = [sched.next_step("batch") for _ in range(5)]
    assert all(any(s) for s in steps)  # no step without a check
    assert GuardSchedule(1, [3, 4]).next_step("batch") == [True, True]


class Deep(nn.Module):
    def __init__(self, width=6, depth=5):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def _run(model, tmp_path, steps, penalty_from=None, target=0, verified=False, **kw):
    """Log ``steps`` steps; from step ``penalty_from`` on, a penalty λ‖W‖² on layer ``target``'s weight."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    records, checks = [], []
    kw.setdefault("on_mismatch", "flag")
    with GradientLogger(model, tmp_path / "g.zarr", mode="overwrite", handle_sigterm=False, **kw) as glog:
        glog._output.put = lambda stream, step, record: records.append(record)
        for step in range(steps):
            with glog.record(step) as rec:
                losses = ((model(x) - y) ** 2).sum(1)
                if verified:
                    rec.loss(losses)
                loss = losses.mean()
                if penalty_from is not None and step >= penalty_from:
                    loss = loss + 1e-3 * model.layers[target].weight.square().sum()
                loss.backward()
                checks.append([t.results.checked for t in glog.trackers])
            model.zero_grad(set_to_none=True)
        names = [t.name for t in glog.trackers]
    return records, checks, names


def test_a_fault_in_a_layer_not_checked_is_caught_within_the_period(tmp_path):
    torch.manual_seed(1)
    model = Deep()
    period = 4
    target = 2
    # the penalty starts at step 1, right after the first step (which checks every layer)
    records, checks, names = _run(model, tmp_path, 1 + 2 * period, penalty_from=1, target=target, guard_every=period)
    li = names.index(f"layers.{target}")
    assert all(checks[0])
    flagged = [not bool(r.reconciled[li]) for r in records]
    first = flagged.index(True)
    assert 1 <= first <= period  # caught within the period
    assert not any(flagged[1:first]) and not any(checks[s][li] for s in range(1, first))  # unchecked until then
    assert all(flagged[first:])  # after a flag: every layer at every step
    assert all(all(c) for c in checks[first + 1 :])
    others = [i for i in range(len(names)) if i != li]
    assert all(bool(r.reconciled[i]) for r in records for i in others)  # no false flags elsewhere


def test_the_full_guard_sees_it_at_once_and_unchecked_steps_skip_the_work(tmp_path, monkeypatch):
    torch.manual_seed(1)
    records, _, names = _run(Deep(), tmp_path, 3, penalty_from=1, target=2, guard_every=1)
    assert not bool(records[1].reconciled[names.index("layers.2")])
    calls = []
    real = tracker_module.bilinear
    monkeypatch.setattr(tracker_module, "bilinear", lambda *a: calls.append(1) or real(*a))
    _, checks, _ = _run(Deep(), tmp_path, 5, guard_every=4)
    per_step = 2  # weight and bias of each checked layer: one guard value each
    assert len(calls) == per_step * sum(sum(c) for c in checks)
    assert sum(sum(c) for c in checks[1:]) == len(checks[0])  # steps 1..4 check each of the 5 layers once


@pytest.mark.parametrize("verify_every", [1, 2])
def test_verified_steps_check_every_layer_and_sampled_steps_raise_nothing(tmp_path, verify_every):
    torch.manual_seed(2)
    records, _, _ = _run(Deep(), tmp_path, 5, verified=True, guard_every=4, verify_every=verify_every,
                         on_mismatch="raise")
    assert all(bool(r.reconciled.all()) for r in records)


def test_guard_every_is_validated(tmp_path):
    with pytest.raises(ValueError, match="guard_every"):
        GradientLogger(Deep(), tmp_path / "x.zarr", guard_every=0)



def _stored_guard(tmp_path, monkeypatch, steps=9, penalty_from=3, target=2, guard_every=4):
    """Log a run with a weight penalty on one layer from ``penalty_from`` on; return the store's ``guard_checked``
    and ``reconciled`` next to the oracle: which layers' guard values were really computed at each step."""
    computed, per_step = set(), []
    real = tracker_module.bilinear

    def spy(fa, left, right):
        computed.add(id(left))
        return real(fa, left, right)

    monkeypatch.setattr(tracker_module, "bilinear", spy)
    torch.manual_seed(3)
    model = Deep()
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    path = tmp_path / "stored.zarr"
    with GradientLogger(model, path, mode="overwrite", handle_sigterm=False, on_mismatch="flag",
                        guard_every=guard_every) as glog:
        owner = {id(left): i for i, t in enumerate(glog.trackers) for left, _ in t.guard_vectors}
        for step in range(steps):
            computed.clear()
            with glog.record(step):
                loss = ((model(x) - y) ** 2).sum(1).mean()
                if step >= penalty_from:
                    loss = loss + 1e-3 * model.layers[target].weight.square().sum()
                loss.backward()
            per_step.append([i in {owner[k] for k in computed} for i in range(len(glog.trackers))])
            model.zero_grad(set_to_none=True)
    stream = zarr.open_group(str(path), mode="r")[schema.STREAM_BATCH]
    return (np.asarray(stream[schema.GUARD_CHECKED][:]), np.asarray(stream[schema.RECONCILED][:]),
            np.array(per_step), path)


def _check_stored_guard(tmp_path, monkeypatch):
    checked, reconciled, oracle, path = _stored_guard(tmp_path, monkeypatch)
    target, onset, period = 2, 3, 4
    assert checked.shape == oracle.shape == (9, 5)
    np.testing.assert_array_equal(checked, oracle, err_msg="guard_checked is not what the guard computed")
    assert oracle[0].all() and not oracle[1:onset].all()  # the schedule really skips layers
    assert reconciled[~checked].all()  # unchecked layer-steps are not flagged (and say so in guard_checked)
    hits = [s for s in range(onset, 9) if checked[s, target]]
    assert hits and hits[0] < onset + period  # the fault is caught at the layer's first check, within the period
    assert not reconciled[hits[0], target] and reconciled[:hits[0]].all()
    from gradcoh.analysis import describe_store, guard_coverage, open_store
    counts = {"layer_steps": 45, "checked": int(oracle.sum()), "flagged": int((~reconciled).sum())}
    assert guard_coverage(open_store(path)) == counts
    assert describe_store(path)["streams"][schema.STREAM_BATCH]["guard"] == counts


def test_the_store_says_which_layer_steps_the_guard_checked(tmp_path, monkeypatch):
    _check_stored_guard(tmp_path, monkeypatch)


def test_a_logger_claiming_unmade_checks_fails_the_oracle(tmp_path, monkeypatch):
    """Mutation: every layer stored as checked at every step (what format 3 implied) fails the stored-flag test."""
    from gradcoh.logger.reducer import StepReducer

    real = StepReducer._device_tensors

    def claims_every_check(self, *args):
        out = real(self, *args)
        out["guard_checked"] = torch.ones_like(out["guard_checked"])
        return out

    monkeypatch.setattr(StepReducer, "_device_tensors", claims_every_check)
    with pytest.raises(AssertionError, match="guard_checked is not what the guard computed"):
        _check_stored_guard(tmp_path, monkeypatch)


def test_a_record_that_stores_nothing_leaves_the_schedule_as_it_was(tmp_path):
    """A record block without a backward pass, or one whose training code raised, stores no step: the first stored
    step still checks every layer, and the stored steps keep every layer checked once every ``guard_every``."""
    torch.manual_seed(7)
    model = Deep()
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    path = tmp_path / "s.zarr"
    with GradientLogger(model, path, handle_sigterm=False, guard_every=4) as glog:
        with glog.record(0):
            model(x)  # no backward: nothing is stored
        with pytest.raises(ZeroDivisionError), glog.record(1):
            model(x)
            raise ZeroDivisionError  # the training code failed inside the block
        for step in range(2, 7):
            with glog.record(step):
                ((model(x) - y) ** 2).sum(1).mean().backward()
            model.zero_grad(set_to_none=True)
    checked = np.asarray(zarr.open_group(str(path), mode="r")[schema.STREAM_BATCH][schema.GUARD_CHECKED][:])
    assert checked.shape == (5, 5) and checked[0].all()
    assert (checked[1:5].sum(0) == 1).all()  # then each layer once in the next 4 stored steps


@pytest.mark.parametrize("penalty", [0.0, 1e-9])
def test_float64_models_are_checked_at_float64_precision(tmp_path, penalty):
    """The guard's per-example values keep the parameters' float64 (its tolerance is float64's rounding).

    Rounding them to float32 made every layer of an exact float64 model fail the check (a gap of 1e6–1e7 times the
    tolerance); a penalty far below float32's resolution (λ = 1e-9) must still be flagged on its layer only.
    """
    torch.manual_seed(3)
    model = Deep().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    records = []
    with GradientLogger(model, tmp_path / "g.zarr", mode="overwrite", handle_sigterm=False, guard_every=1,
                        on_mismatch="flag" if penalty else "raise") as glog:
        glog._output.put = lambda stream, step, record: records.append(record)
        for step in range(2):
            with glog.record(step):
                loss = ((model(x) - y) ** 2).sum(1).mean() + penalty * model.layers[2].weight.square().sum()
                loss.backward()
            model.zero_grad(set_to_none=True)
        names = [t.name for t in glog.trackers]
    flagged = [[not bool(v) for v in r.reconciled] for r in records]
    expected = [name == "layers.2" and penalty > 0 for name in names]
    assert flagged == [expected, expected]
