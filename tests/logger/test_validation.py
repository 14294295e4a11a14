"""gradcoh.logger.validate: a user's model against an independent float64 per-example loop, as a table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gradcoh.logger import default_rules, validate
from torch import nn
from zoo import CASES


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def test_validate_reports_every_layer_exact_and_leaves_the_model_alone():
    torch.manual_seed(50)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3)).train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    report = validate(model, x, y, ce, examples=4)
    assert report.ok, str(report)
    assert [r.layer for r in report.rows] == ["0", "3"] and all(r.max_rel_error < 1e-4 for r in report.rows)
    assert "all layers exact" in str(report)
    logged, oracle = report.m_coherence
    assert abs(logged / oracle - 1) < 1e-4
    assert model.training and all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_validate_hugging_face_inputs_as_keyword_arguments():
    case = CASES["hf-gpt2"]
    torch.manual_seed(51)
    model = case.build()
    batch = case.batch(3)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def lm_loss(out, ids):
        tok = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return tok.view(ids.shape[0], -1).mean(1)

    report = validate(model, inputs, batch["input_ids"], lm_loss)
    assert report.ok, str(report)
    assert report.rows[0].layer == "transformer.wte" and report.rows[0].rule == "embedding_rule+linear_rule"


def test_validate_names_a_wrong_layer_and_a_refused_model():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.w

    def wrong_rule(module, args, kwargs, grad_outputs):  # sums to the batch gradient, but not per example
        from gradcoh.logger.grads import Dense

        x, go = args[0], grad_outputs[0]
        total = (x * go).sum(0, keepdim=True)
        return Dense((total / x.shape[0]).expand(x.shape[0], -1).unsqueeze(2).contiguous())

    torch.manual_seed(52)
    model = nn.Sequential(nn.Linear(3, 4), Scale(), nn.Linear(4, 2))
    rules = default_rules()
    rules.register(Scale, wrong_rule)
    report = validate(model, torch.randn(5, 3), torch.randint(0, 2, (5,)), ce, rules=rules)
    verdicts = {r.layer: r.verdict for r in report.rows}
    assert not report.ok and verdicts["1"] == "MISMATCH" and verdicts["0"] == verdicts["2"] == "exact"

    class Interleaved(nn.Module):  # positions and examples merged position-major: rows no longer map to examples
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(x.transpose(0, 1).reshape(-1, 3)).view(x.shape[1], x.shape[0], 2).mean(0)

    report = validate(Interleaved(), torch.randn(4, 5, 3), torch.randint(0, 2, (4,)), ce)
    assert not report.ok and "reshape" in str(report) and "cannot log this model" in str(report)
