"""GradcohCallback in a stock transformers.Trainer: exact m-coherence per optimizer step, found through the stored
indices and checked against a float64 per-example loop; scalars in the Trainer's log history."""

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

V, T, N = 40, 6, 12


def _transformers():
    """``transformers``, imported on first use: its import (≈ 1 s of CPU, with torchvision and timm) is paid by the
    xdist worker that runs this file's tests, not by every worker that collects it."""
    import transformers

    return transformers


def GradcohCallback(*args, **kwargs):
    """gradcoh's Trainer callback, imported when a test of this file first makes one: the import pulls in the whole
    Trainer stack (2.6 s), which an xdist worker collecting this file but running none of its tests need not pay."""
    from gradcoh.logger.integrations.huggingface import GradcohCallback as callback

    return callback(*args, **kwargs)


def _from_dict(data):
    from datasets import Dataset  # (imported on first use, as above)

    return Dataset.from_dict(data)


def tiny(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=16)
    if kind == "lm":
        cfg = _transformers().GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return _transformers().GPT2LMHeadModel(cfg)
    cfg = _transformers().BertConfig(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
    return _transformers().BertForSequenceClassification(cfg)


def dataset(kind):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (N, T), generator=g)
    data = {"input_ids": ids.tolist(), "attention_mask": torch.ones(N, T, dtype=torch.long).tolist(),
            "idx": list(range(100, 100 + N))}
    data["labels"] = ids.tolist() if kind == "lm" else torch.randint(0, 3, (N,), generator=g).tolist()
    return _from_dict(data).with_format("torch")


def per_example_losses(model, batch, kind):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if kind == "lm":  # each example's token sum (the Trainer divides every token by the same count)
        tok = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none")
        return tok.view(batch["input_ids"].shape[0], -1).sum(1)
    return F.cross_entropy(out.logits, batch["labels"], reduction="none")


def oracle_losses(model, ds, rows, kind):
    """Each example's loss as the callback stores it (classifier: cross-entropy; LM: mean shifted-token CE), float64."""
    m = copy.deepcopy(model).double().eval()
    batch = {k: v[rows] for k, v in ds[:].items() if k != "idx"}
    with torch.no_grad():
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if kind == "lm":
        tok = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none")
        want = tok.view(len(rows), -1).mean(1)
    else:
        want = F.cross_entropy(logits, batch["labels"], reduction="none")
    return want.numpy(), logits.abs().flatten(1).amax(1).numpy()


def _allowed_n(model, bf16):
    """Accumulation length and precision of the callback's float32 (or bfloat16-autocast) forward and backward.

    Under bf16 autocast the products accumulate in float32 and each op's output is rounded to bfloat16: the chain
    holds :data:`tolerance.PER_MODULE` bfloat16 roundings per leaf module.
    """
    if bf16:
        return PER_MODULE * sum(1 for m in model.modules() if not list(m.children())), "bfloat16"
    return chain_length(model, positions=T), "float32"


def oracle_coherence(model, ds, rows, kind):
    """‖Σ g_i‖² / Σ ‖g_i‖² of the examples at dataset rows ``rows``, float64, one example at a time."""
    m = copy.deepcopy(model).double().eval()
    grads = []
    for r in rows:
        m.zero_grad()
        one = {k: v[r : r + 1] for k, v in ds[:].items() if k != "idx"}
        per_example_losses(m, one, kind).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    g = torch.stack(grads)
    return float(g.sum(0).pow(2).sum() / g.pow(2).sum())


@pytest.mark.parametrize(("kind", "bf16"), [("lm", False), ("classifier", False), ("classifier", True)])
def test_trainer_callback_exact_per_step(kind, bf16, tmp_path):
    model = tiny(kind)
    ds = dataset(kind)
    args = _transformers().TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=0.0, logging_steps=100, report_to="none", save_strategy="no", use_cpu=True, seed=3,
        dataloader_num_workers=0, disable_tqdm=True, bf16=bf16,
    )
    callback = GradcohCallback(tmp_path / "s.zarr", every=1, alignment=True)
    trainer = _transformers().Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    store = open_store(tmp_path / "s.zarr")
    assert list(store.step.values) == [1, 2]
    n, dtype = _allowed_n(model, bf16)
    norms = np.sqrt(store.sq_norm.values.astype(np.float64))  # Σ_i g_i·G = ‖G‖² over both micro-batches
    assert_close(store.alignment.values.sum(1), store.sum_sq_norm.values, n=2 * n, kappa=PRODUCT, dtype=dtype,
                 scale=norms.sum(1) ** 2, err_msg="Σ alignment = sum_sq_norm")
    logged = [h for h in trainer.state.log_history if "gradcoh/m_coherence" in h]
    assert [h["step"] for h in logged] == [1, 2]
    for s, history in zip(range(2), logged, strict=True):
        index = store.index.values[s]
        assert sorted(index.tolist()) == sorted(set(index.tolist())) and len(index) == 6 and (index >= 100).all()
        stored = float(store.sum_sq_norm.values[s].sum() / np.nansum(store.sq_norm.values[s]))
        rows = [int(i) - 100 for i in index]
        expected = oracle_coherence(model, ds, rows, kind)
        # the m-coherence's numerator against its terms: (Σ_l (Σ_i ‖g_il‖)²) / Σ sq_norm
        scale = float((norms[s].sum(0) ** 2).sum() / (norms[s] ** 2).sum())
        assert_close(stored, expected, n=n, kappa=PRODUCT, dtype=dtype, scale=scale, err_msg="m-coherence")
        # the logged scalar is the same float32 sums reduced again (over the layers) in another order
        assert_close(history["gradcoh/m_coherence"], stored, n=2 * store.sizes["layer"], scale=scale,
                     err_msg="log history")
        want, logit_size = oracle_losses(model, ds, rows, kind)  # per-example losses, recomputed from the logits
        assert np.isfinite(store.loss.values[s]).all()
        assert_close(store.loss.values[s], want, n=n, dtype=dtype, scale=want + logit_size, err_msg="loss")
    if kind == "classifier":  # class labels are stored; token labels are not
        labels = ds[:]["labels"].numpy()
        np.testing.assert_array_equal(store.label.values[0], labels[store.index.values[0] - 100])
    else:
        assert (store.label.values == -1).all()


def test_trainer_callback_ddp_two_processes(tmp_path):
    """torchrun-style gloo DDP: each rank stores its own examples; the global m-coherence of a step equals the
    oracle over the examples of both ranks."""
    run_two_ranks(Path(__file__).with_name("hf_ddp_worker.py"), str(tmp_path / "s.zarr"), "classifier")
    store = open_store(tmp_path / "s.zarr")
    model, ds = tiny("classifier"), dataset("classifier")
    assert list(store.step.values) == [1, 2]
    for s in range(2):
        index = store.index.values[s]
        assert len(index) == 12 and len(set(index.tolist())) == 12
        stored = float(store.sum_sq_norm.values[s].sum() / np.nansum(store.sq_norm.values[s]))
        norms = np.sqrt(store.sq_norm.values[s].astype(np.float64))
        assert_close(stored, oracle_coherence(model, ds, [int(i) - 100 for i in index], "classifier"),
                     n=chain_length(model, positions=T), kappa=PRODUCT,
                     scale=(norms.sum(0) ** 2).sum() / (norms**2).sum(), err_msg="m-coherence (two ranks)")


def test_trainer_callback_resume_appends(tmp_path):
    """Resuming from a checkpoint with mode="append" continues the store after its last committed step."""
    ds = dataset("classifier")

    def run(max_steps, mode, resume):
        args = _transformers().TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=max_steps, save_steps=2,
            save_strategy="steps", learning_rate=1e-3, report_to="none", use_cpu=True, seed=3, disable_tqdm=True,
            logging_steps=100,
        )
        trainer = _transformers().Trainer(model=tiny("classifier"), args=args, train_dataset=ds,
                                       callbacks=[GradcohCallback(tmp_path / "s.zarr", every=1, mode=mode)])
        trainer.train(resume_from_checkpoint=resume)

    run(2, "create", None)
    run(4, "append", True)
    store = open_store(tmp_path / "s.zarr")
    assert list(store.step.values) == [1, 2, 3, 4]
    assert (store.index.values >= 100).all()


def test_trainer_callback_groups_and_refusals(tmp_path):
    """group_column gives per-group scalars in the log history; gradient checkpointing is refused clearly."""
    ds = dataset("classifier").add_column("noisy", [i % 2 for i in range(N)])
    ds = ds.with_format("torch")
    args = _transformers().TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=0.0,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100,
    )
    callback = GradcohCallback(tmp_path / "g.zarr", every=1, groups=("clean", "noisy"), group_column="noisy")
    trainer = _transformers().Trainer(model=tiny("classifier"), args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()
    store = open_store(tmp_path / "g.zarr")
    np.testing.assert_array_equal(store.group.values, (store.index.values - 100) % 2)
    logged = [h for h in trainer.state.log_history if "gradcoh/m_coherence/noisy" in h]
    assert len(logged) == 2 and all("gradcoh/m_coherence/clean" in h for h in logged)
    with pytest.raises(ValueError, match="sets loss_reduction itself"):
        GradcohCallback(tmp_path / "x.zarr", loss_reduction="mean")
    args.gradient_checkpointing = True
    trainer = _transformers().Trainer(model=tiny("classifier"), args=args, train_dataset=ds,
                                   callbacks=[GradcohCallback(tmp_path / "c.zarr")])
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        trainer.train()


@pytest.mark.parametrize("columns", ["none", "id"])
def test_missing_index_column_warns_naming_the_fix(columns, tmp_path):
    """A dataset without ``idx`` (none, or named ``id``) warns at Trainer creation; index_column=None is silent."""
    ds = dataset("classifier").remove_columns("idx")
    if columns == "id":
        ds = ds.add_column("id", list(range(N)))
    ds = ds.with_format("torch")
    args = _transformers().TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                          disable_tqdm=True)
    fix = "index_column='id'" if columns == "id" else r"add_column\('idx'"
    with pytest.warns(UserWarning, match=rf"no index column 'idx'.*-1.*Fix: .*{fix}"):
        _transformers().Trainer(model=tiny("classifier"), args=args, train_dataset=ds,
                             callbacks=[GradcohCallback(tmp_path / "s.zarr")])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _transformers().Trainer(model=tiny("classifier"), args=args, train_dataset=ds,
                             callbacks=[GradcohCallback(tmp_path / "t.zarr", index_column=None)])


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


def _args(tmp_path, batch, accumulation, steps):
    return _transformers().TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=0.0, logging_steps=100, report_to="none", save_strategy="no", use_cpu=True,
        seed=3, dataloader_num_workers=0, disable_tqdm=True,
    )


@pytest.mark.parametrize("kind", ["lm", "lm-ignored", "classifier"])
def test_trainer_callback_runs_the_verifier(kind, monkeypatch, tmp_path):
    """The verifier checks every logged step under the Trainer's own loss paths (token means over ``-100``-masked
    labels, ``num_items_in_batch``, division by the accumulation steps), with the weight read from the backward
    pass; at the default rate it checks the first logged step only."""
    seen = record_verifications(monkeypatch)
    ds = dataset("lm" if kind.startswith("lm") else kind)
    if kind == "lm-ignored":  # each example has a different number of labelled tokens
        labels = ds[:]["labels"].clone()
        labels[torch.arange(T)[None, :] < (torch.arange(N) % (T - 1))[:, None]] = -100
        ds = _from_dict({**{k: v.tolist() for k, v in ds[:].items()}, "labels": labels.tolist()})
        ds = ds.with_format("torch")
    model = tiny(kind[:2] if kind.startswith("lm") else kind)
    trainer = _transformers().Trainer(model=model, args=_args(tmp_path, 3, 2, 2), train_dataset=ds,
                                   callbacks=[GradcohCallback(tmp_path / "s.zarr", every=1, verify_every=1)])
    trainer.train()
    scaled_for_accumulation = trainer.model_accepts_loss_kwargs  # the model divides by num_items_in_batch
    assert seen == [(1.0 if scaled_for_accumulation else 0.5, [])] * 2
    seen.clear()
    trainer = _transformers().Trainer(model=model, args=_args(tmp_path, 3, 2, 2), train_dataset=ds,
                                   callbacks=[GradcohCallback(tmp_path / "d.zarr", every=1)])
    trainer.train()
    assert len(seen) == 1 and seen[0][1] == []


@pytest.mark.parametrize("on_mismatch", ["raise", "flag"])
def test_trainer_verifier_sees_two_examples_swapped_inside_a_rule(on_mismatch, tmp_path):
    """The mutation of the plain verifier test under the Trainer: raised (or flagged) by the verifier only."""
    from gradcoh.logger.layers import default_rules, linear_rule
    from mutation import swapping_rule

    rules = default_rules()
    rules.register(torch.nn.Linear, swapping_rule(linear_rule))
    ds = dataset("classifier")

    def train(path, **options):
        callback = GradcohCallback(path, every=1, rules=rules, on_mismatch=on_mismatch, **options)
        trainer = _transformers().Trainer(model=tiny("classifier"), args=_args(tmp_path, 2, 1, 1), train_dataset=ds,
                                       callbacks=[callback])
        try:
            trainer.train()
        finally:
            callback.close()
        return open_store(path).reconciled.values

    if on_mismatch == "raise":
        with pytest.raises(RuntimeError, match=r"verifier recomputed one example's true gradient"):
            train(tmp_path / "r.zarr")
        return
    assert not train(tmp_path / "f.zarr").all()  # flagged
    assert train(tmp_path / "n.zarr", verify_every=0).all()  # the mutation is real: the guard alone is silent


def test_trainer_verifier_off_when_the_trainer_does_not_backpropagate_the_models_loss(monkeypatch, tmp_path):
    """label_smoothing_factor: the Trainer computes its own loss (the model gets no labels), so no terms are known:
    the step is logged, the verifier does not run, nothing is raised."""
    seen = record_verifications(monkeypatch)
    args = _args(tmp_path, 3, 1, 1)
    args.label_smoothing_factor = 0.1
    callback = GradcohCallback(tmp_path / "s.zarr", every=1, verify_every=1)
    _transformers().Trainer(model=tiny("classifier"), args=args, train_dataset=dataset("classifier"),
                         callbacks=[callback]).train()
    assert seen == [] and list(open_store(tmp_path / "s.zarr").step.values) == [1]
