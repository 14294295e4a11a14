"""What a logged step needs besides the hooks.

Metadata checks, the single device→host copy, the model state a probe saves and restores, and each rank's share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def step_metadata(key: str, value: Any, n: int) -> np.ndarray | None:
    """``index``/``labels``/``group``/``true_labels`` as int64 NumPy ``[n]`` (None stays None); clear errors."""
    if value is None:
        return None
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"{key} must hold integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    if arr.shape[0] != n:
        raise ValueError(f"{key} has {arr.shape[0]} entries but the step has {n} examples")
    return arr


def or_default(value: np.ndarray | None, default: np.ndarray) -> np.ndarray:
    """``value``, or ``default`` when it is None."""
    return default if value is None else value


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy device tensors to NumPy with a single transfer (they are packed into one byte buffer first)."""
    on_device = {k: t for k, t in tensors.items() if t.device.type != "cpu"}
    out = {k: t.numpy() for k, t in tensors.items() if t.device.type == "cpu"}
    if on_device:
        flat = torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in on_device.values()])
        buf = flat.cpu().numpy()  # the device→host copy (synchronises once per logged step)
        offset = 0
        for key, t in on_device.items():
            nbytes = t.numel() * t.element_size()
            dtype = np.dtype(str(t.dtype).removeprefix("torch."))
            out[key] = buf[offset : offset + nbytes].view(dtype).reshape(t.shape)
            offset += nbytes
    return out


class ModelState:
    """Train/eval flags, buffers and RNG states of a model, saved before a probe and restored after it."""

    def __init__(self, modes: list, buffers: list, cpu_rng: torch.Tensor, cuda_rng: list | None) -> None:
        self.modes, self.buffers, self.cpu_rng, self.cuda_rng = modes, buffers, cpu_rng, cuda_rng

    @classmethod
    def save(cls, model: nn.Module) -> ModelState:
        """Snapshot ``model``'s modes and buffers and the global RNG states."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls([(m, m.training) for m in model.modules()],
                   [(b, b.detach().clone()) for b in model.buffers()], torch.get_rng_state(), cuda)

    def restore(self, model: nn.Module) -> None:
        """Put everything back exactly."""
        for m, training in self.modes:
            m.training = training
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


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
