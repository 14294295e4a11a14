"""Several processes (DDP): who this process is, its share of a probe sample, and the global group Gram matrices."""

from __future__ import annotations

import torch


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size of this process: given, from ``torch.distributed``, or ``(0, 1)``."""
    dist = torch.distributed
    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("world_size > 1 needs an initialised torch.distributed process group (all-reduce)")
    return rank, world_size


def share(m: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share ``[start, stop)`` of ``m`` items for ``rank`` (the first ``m % world`` get one more)."""
    base, extra = divmod(m, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def global_sums(sums: list[torch.Tensor]) -> list[torch.Tensor]:
    """Group sums ``[G, P_l]`` of every layer summed over all ranks, in float64 (one all-reduce).

    The Gram of the summed vectors is the exact global one (a sum of per-rank Grams would miss the cross-rank
    terms), and their total is the global batch gradient each example's alignment needs.
    """
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in sums])
    torch.distributed.all_reduce(flat)  # SUM over ranks
    return [p.view_as(s) for p, s in zip(flat.split([s.numel() for s in sums]), sums, strict=True)]
