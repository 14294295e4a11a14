"""The end-of-step reduction's batch squared norms: every layer's ``‖Σ_i g_i‖²`` at once (reducer.batch_sq_norms)."""

from __future__ import annotations

import torch
from gradcoh.logger.batchgrad import BatchGradient
from gradcoh.logger.reducer import batch_sq_norms
from tolerance import assert_close


class _Fixed(BatchGradient):
    """A layer's batch gradient given as ``(tensor, scale)`` per parameter (what :meth:`param_sum` returns)."""

    def __init__(self, sums: list[tuple[torch.Tensor, float]]) -> None:
        super().__init__("layer", [torch.nn.Parameter(t.clone()) for t, _ in sums])
        self.sums = sums

    def param_sum(self, i: int) -> tuple[torch.Tensor, float]:
        return self.sums[i]


def _layers(dtype: torch.dtype, seed: int) -> list[_Fixed]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    return [_Fixed([(rand(5, 3), 0.25), (rand(5), 0.25)]), _Fixed([(rand(7), 1.0)]),
            _Fixed([(rand(2, 3, 4), 3.0), (rand(2), 3.0), (rand(6), 3.0)])]


def test_every_layer_at_once_is_each_layers_own_sq_norm_bitwise():
    """The same float32 dots, scaled and summed in float64 in the same order as BatchGradient.sq_norm: bitwise."""
    layers = _layers(torch.float32, 0)
    got = batch_sq_norms(layers)
    assert got.dtype == torch.float64 and torch.equal(got, torch.stack([b.sq_norm() for b in layers]))


def test_layers_of_several_dtypes_are_reduced_each_on_its_own():
    """Parameters of two dtypes (a float64 layer in a float32 model): per layer, as BatchGradient.sq_norm."""
    layers = _layers(torch.float32, 1) + _layers(torch.float64, 2)
    want = torch.stack([sum(s * s * t.double().square().sum() for t, s in b.sums) for b in layers])
    got = batch_sq_norms(layers)
    assert_close(got, want, n=24, err_msg="sq norms")  # (float32 dots of at most 24 same-signed terms)
    assert torch.equal(got, torch.stack([b.sq_norm() for b in layers]))
