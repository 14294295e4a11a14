"""Binding an op's arguments by name (gradcoh.logger.arguments.bind): the signature read once per function."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from gradcoh.logger import arguments


def test_bind_names_every_argument_with_defaults_and_reads_the_signature_once(monkeypatch):
    arguments._inspected.cache_clear()
    reads = []
    original = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda f, *a, **k: reads.append(f) or original(f, *a, **k))
    x, mean, var = torch.randn(2, 3, 4), torch.zeros(3), torch.ones(3)
    for _ in range(3):
        bound = arguments.bind("batch_norm", F.batch_norm, (x, mean, var), {"eps": 1e-3})
        assert bound["input"] is x and bound["running_mean"] is mean and bound["running_var"] is var
        assert bound["weight"] is None and bound["training"] is False and bound["eps"] == 1e-3
        assert bound["momentum"] == original(F.batch_norm).parameters["momentum"].default
    assert reads == [F.batch_norm]


def test_bind_of_an_unhashable_callable_is_not_cached():
    class Op:
        __hash__ = None

        def __call__(self, a, b=2):
            return a + b

    assert arguments.bind("op", Op(), (1,), {}) == {"a": 1, "b": 2}
    assert arguments.bind("op", Op(), (1, 5), {}) == {"a": 1, "b": 5}
