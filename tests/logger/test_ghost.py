"""Ghost norms from symmetric Gram blocks (gradcoh.logger.ghost) against float64, and the Gram cache's keys."""

from __future__ import annotations

import pytest
import torch
from gradcoh.logger import ghost
from gradcoh.logger.grads import Factored
from tolerance import PRODUCT, assert_close


def _oracle(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``‖Σ_t u_t v_tᵀ‖²`` in float64 and the size of its terms ``Σ_ts |u_t·u_s| |v_t·v_s|``."""
    u, v = u.double(), v.double()
    exact = torch.bmm(u.transpose(1, 2), v).square().sum((1, 2))
    terms = (torch.bmm(u, u.transpose(1, 2)).abs() * torch.bmm(v, v.transpose(1, 2)).abs()).sum((1, 2))
    return exact, terms


@pytest.mark.parametrize(("t", "depth"), [(2, 0), (63, 0), (65, 0), (64, 1), (96, 1), (128, 2), (256, 3), (512, 3)])
def test_levels(t, depth):
    assert ghost.levels(t) == depth


@pytest.mark.parametrize("t", [3, 64, 96, 128, 256, 512])
def test_blocked_ghost_norm_matches_float64(t):
    torch.manual_seed(t)
    n, rows, cols = 3, 7, 5
    u, v = torch.randn(n, t, rows), torch.randn(n, t, cols)
    u[1, : t // 3] *= 0.01  # uneven positions: every block counts
    v[2, t // 2 :] = -v[2, t // 2 :].abs() * 3
    exact, terms = _oracle(u, v)
    got = ghost.sq_norms(u, v)
    assert_close(got, exact, n=t * t + max(rows, cols), kappa=PRODUCT, scale=terms, err_msg=f"T={t}")
    # the same through a factored form, with and without a cache
    form = Factored(u, v)
    assert_close(form.sq_norms(ghost.GramCache()), exact, n=t * t + max(rows, cols), kappa=PRODUCT, scale=terms)


def test_blocks_count_the_computed_entries():
    """The cost model's fraction is what the blocks compute."""
    for t in (64, 128, 256, 96):
        x = torch.randn(2, t, 3)
        entries = sum(b.numel() for b in ghost.gram_blocks(x)) / 2
        assert entries == ghost.gram_fraction(t) * t * t


def test_cache_shares_blocks_of_the_same_tensor_only():
    torch.manual_seed(5)
    cache = ghost.GramCache(size=3)
    x = torch.randn(2, 64, 4)
    first = cache.blocks(x)
    assert cache.blocks(x.detach()) is first  # a detached alias: same storage, shape, version
    assert cache.blocks(x.reshape(2, 64, 4)) is first
    head = cache.blocks(x[:, :32])
    assert head is not first and cache.misses == 2  # another view: another key
    assert cache.blocks(x[:, 32:]) is not head  # same shape and strides, another offset
    x.mul_(2)  # in place: the version moves on, the old blocks are not reused
    again = cache.blocks(x)
    assert again is not first
    assert torch.allclose(again[-1], 4 * first[-1])
    y = x.clone()  # equal values, another tensor: computed again
    assert cache.blocks(y) is not again
    cache.clear()
    assert cache.blocks(x) is not again


def test_cache_holds_its_tensors_so_keys_cannot_be_reused():
    cache = ghost.GramCache(size=4)
    for i in range(6):  # freed tensors' storage could be reused by the next one; the cache keeps them alive
        x = torch.full((2, 64, 4), float(i))
        blocks = cache.blocks(x)
        assert torch.equal(blocks[-1], torch.bmm(x.reshape(4, 32, 4), x.reshape(4, 32, 4).transpose(1, 2)))
