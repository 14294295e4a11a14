"""Where the examples go under indexing and selection: ``t[index]``, writes into a tensor, gathers and einsum.

Part of the layout rules of :mod:`gradcoh.logger.layout` (which registers these handlers in its op table): each
function derives the example layout of an op's output from its inputs' layouts, or returns
:class:`~gradcoh.logger.layout.Unknown` naming the op when the rows were reordered, dropped, repeated or mixed.
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import Layout, Reduced, Row, Unknown, _broadcast, _norm, _Op


def _getitem(t: torch.Tensor, lay: tuple[int, int], index: Any, out: torch.Tensor, op: str) -> Layout:
    """Layout after indexing ``t[index]``.

    Basic indexing (ints, slices, None, Ellipsis) must take the batch axis whole with ``:``, or one example's rows
    (a :class:`Row`). Indexing with tensors or lists (advanced indexing, where PyTorch may move the indexed axes to
    the front) is proven on a marker: the same index applied to each entry's own row number along the batch axis
    must give ``0, 1, 2, ...`` along one output axis, whatever the values elsewhere (``h[arange(n), idx]``,
    ``f[:, ys, :, xs]``); otherwise the rows were reordered, dropped or repeated and the layout is Unknown.
    """
    axis, r = lay
    items = index if isinstance(index, tuple) else (index,)
    if any(torch.is_tensor(x) or isinstance(x, list | bool) for x in items):
        return _marked(t, lay, index, out, op)
    if any(x is Ellipsis for x in items):
        pos = items.index(Ellipsis)
        used = sum(_consumed(x) for x in items if x is not Ellipsis)
        items = items[:pos] + (slice(None),) * (t.dim() - used) + items[pos + 1 :]
    in_axis, out_axis = 0, 0
    for x in items:
        if in_axis == axis and x is not None:
            return _batch_item(x, t.shape[axis], r, out_axis, op)
        if x is None:
            out_axis += 1
        elif isinstance(x, int):
            in_axis += 1
        else:
            in_axis += 1
            out_axis += 1
    result = (out_axis + axis - in_axis, r)
    return result if result[0] < out.dim() and out.shape[result[0]] == t.shape[axis] else Unknown(op)


def _batch_item(x: Any, size: int, r: int, out_axis: int, op: str) -> Layout:
    """The layout left by a basic index item applied to the batch axis."""
    rows = range(size)[x] if isinstance(x, int | slice) else None
    if isinstance(rows, range) and rows == range(size):
        return (out_axis, r)
    if r == 1 and (isinstance(rows, int) or (isinstance(rows, range) and len(rows) == 1)):
        return Row(rows if isinstance(rows, int) else rows[0])  # one example's rows
    return Unknown(op)


def _marked(t: torch.Tensor, lay: tuple[int, int], index: Any, out: torch.Tensor | None, op: str) -> Layout:
    """Layout of ``t[index]`` (advanced indexing) from the row numbers the index picks (see :func:`_getitem`)."""
    axis, r = lay
    size = t.shape[axis]
    shape = [1] * t.dim()
    shape[axis] = size
    marker = torch.arange(size, device=t.device).view(shape).expand(t.shape)
    try:
        got = marker[index]
    except (IndexError, RuntimeError, TypeError):
        return Unknown(op)
    if out is not None and got.shape != out.shape:
        return Unknown(op)
    for d in range(got.dim()):
        if got.shape[d] != size:
            continue
        want = [1] * got.dim()
        want[d] = size
        if torch.equal(got, torch.arange(size, device=t.device).view(want).expand(got.shape)):
            return (d, r)
    first = got.reshape(-1)[:1]
    if r == 1 and got.numel() and bool((got == first).all()):
        return Row(int(first))
    return Unknown(op)


def setitem_layout(target: torch.Tensor, index: Any, value: Any, target_lay: Layout | None,
                   value_lay: Layout | None) -> Layout:
    """Layout of ``target`` after ``target[index] = value`` (each may carry the batch or not).

    Writing into a constant: the written region must take the batch axis of ``value`` whole
    (``x[..., 1:] = ids[..., :-1]``). Writing into a batch-carrying tensor follows the rows written: a constant
    may go anywhere (no example's rows move); data must land on the same example's rows (the region's batch axis
    taken whole and in order, matching the value's, or one example's rows from the same example). Anything else,
    ``h2[perm] = h`` or a partial roll ``h2[1:] = h[:-1]``, is Unknown.
    """
    if isinstance(target_lay, Unknown | Reduced) or isinstance(value_lay, Unknown | Reduced):
        return Unknown("__setitem__")
    if target_lay is None:
        return _write_into_constant(target, index, value, value_lay)
    if value_lay is None:
        return target_lay  # constants written into the batch: no example's rows move
    if isinstance(target_lay, Row):
        return target_lay if value_lay == target_lay else Unknown("__setitem__")
    with torch.no_grad():
        region = target.detach()[index]
    region_lay = _getitem(target, target_lay, index, region, "__setitem__")
    if isinstance(region_lay, Row):
        return target_lay if value_lay == region_lay else Unknown("__setitem__")
    if isinstance(region_lay, Unknown) or isinstance(value_lay, Row) or not torch.is_tensor(value):
        return Unknown("__setitem__")
    d, r = region_lay
    a, rv = value_lay
    lands = a + region.dim() - value.dim()
    return target_lay if lands == d and rv == r and value.shape[a] == region.shape[d] else Unknown("__setitem__")


def _write_into_constant(target: torch.Tensor, index: Any, value: Any, lay: Layout) -> Layout:
    if not isinstance(lay, tuple) or not torch.is_tensor(value) or value.dim() != target.dim():
        return Unknown("__setitem__")
    axis, r = lay
    items = index if isinstance(index, tuple) else (index,)
    if any(x is Ellipsis for x in items):
        pos = items.index(Ellipsis)
        items = items[:pos] + (slice(None),) * (target.dim() - len(items) + 1) + items[pos + 1 :]
    plain = all(isinstance(x, slice) for x in items[: axis + 1])
    whole = axis >= len(items) or items[axis] == slice(None)
    ok = plain and whole and target.shape[axis] == value.shape[axis]
    return (axis, r) if ok else Unknown("__setitem__")


def _consumed(x: Any) -> int:
    """Input axes consumed by one index item."""
    if x is None:
        return 0
    if torch.is_tensor(x) and x.dtype == torch.bool:
        return max(x.dim(), 1)
    return 1


def _index(op: _Op) -> Layout:
    """``t[index]``: ``t`` carries the batch; index tensors may too (per-example indices, never differentiated)."""
    if op.data[0][0] != 0:
        if len(op.data) == 1 and op.args[1] is op.t:  # a constant table indexed by one batch-carrying tensor
            return op.lay
        return op.unknown()
    if any(t.is_floating_point() or t.requires_grad for _, t, _ in op.data[1:]):
        return op.unknown()
    return _getitem(op.t, op.lay, op.args[1], op.out, op.name)


def _index_put(op: _Op) -> Layout:
    """``index_put(target, indices, values)``: as ``target[indices] = values``."""
    target, indices = op.args[0], op.arg(1, "indices")
    values = op.arg(2, "values")
    lays = {id(t): lay for _, t, lay in op.data}
    index = tuple(slice(None) if i is None else i for i in indices)
    return setitem_layout(target, index, values, lays.get(id(target)), lays.get(id(values)))


def _gather(op: _Op) -> Layout:
    """``gather(input, dim, index)``: per example when the input, the index or both carry the batch.

    Every batch-carrying argument must have the same batch axis, not ``dim``, kept whole in the output.
    """
    lays = {lay for _, _, lay in op.data}
    if len(lays) != 1:
        return op.unknown()
    axis, _ = lay = lays.pop()
    d = _norm(int(op.arg(1, "dim")), op.out.dim())
    sizes = {t.shape[axis] for _, t, _ in op.data}
    ok = d != axis and op.out.dim() == op.nd and len(sizes) == 1 and op.out.shape[axis] == sizes.pop()
    return lay if ok else op.unknown()


def _take_along_dim(op: _Op) -> Layout:
    """``take_along_dim(input, indices, dim)``: input and indices broadcast except along ``dim``."""
    dim = op.arg(2, "dim")
    if dim is None:
        return op.unknown()  # flattened
    d = _norm(int(dim), op.out.dim())
    lay = _broadcast(op.pairs, op.out, 0, op.name)
    return op.unknown() if isinstance(lay, Unknown) or lay[0] == d else lay


def _einsum(op: _Op) -> Layout:
    """``einsum(equation, *operands)``: the batch axis is a letter that the output keeps (read from the equation)."""
    equation = op.arg(0, "equation")
    operands = op.args[1:] if len(op.args) > 1 else op.arg(1, "tensors", ())
    if len(operands) == 1 and isinstance(operands[0], list | tuple):
        operands = operands[0]
    if not isinstance(equation, str):
        return op.unknown()
    letters = _einsum_letters(equation.replace(" ", ""), [t.dim() for t in operands])
    if letters is None:
        return op.unknown()
    inputs, output = letters
    result: set[tuple[int, int]] = set()
    for _, t, (axis, r) in op.data:
        i = next((i for i, x in enumerate(operands) if x is t), None)
        if i is None or inputs[i][axis] not in output:
            return op.unknown()  # contracted over the batch
        result.add((output.index(inputs[i][axis]), r))
    return result.pop() if len(result) == 1 else op.unknown()


def _einsum_letters(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """Each operand's axis letters and the output's, with ``...`` spelt out (right-aligned broadcast axes)."""
    spare = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation)
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None
    inputs, widest = [], 0
    for term, nd in zip(terms, ndims, strict=True):
        k = nd - len(term.replace("...", ""))
        widest = max(widest, k)
        inputs.append(term.replace("...", spare[len(spare) - k :] if k else ""))
    if "->" not in equation:
        counts = "".join(inputs)
        rhs = "..." * ("..." in lhs) + "".join(sorted(c for c in set(counts) if counts.count(c) == 1 and
                                                       c not in spare))
    output = rhs.replace("...", spare[len(spare) - widest :] if widest else "")
    return inputs, output
