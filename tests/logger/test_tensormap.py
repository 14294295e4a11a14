"""``TensorMap``: values by tensor identity, never kept alive by the map, never returned for another tensor."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from gradcoh.logger.tensormap import TensorMap


def test_values_by_identity_not_by_value():
    a, b = torch.zeros(3), torch.zeros(3)  # equal values, different tensors
    m = TensorMap()
    m[a] = (0, 1)
    assert a in m and b not in m
    assert m.get(a) == (0, 1) and m[a] == (0, 1)
    assert m.get(b) is None and m.get(b, "d") == "d"
    with pytest.raises(KeyError):
        m[b]
    m[a] = (1, 2)  # overwritten, not duplicated
    assert m[a] == (1, 2)
    view = a.view(3)  # a view is another tensor
    assert view not in m


def test_keys_not_kept_alive_and_stale_entries_never_returned():
    m = TensorMap()
    a = torch.zeros(2)
    ref = weakref.ref(a)
    m[a] = "a"
    del a
    gc.collect()
    assert ref() is None  # the map held no strong reference
    b = torch.zeros(2)
    # a new tensor reusing a dead one's id (what CPython does with freed memory): the entry's reference is dead
    m._entries[id(b)] = (ref, "stale")
    assert b not in m and m.get(b) is None
    # an entry under b's id that refers to some other live tensor is not b's either
    c = torch.zeros(2)
    m._entries[id(b)] = (weakref.ref(c), "other")
    assert b not in m and m.get(b) is None
    with pytest.raises(KeyError):
        m[b]
