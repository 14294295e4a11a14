"""A map keyed by tensor identity that never keeps its keys alive, cheap enough for every op of a forward.

The use tracker looks up the example layout of every tensor argument of every op it observes, and whether it was
derived from parameters (Llama: about 500 ops and 1000 lookups per step). torch's ``WeakIdKeyDictionary`` builds a
Python key object per lookup (about 1.5 µs); here a lookup is one dict access by ``id`` and one call of a weak
reference.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class TensorMap:
    """``{tensor: value}`` by identity, holding only weak references to the tensors.

    An entry whose tensor died is never returned (its reference must still point at the very tensor asked for, so a
    new tensor that reuses the ``id`` is not mistaken for it); it stays, a few dozen bytes, until the map is dropped:
    the use tracker drops its maps (layouts, derivations) at the end of each micro-batch.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, t: torch.Tensor, default: Any = None) -> Any:
        """The value of ``t``, or ``default``."""
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t:
            return default
        return entry[1]

    def __contains__(self, t: torch.Tensor) -> bool:
        entry = self._entries.get(id(t))
        return entry is not None and entry[0]() is t

    def __getitem__(self, t: torch.Tensor) -> Any:
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t:
            raise KeyError(f"tensor {tuple(t.shape)} at {id(t):#x}")
        return entry[1]

    def __setitem__(self, t: torch.Tensor, value: Any) -> None:
        self._entries[id(t)] = (weakref.ref(t), value)
