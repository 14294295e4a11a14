"""docs/extending.md runs as written, and its worked example is exact against a torch.func.vmap(grad) oracle.

The page's ```python blocks are executed in order in one namespace (as the README's usage test does); the checks
below then use what they defined: the error before the layout rule, and the stores logged op by op (layout rule
only) and with the layer rule, each against the float64 vmap(grad) oracle, layer by layer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gradcoh.logger import GradientLogger
from oracle import assert_layers_exact, open_logged, per_example_grads_vmap
from test_readme import fenced
from tolerance import assert_close, chain_length

PAGE = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def page():
    namespace: dict = {"__name__": "__extending__"}
    for lang, code in fenced(PAGE.read_text()):
        if lang == "python":
            exec(compile(code, str(PAGE), "exec"), namespace)  # the documentation's own code
    yield namespace
    shutil.rmtree(namespace["workdir"], ignore_errors=True)


def test_unknown_op_is_refused_before_its_layout_rule(page):
    assert "after the op 'token_shift'" in page["unknown_op_error"]


def test_layer_rule_is_used_and_exact(page):
    ds = open_logged(f"{page['workdir']}/after.zarr")
    rules = {layer["name"]: layer["rule"] for layer in ds.attrs["gradcoh_layers"]}
    assert rules["1"] == "token_shift_rule"
    grads = per_example_grads_vmap(page["model"], page["loss_fn"], page["tokens"], page["targets"])
    assert_layers_exact(ds, grads, n=chain_length(page["model"], positions=page["tokens"].shape[1]))


def test_layout_rule_alone_is_exact_op_by_op(page, tmp_path):
    model, loss_fn, tokens, targets = page["model"], page["loss_fn"], page["tokens"], page["targets"]
    model.zero_grad(set_to_none=True)
    with GradientLogger(model, tmp_path / "ops.zarr") as glog, glog.record(0):
        loss_fn(model(tokens), targets).mean().backward()
    ds = open_logged(tmp_path / "ops.zarr")
    assert {layer["name"]: layer["rule"] for layer in ds.attrs["gradcoh_layers"]}["1"] == "uses"
    assert_layers_exact(ds, per_example_grads_vmap(model, loss_fn, tokens, targets),
                        n=chain_length(model, positions=tokens.shape[1]))


def test_rule_matches_the_oracle_per_example(page):
    """The rule's own output against vmap(grad) of mix, example by example (not only the norms)."""
    model, loss_fn, tokens, targets = page["model"], page["loss_fn"], page["tokens"], page["targets"]
    emb = model[0](tokens).detach()
    out = model[1](emb)
    delta = torch.autograd.grad(loss_fn(model[2](out), targets).sum(), out)[0]
    form = page["token_shift_rule"](model[1], (emb,), {}, (delta,))
    want = per_example_grads_vmap(model, loss_fn, tokens, targets)["1.mix"]
    want = want.reshape(want.shape[0], -1).numpy()  # each example's gradient against its own norm (entries cancel)
    assert_close(form.m[:, :, 0].reshape(want.shape), want, n=chain_length(model, positions=tokens.shape[1]),
                 scale=np.linalg.norm(want, axis=1, keepdims=True), err_msg="token_shift_rule")
