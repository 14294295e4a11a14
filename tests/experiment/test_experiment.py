"""Experiments: label noise, datasets, models, ``run_experiment`` and the ``train`` / ``demo`` commands."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from gradcoh.analysis import list_streams, m_coherence, open_root, open_store
from gradcoh.cli.main import app
from gradcoh.logger.experiment import ExperimentConfig, run_experiment
from gradcoh.logger.experiment.datasets import DatasetNotFoundError, load_dataset
from gradcoh.logger.experiment.models import MODELS, build_model
from gradcoh.logger.experiment.noise import corrupt_labels
from typer.testing import CliRunner

runner = CliRunner()


# --- label noise -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_noise_fraction_and_determinism(fraction):
    true = torch.arange(1000) % 10
    labels, mask = corrupt_labels(true, 10, fraction, seed=3)
    again, mask_again = corrupt_labels(true, 10, fraction, seed=3)
    assert torch.equal(labels, again) and torch.equal(mask, mask_again)
    assert int(mask.sum()) == round(fraction * 1000)
    assert torch.equal(labels[~mask], true[~mask])  # untouched examples keep their label
    assert labels.min() >= 0 and labels.max() < 10
    if fraction == 1.0:  # re-drawn uniformly from all classes: about 1/10 land on the true label again
        same = (labels == true).float().mean().item()
        assert 0.06 < same < 0.14


def test_noise_seed_changes_draw_and_validates():
    true = torch.arange(200) % 5
    a, _ = corrupt_labels(true, 5, 0.5, seed=0)
    b, _ = corrupt_labels(true, 5, 0.5, seed=1)
    assert not torch.equal(a, b)
    for bad in ({"fraction": 1.5}, {"fraction": -0.1}, {"num_classes": 1}, {"seed": -1}):
        kwargs = {"fraction": 0.5, "num_classes": 5, "seed": 0} | bad
        with pytest.raises(ValueError):
            corrupt_labels(true, **kwargs)
    with pytest.raises(ValueError, match="lie in"):
        corrupt_labels(true + 5, 5, 0.5, 0)


# --- datasets --------------------------------------------------------------------------------------------------
def test_digits_split_and_normalisation():
    train, test = load_dataset("digits"), load_dataset("digits", train=False)
    assert (len(train), len(test)) == (1500, 297)
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10
    x = train.batch(torch.arange(len(train)))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2
    x2, y2, i2 = train.indexed()[7]
    assert torch.equal(x2, x[7]) and y2 == train.targets[7] and i2 == 7


def test_synthetic_any_shape_and_seeded():
    a = load_dataset("synthetic", synthetic_size=10, synthetic_shape=(3, 5, 7), synthetic_classes=3, seed=1)
    b = load_dataset("synthetic", synthetic_size=10, synthetic_shape=(3, 5, 7), synthetic_classes=3, seed=1)
    assert a.input_shape == (3, 5, 7) and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize(("name", "expected"), [("cifar10", "cifar-10-batches-py"), ("mnist", "MNIST"),
                                                ("imagefolder", "class")])
def test_missing_torchvision_data_is_a_clear_error(tmp_path, no_network, name, expected):
    with pytest.raises(DatasetNotFoundError, match="never downloads") as info:
        load_dataset(name, tmp_path / "nothing-here")
    assert expected in str(info.value)
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset(name)


def test_train_cifar10_empty_data_dir_one_line_error(tmp_path, no_network):
    result = runner.invoke(app, ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                                 "--out", str(tmp_path / "r.zarr")])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: cifar10 not found"), result.stderr
    assert str(tmp_path / "cifar-10-batches-py") in lines[0]
    assert not (tmp_path / "r.zarr").exists()


# --- models ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16)])
def test_models_forward(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7, width=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", (1, 8, 8), 10)


# --- run_experiment and the train command ---------------------------------------------------------------------
def small_config(path, **kw):
    base = dict(out=str(path), dataset="synthetic", synthetic_size=96, model="mlp", width=32, label_noise=0.5,
                steps=12, batch_size=16, lr=0.05, probe_size=40, probe_every=5, log_every=3, threads=1)
    return ExperimentConfig(**(base | kw))


def test_run_experiment_streams_groups_and_reproducibility(tmp_path):
    reports = []
    path = run_experiment(small_config(tmp_path / "a.zarr"), on_probe=reports.append)
    assert list_streams(open_root(path)) == ["batch", "probe"]
    probe = open_store(path, stream="probe")
    assert list(probe.step.values) == [0, 5, 10, 11]  # every 5 steps and the last one
    assert list(open_store(path).step.values) == [0, 3, 6, 9]
    group, label, true = (probe[k].isel(step=0).values for k in ("group", "label", "true_label"))
    assert set(np.unique(group)) == {0, 1} and (label[group == 0] == true[group == 0]).all()
    coh = m_coherence(probe).compute()
    assert [r.step for r in reports] == [0, 5, 10, 11]
    np.testing.assert_allclose([r.m_coherence for r in reports], coh.values, rtol=1e-9)
    assert reports[-1].m == 40
    again = run_experiment(small_config(tmp_path / "b.zarr"))
    np.testing.assert_array_equal(open_store(again, stream="probe").sq_norm.values, probe.sq_norm.values)


def test_train_command_writes_store(tmp_path):
    out = tmp_path / "t.zarr"
    args = ["train", "--dataset", "synthetic", "--model", "cnn", "--width", "32", "--label-noise", "0.3",
            "--steps", "6", "--batch-size", "16", "--probe-size", "24", "--probe-every", "3", "--log-every", "2",
            "--sketch-dim", "8", "--threads", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.stdout
    assert open_store(out, stream="probe").sizes["step"] == 3
    assert open_store(out).sizes["step"] == 3
    again = runner.invoke(app, args)  # the store exists: one-line error, then --overwrite works
    assert again.exit_code == 2 and again.stderr.startswith("Error: ") and "overwrite" in again.stderr
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_train_probe_mode_reaches_the_logger_and_the_notes(tmp_path):
    """--probe-mode is stored with the run and in the logger's configuration; a bad value is refused."""
    out = tmp_path / "p.zarr"
    args = ["train", "--dataset", "synthetic", "--model", "mlp", "--width", "16", "--steps", "2", "--batch-size", "8",
            "--probe-size", "8", "--log-every", "0", "--threads", "1", "--probe-mode", "eval", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = open_root(out).attrs["gradcoh_config"]
    assert config["probe_mode"] == "eval" and config["extra"]["experiment"]["probe_mode"] == "eval"
    bad = runner.invoke(app, [*args[:-4], "--probe-mode", "running", "--out", str(tmp_path / "q.zarr")])
    assert bad.exit_code == 2 and "running" in bad.stderr
    with pytest.raises(ValueError, match="probe_mode"):
        small_config(tmp_path / "r.zarr", probe_mode="precise")


def test_train_rejects_bad_options(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "x.zarr"), "--steps", "5", "--epochs", "1"])
    assert result.exit_code == 2 and "not both" in result.stderr
    with pytest.raises(ValueError, match="probe_size"):
        run_experiment(small_config(tmp_path / "y.zarr", probe_size=1000))


@pytest.mark.parametrize(("total", "every", "probes"), [
    (1, 1, 1), (48, 1, 48), (59, 1, 59), (60, 2, 31), (101, 3, 35), (600, 15, 41), (3000, 75, 41)])
def test_auto_probe_cadence_gives_a_curve_for_any_run_length(total, every, probes):
    """"auto": every step up to 59 steps, then round(total / 40); an integer cadence is kept as given."""
    from gradcoh.logger.experiment.run import AUTO_PROBES, _probe_due, probe_cadence

    assert AUTO_PROBES == 40
    assert probe_cadence("auto", total) == every and probe_cadence(7, total) == 7
    cfg = ExperimentConfig(steps=total)  # the default cadence is "auto"
    assert cfg.probe_every == "auto"
    assert sum(_probe_due(cfg, step, total) for step in range(total)) == probes


def test_train_probes_every_step_of_a_short_run_by_default(tmp_path):
    """Without --probe-every a 5-step run is probed at every step (a fixed 50 would give steps 0 and 4)."""
    out = tmp_path / "a.zarr"
    args = ["train", "--dataset", "synthetic", "--model", "mlp", "--width", "16", "--steps", "5", "--batch-size", "8",
            "--probe-size", "8", "--log-every", "0", "--threads", "1", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert list(open_store(out, stream="probe").step.values) == [0, 1, 2, 3, 4]
    assert open_root(out).attrs["gradcoh_config"]["extra"]["experiment"]["probe_every"] == "auto"
    for bad in ("0", "-3", "often", "2.5"):
        refused = runner.invoke(app, [*args[:-2], "--probe-every", bad, "--out", str(tmp_path / "b.zarr")])
        assert refused.exit_code == 2 and "--probe-every" in refused.stderr, bad
    for bad in (0, "often", True, "5"):
        with pytest.raises(ValueError, match="probe_every"):
            small_config(tmp_path / "c.zarr", probe_every=bad)


def test_interrupt_keeps_committed_steps(tmp_path, monkeypatch):
    from gradcoh.logger.experiment import run as experiment

    original = experiment.per_example_loss
    calls = {"n": 0}

    def interrupting(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return original(outputs, targets)

    monkeypatch.setattr(experiment, "per_example_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(small_config(tmp_path / "i.zarr"))
    assert open_store(tmp_path / "i.zarr").sizes["step"] >= 1


def test_demo_tiny(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--steps", "4", "--probe-size", "32",
                                 "--probe-every", "2"])
    assert result.exit_code == 0, result.output
    assert "100% noise" in result.stdout and (tmp_path / "summary.txt").exists()
    assert (tmp_path / "coherence.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.glob("*.zarr")) == ["noise_000.zarr", "noise_050.zarr", "noise_100.zarr"]


# --- the learning-rate schedule (Goyal et al. 2017, the paper's) ------------------------------------------------
def test_goyal_schedule_in_steps():
    """Digits at batch 64: an epoch is 24 steps; warmup over 120 steps from lr/120, then /10 at epochs 30, 60, 80."""
    from gradcoh.logger.experiment.schedule import LRSchedule, steps_per_epoch

    assert steps_per_epoch(1500, 64) == 24 and steps_per_epoch(256, 64) == 4
    s = LRSchedule.from_epochs(0.02, 24, 5, (30, 60, 80))
    assert (s.warmup_steps, s.decay_steps) == (120, (720, 1440, 1920))
    assert s.at(0) == 0.02 / 120 and s.at(59) == 0.02 * 60 / 120 and s.at(119) == 0.02 and s.at(700) == 0.02
    assert s.at(719) == 0.02 and s.at(720) == pytest.approx(0.002, rel=1e-15) and s.at(1920) == pytest.approx(2e-5)
    assert LRSchedule.from_epochs(0.02, 24, 0, ()).at(0) == 0.02  # no warmup: full rate from step 0


def test_run_experiment_trains_with_the_schedule(tmp_path, monkeypatch):
    """The optimizer steps with schedule.at(step): warmup by default, the full rate with warmup_epochs=0."""
    seen = []
    original = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    cfg = small_config(tmp_path / "w.zarr", probe_size=0, steps=8)  # 96 examples / 16: an epoch is 6 steps
    run_experiment(cfg)
    assert cfg.warmup_epochs == 5 and tuple(cfg.lr_decay_epochs) == (30, 60, 80)
    np.testing.assert_array_equal(seen, [0.05 * ((t + 1) / 30) for t in range(8)])
    seen.clear()
    run_experiment(small_config(tmp_path / "c.zarr", probe_size=0, steps=8, warmup_epochs=0, lr_decay_epochs=(1,)))
    np.testing.assert_allclose(seen, [0.05] * 6 + [0.005] * 2, rtol=1e-15)
    with pytest.raises(ValueError, match="warmup_epochs"):
        small_config(tmp_path / "x.zarr", warmup_epochs=-1)


def test_train_schedule_options(tmp_path):
    """--warmup-epochs and --lr-decay-epochs reach the stored run; defaults are the paper's; bad values exit 2."""
    out = tmp_path / "s.zarr"
    args = ["train", "--dataset", "synthetic", "--model", "mlp", "--width", "16", "--steps", "2", "--batch-size", "8",
            "--probe-size", "8", "--log-every", "0", "--threads", "1", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    stored = open_root(out).attrs["gradcoh_config"]["extra"]["experiment"]
    assert stored["warmup_epochs"] == 5 and stored["lr_decay_epochs"] == [30, 60, 80]
    result = runner.invoke(app, [*args, "--overwrite", "--warmup-epochs", "0", "--lr-decay-epochs", "none"])
    assert result.exit_code == 0, result.output
    stored = open_root(out).attrs["gradcoh_config"]["extra"]["experiment"]
    assert stored["warmup_epochs"] == 0 and stored["lr_decay_epochs"] == []
    for flag, bad in (("--lr-decay-epochs", "soon"), ("--lr-decay-epochs", "30,-1"), ("--warmup-epochs", "-2")):
        refused = runner.invoke(app, [*args[:-2], flag, bad, "--out", str(tmp_path / "b.zarr")])
        assert refused.exit_code == 2 and flag in refused.stderr, (flag, bad)
