"""Mutations of the code under test that a check must catch (the verifier's tests)."""

from __future__ import annotations

import torch


def swapping_rule(rule):
    """A layer rule that sees examples 0 and 1 swapped (inputs and output gradients alike).

    The swapped per-example gradients still sum to the batch gradient, so the reconciliation guard cannot see it; the
    verifier must.
    """

    def swap(t):
        if not torch.is_tensor(t) or t.dim() == 0 or t.shape[0] < 2:
            return t
        t = t.clone()
        t[[0, 1]] = t[[1, 0]]
        return t

    def mutated(module, args, kwargs, grads):
        return rule(module, tuple(swap(a) for a in args), kwargs, tuple(swap(g) for g in grads))

    return mutated
