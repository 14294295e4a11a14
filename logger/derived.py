"""Tensors derived from parameters and constants only, and how each was computed (to pull gradients back).

``pos_embed``, ``cls_token.expand(B, -1, -1)``, ``wpe(arange(T))``, ``table[index].permute(2, 0, 1)``: the use tracker
(:mod:`gradcoh.logger.uses`) records for each such tensor the op that made it (a :class:`Node`), so that a use of it
with the data can pull each example's gradient back to the parameters (:mod:`gradcoh.logger.usegrads`).
:class:`Derivations` holds them for one micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .arguments import op_name
from .tensormap import TensorMap


@dataclass(eq=False)
class Node:
    """How a derived tensor was computed: the op, its arguments, and which of them came from parameters.

    Attributes:
        func: The op.
        flat: The op's arguments, flattened (``torch.utils._pytree``); tensors from parameters stay as they were.
        spec: Their tree structure.
        parents: ``{leaf position: Parameter | Node}`` of the arguments that are parameters or derived tensors,
            resolved when the op ran (an in-place op on a derived tensor gets the earlier node as its parent).
        output: Position of the tensor among the op's tensor outputs.
    """

    func: Callable
    flat: list
    spec: Any
    parents: dict[int, Any]
    output: int

    def call(self, values: dict[int, torch.Tensor]) -> torch.Tensor:
        """Re-run the op with the parents' leaves replaced by ``values``."""
        leaves = list(self.flat)
        inplace = _inplace(self.func, pytree.tree_unflatten(self.flat, self.spec)[1])
        for i, v in values.items():
            leaves[i] = v.clone() if inplace else v  # an in-place op (ReLU(inplace=True)) must not write into its input
        a, k = pytree.tree_unflatten(leaves, self.spec)
        res = self.func(*a, **k)
        return res if isinstance(res, torch.Tensor) else [r for r in res if isinstance(r, torch.Tensor)][self.output]


DROPOUTS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"})


def _inplace(func: Callable, kwargs: dict) -> bool:
    """Whether an op writes into its first argument (``zero_``, ``__iadd__``, ``F.relu(x, inplace=True)``)."""
    name = op_name(func)
    return (name.endswith("_") and not name.startswith("__")) or name.startswith("__i") or kwargs.get("inplace") is True


@dataclass(eq=False)
class _WriteThrough:
    """A derived tensor after an in-place op on a view of it: ``base`` with the view rewritten by the op.

    Swin-V2 clones the qkv bias and zeroes its key part in place through a slice; the bias that reaches
    ``F.linear`` is then this function of the clone.
    """

    view: Node
    base_position: int
    op: Node

    def __call__(self, base: torch.Tensor) -> torch.Tensor:
        base = base.clone()
        view = self.view.call({self.base_position: base})
        leaves = list(self.op.flat)
        leaves[0] = view
        a, k = pytree.tree_unflatten(leaves, self.op.spec)
        self.op.func(*a, **k)
        return base


Origin = Any
"""A parameter or a :class:`Node`: where a parameter-derived argument of a use came from."""


class Derivations:
    """The derived tensors of one micro-batch: ``{tensor: Node}``, and the tracked parameters they start from.

    Args:
        params: ``{id(parameter): parameter}`` of every tracked parameter.
    """

    def __init__(self, params: dict[int, torch.nn.Parameter]) -> None:
        self.params = params
        self.nodes = TensorMap()  # derived tensor -> Node (most lookups miss: one dict access each)

    def origin(self, t: torch.Tensor) -> Origin | None:
        """The parameter or derivation node behind ``t``, or None for data and constants."""
        if id(t) in self.params:
            return self.params[id(t)]
        return self.nodes.get(t)

    def is_derived(self, t: torch.Tensor) -> bool:
        """Whether ``t`` was computed from parameters and constants only (or is a parameter)."""
        return id(t) in self.params or t in self.nodes

    def derive(self, func: Callable, args: tuple, kwargs: dict, outs: list[torch.Tensor]) -> None:
        """Remember how tensors computed from parameters and constants only were made."""
        if not any(o.requires_grad for o in outs):
            return
        flat, spec = pytree.tree_flatten((args, kwargs))
        parents = {i: self.origin(x) for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and self.is_derived(x)}
        for i, o in enumerate(outs):
            if o.requires_grad:
                self.nodes[o] = Node(func, flat, spec, parents, i)
        if outs and flat and outs[0] is flat[0] and _inplace(func, kwargs):
            self._write_through(outs[0])

    def _write_through(self, view: torch.Tensor) -> None:
        """An in-place op on a view of a derived tensor changed the tensor it views: re-derive that tensor."""
        base = view._base
        op = self.nodes.get(view)
        before = None if op is None else op.parents.get(0)
        if base is None or base not in self.nodes or not isinstance(before, Node):
            return
        old = self.nodes[base]
        positions = [i for i, src in before.parents.items() if src is old]
        if len(positions) != 1:
            return
        flat, spec = pytree.tree_flatten(((base,), {}))
        self.nodes[base] = Node(_WriteThrough(before, positions[0], op), flat, spec, {0: old}, 0)

    def freeze_dropout(self, args: tuple, kwargs: dict, out: Any, rng: torch.Tensor) -> None:
        """A dropout of a parameter-derived tensor (DeBERTa's relative embeddings) becomes ``x · noise``.

        With the forward's own noise, pulling gradients back through it uses the batch forward's mask. The noise is
        regenerated from the random state the op started from, as the CPU kernel draws it (``bernoulli_(1 - p) /
        (1 - p)``), and kept only if ``x · noise`` is the op's output to the last bit; else, where ``x`` has no zeros,
        it is read off the output. Otherwise the derivation stays random and pulling back through it is refused by
        ``torch.func``.
        """
        x = args[0]
        p = float(args[1] if len(args) > 1 else kwargs.get("p", 0.5))
        if not isinstance(out, torch.Tensor) or out not in self.nodes or not 0 < p < 1 or out is x:
            return
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            if x.is_cuda:
                torch.cuda.set_rng_state(rng, x.device)
            else:
                torch.set_rng_state(rng)
            noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
        if not torch.equal(x * noise, out):
            noise = (out != 0).to(out.dtype) / (1 - p)
            if bool((x == 0).any()) or not torch.equal(x * noise, out):
                return
        flat, spec = pytree.tree_flatten(((x, noise.detach()), {}))
        self.nodes[out] = Node(torch.mul, flat, spec, {0: self.origin(x)}, 0)

    def roots(self, source: Origin) -> list[torch.nn.Parameter]:
        """The tracked parameters a parameter or derivation node comes from."""
        if not isinstance(source, Node):
            return [source]
        out: list[torch.nn.Parameter] = []
        for parent in source.parents.values():
            out += [p for p in self.roots(parent) if all(p is not q for q in out)]
        return out
