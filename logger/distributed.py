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


def global_grams(sums: list[torch.Tensor]) -> torch.Tensor:
    """``[L, G, G]`` float64 Gram matrices of group sums ``[G, P_l]`` summed over all ranks.

    The group-sum vectors of all layers are summed over ranks with one float64 all-reduce first; the Gram of the
    summed vectors is the exact global one (a sum of per-rank Grams would miss the cross-rank terms).
    """
    flat = torch.cat([s.reshape(-1).to(torch.float64) for s in sums])
    torch.distributed.all_reduce(flat)  # SUM over ranks
    parts = flat.split([s.numel() for s in sums])
    return torch.stack([p.view_as(s) @ p.view_as(s).T for p, s in zip(parts, sums, strict=True)])
