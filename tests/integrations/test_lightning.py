"""GradcohCallback in a stock lightning.Trainer with accumulate_grad_batches=2: exact m-coherence per optimizer
step against a float64 per-example loop (examples found through the stored indices); scalars in a CSV logger."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gradcoh.analysis import open_store
from launch import run_two_ranks
from tolerance import PER_MODULE, PRODUCT, assert_close, chain_length
from torch import nn
from torch.utils.data import DataLoader

# Lightning itself (≈ 3 s of CPU to import) is imported by the tests that use it, not at collection: under
# ``--dist loadfile`` every xdist worker imports every test module, and only one of them runs this file.


def _allowed(net, precision):
    """Accumulation length and precision: the float32 chain, or bfloat16 output roundings per leaf module."""
    if precision == "32-true":
        return chain_length(net), "float32"
    return PER_MODULE * sum(1 for m in net.modules() if not list(m.children())), "bfloat16"


def _coherence_scale(store, s):
    """The m-coherence's numerator terms: Σ_l (Σ_i ‖g_il‖)² / Σ sq_norm."""
    norms = np.sqrt(np.nan_to_num(store.sq_norm.values[s].astype(np.float64)))
    return float((norms.sum(0) ** 2).sum() / (norms**2).sum())


def oracle(net, data, rows):
    m = copy.deepcopy(net).double()
    grads = []
    for r in rows:
        m.zero_grad()
        F.cross_entropy(m(data.x[r : r + 1].double()), data.y[r : r + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    g = torch.stack(grads)
    return float(g.sum(0).pow(2).sum() / g.pow(2).sum())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_callback_exact_per_step(precision, tmp_path):
    import lightning as L
    from lightning_models import GradcohCallback, Indexed, Module

    data, module = Indexed(), Module()
    loader = DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(2))
    callback = GradcohCallback(tmp_path / "s.zarr", every=1, index=lambda b: b[2], labels=lambda b: b[1],
                               alignment=True)
    csv = L.pytorch.loggers.CSVLogger(tmp_path / "logs")
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[callback], logger=csv, accelerator="cpu",
                        devices=1, precision=precision, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, loader)
    store = open_store(tmp_path / "s.zarr")
    assert list(store.step.values) == [0, 1]
    n, dtype = _allowed(module.net, precision)
    norms = np.sqrt(store.sq_norm.values.astype(np.float64))
    assert_close(store.alignment.values.sum(1), store.sum_sq_norm.values, n=2 * n, kappa=PRODUCT, dtype=dtype,
                 scale=norms.sum(1) ** 2, err_msg="Σ alignment = sum_sq_norm")
    for s in range(2):
        index = store.index.values[s]
        assert len(set(index.tolist())) == 6
        np.testing.assert_array_equal(store.label.values[s], data.y[index].numpy())
        stored = float(store.sum_sq_norm.values[s].sum() / store.sq_norm.values[s].sum())
        assert_close(stored, oracle(module.net, data, index), n=n, kappa=PRODUCT, dtype=dtype,
                     scale=_coherence_scale(store, s), err_msg="m-coherence")
        with torch.no_grad():
            logits = copy.deepcopy(module.net).double()(data.x[index].double())
        want = F.cross_entropy(logits, data.y[index], reduction="none").numpy()
        assert np.isfinite(store.loss.values[s]).all()
        assert_close(store.loss.values[s], want, n=n, dtype=dtype, scale=want + logits.abs().amax(1).numpy(),
                     err_msg="per-example loss")
    metrics = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "gradcoh/m_coherence" in metrics


def test_lightning_callback_ddp_two_processes(tmp_path):
    """torchrun-style gloo DDP: the global m-coherence of each step equals the oracle over both ranks' examples."""
    from lightning_models import Indexed, Module

    run_two_ranks(Path(__file__).with_name("lightning_ddp_worker.py"), str(tmp_path / "s.zarr"))
    store = open_store(tmp_path / "s.zarr")
    data, module = Indexed(), Module()
    assert list(store.step.values) == [0, 1]
    assert store.n_examples.values.tolist() == [12, 4]  # 8 examples per rank: windows of 3 + 3, then 2 (epoch end)
    for s in range(2):
        index = store.index.values[s]
        index = index[index >= 0]
        assert len(set(index.tolist())) == store.n_examples.values[s]
        stored = float(store.sum_sq_norm.values[s].sum() / np.nansum(store.sq_norm.values[s]))
        assert_close(stored, oracle(module.net, data, index), n=chain_length(module.net), kappa=PRODUCT,
                     scale=_coherence_scale(store, s), err_msg="m-coherence (two ranks)")


def test_lightning_callback_resume_appends(tmp_path):
    """fit(ckpt_path=...) with mode="append" continues the store after its last committed step."""
    import lightning as L
    from lightning_models import GradcohCallback, Indexed, Module

    data = Indexed()

    def run(max_steps, mode, ckpt):
        callback = GradcohCallback(tmp_path / "s.zarr", every=1, mode=mode, index=lambda b: b[2])
        trainer = L.Trainer(max_steps=max_steps, callbacks=[callback], logger=False, accelerator="cpu", devices=1,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(Module(), DataLoader(data, batch_size=4), ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / "last.ckpt")

    run(2, "create", None)
    run(4, "append", tmp_path / "last.ckpt")
    assert list(open_store(tmp_path / "s.zarr").step.values) == [0, 1, 2, 3]


def test_close_after_training_raised_removes_hooks(tmp_path):
    """An exception inside a logged step leaves its hooks installed until callback.close()."""
    import lightning as L
    from lightning_models import GradcohCallback, Indexed, Module

    class Failing(Module):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    callback = GradcohCallback(tmp_path / "s.zarr", every=1, index=lambda b: b[2])
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[callback], logger=False, accelerator="cpu",
                        devices=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    module = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, DataLoader(Indexed(), batch_size=3))
    callback.close()
    assert torch.overrides._get_current_function_mode_stack() == []
    assert not module.net[0]._forward_hooks and not module.net[0]._forward_pre_hooks


def record_verifications(monkeypatch):
    """Each verified step's ``(weight read from the backward pass, layers found wrong)``."""
    from gradcoh.logger import reducer

    seen, original = [], reducer.compare

    def recording(truth, *args, **kwargs):
        bad = original(truth, *args, **kwargs)
        seen.append((truth.weight, bad))
        return bad

    monkeypatch.setattr(reducer, "compare", recording)
    return seen


def _fit(callback, module, batch, accumulation, steps):
    import lightning as L
    from lightning_models import Indexed

    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulation, callbacks=[callback], logger=False,
                        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    try:
        trainer.fit(module, DataLoader(Indexed(), batch_size=batch))
    finally:
        callback.close()


def test_lightning_callback_runs_the_verifier(monkeypatch, tmp_path):
    """Attached losses: every logged step is verified, each example's weight (mean over 3, accumulation over 2) read
    from the backward pass; detached losses are not verified; the default rate checks the first logged step."""
    from lightning_models import GradcohCallback, Module

    seen = record_verifications(monkeypatch)
    _fit(GradcohCallback(tmp_path / "a.zarr", every=1, verify_every=1), Module(attached=True), 3, 2, 2)
    assert [bad for _, bad in seen] == [[], []]
    assert [w for w, _ in seen] == pytest.approx([1 / 6, 1 / 6], rel=1e-6)  # d(mean(per) / 2) / d per_j
    seen.clear()
    _fit(GradcohCallback(tmp_path / "d.zarr", every=1, verify_every=1), Module(), 3, 2, 2)
    assert seen == []
    _fit(GradcohCallback(tmp_path / "e.zarr", every=1), Module(attached=True), 3, 2, 2)
    assert len(seen) == 1 and seen[0][1] == []


@pytest.mark.parametrize("on_mismatch", ["raise", "flag"])
def test_lightning_verifier_sees_two_examples_swapped_inside_a_rule(on_mismatch, tmp_path):
    """The mutation of the plain verifier test under Lightning: raised (or flagged) by the verifier only."""
    from gradcoh.logger.layers import default_rules, linear_rule
    from lightning_models import GradcohCallback, Module
    from mutation import swapping_rule

    rules = default_rules()
    rules.register(nn.Linear, swapping_rule(linear_rule))

    def fit(path, **options):
        callback = GradcohCallback(path, every=1, rules=rules, on_mismatch=on_mismatch, **options)
        _fit(callback, Module(attached=True), 2, 1, 1)
        return open_store(path).reconciled.values

    if on_mismatch == "raise":
        with pytest.raises(RuntimeError, match=r"verifier recomputed one example's true gradient"):
            fit(tmp_path / "r.zarr")
        return
    assert not fit(tmp_path / "f.zarr").all()  # flagged
    assert fit(tmp_path / "n.zarr", verify_every=0).all()  # the mutation is real: the guard alone is silent
