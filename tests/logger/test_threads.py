"""The exactness checks at two BLAS/OpenMP threads, whatever the thread count of the run.

tests/conftest.py gives each xdist worker ``cpus // workers`` threads (one per worker on a 2-core machine), and .ci/run
repeats tests/logger at one thread; so that two-thread blocking and reduction orders are still compared against the
float64 oracles on every machine, these tests switch torch to two threads for a representative set of the exactness
checks: convolutions (torchvision ResNet, ConvNeXt), attention (timm ViT, whose tolerance once failed on another
CPU), a language model (GPT-2), the fused Linear route (both reductions) and the per-layer rules.
"""

from __future__ import annotations

import pytest
import torch
from test_exact import test_layer_rules_match_vmap_oracle as check_layer_rule
from test_fused import test_fused_statistics_exact_and_grad_equal_to_rounding as check_fused
from test_zoo import check_zoo_case


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["tv-resnet", "tv-convnext", "timm-vit", "hf-gpt2"])
def test_zoo_exact_at_two_threads(name, two_threads, tmp_path):
    check_zoo_case(name, tmp_path)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_exact_at_two_threads(reduction, two_threads, tmp_path, unguarded):
    check_fused(reduction, tmp_path)


@pytest.mark.parametrize("kind", ["linear_seq", "conv2d", "conv2d_factored", "layernorm"])
def test_layer_rules_exact_at_two_threads(kind, two_threads, tmp_path):
    check_layer_rule(kind, "mean", tmp_path)
