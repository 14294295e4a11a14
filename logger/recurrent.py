"""Recurrent layers: exact per-example gradients of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``.

The fused kernels cannot be differentiated per example, so the rule replays the recurrence once for the whole
batch, step by step in plain autograd with the module's own weights and the call's saved inputs, and
back-propagates the captured output gradients through it. Every weight enters through one of two projections per
step, ``A_t = W_ih x_t + b_ih`` and ``B_t = W_hh h_{t-1} + b_hh`` (and ``h_t = W_hr m_t`` with ``proj_size``), so
each example's gradient is a sum over time of outer products,

    G_ih = Σ_t δA_t x_tᵀ,    G_hh = Σ_t δB_t h_{t-1}ᵀ,    g_b = Σ_t δ_t,

kept as :class:`~gradcoh.logger.grads.Factored` forms (ghost norms, nothing ``[n, 4H, H]`` materialised). The
replay agrees with the fused kernel to float32 rounding; it costs one extra forward and backward of the recurrence
in Python (T small matrix products per layer and direction), measured in docs/benchmarks.md.

Supported: ``batch_first`` True and False, several layers, bidirectional, ``proj_size`` (LSTM), initial states,
and packed sequences (each example's recurrence runs over its own length, in the order the sequences were packed
from). Dropout between layers in train mode draws a mask inside the fused kernel that cannot be replayed: refused
with the way around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import layout
from .grads import Composite, Dense, Factored, MatrixView, bias_grad
from .layout import Unknown


# --- where the examples are around recurrent ops --------------------------------------------------------------
@dataclass(frozen=True)
class Ordered(Unknown):
    """Rows along ``axis`` are the examples ``order[j]``, one row each: a batch sorted by length for packing.

    A subclass of :class:`~gradcoh.logger.layout.Unknown`: a layer fed such rows is refused (naming the op); the
    packing ops below follow it, and the inverse permutation restores the plain layout.
    """

    axis: int = 0
    order: tuple[int, ...] = ()


@dataclass(frozen=True)
class Packed(Unknown):
    """The data of a ``PackedSequence`` whose sorted sequences are the examples ``order[k]``."""

    order: tuple[int, ...] = ()


def _rows(axis: int, order: tuple[int, ...], op: str) -> layout.Layout:
    return (axis, 1) if order == tuple(range(len(order))) else Ordered(op, axis, order)


def _order(lay: Any, axis: int, size: int) -> tuple[int, ...] | None:
    """The example of each row along ``axis``, when each row is one example."""
    if isinstance(lay, Ordered):
        return lay.order if lay.axis == axis else None
    if isinstance(lay, tuple) and lay == (axis, 1):
        return tuple(range(size))
    return None


def _index_select(op: Any) -> layout.Layout | None:
    """``index_select`` along the batch axis (sorting a batch by length, and undoing it).

    The index may come from the batch (lengths computed from a padding mask): only its values matter.
    """
    if [pos for pos, _, _ in op.data] not in ([0], [0, 2]):
        return None
    t, lay = op.data[0][1], op.data[0][2]
    dim = int(op.arg(1, "dim"))
    dim = dim + t.dim() if dim < 0 else dim
    order = _order(lay, dim, t.shape[dim])
    if order is None:
        return None
    return _rows(dim, tuple(order[i] for i in op.arg(2, "index").tolist()), op.name)


def _pack(op: Any) -> layout.Layout | None:
    """``_pack_padded_sequence(input, lengths, batch_first)``: the packed data of the batch's sequences."""
    pos, t, lay = op.data[0]  # the lengths may come from the batch too
    order = _order(lay, 0 if op.arg(2, "batch_first") else 1, t.shape[0 if op.arg(2, "batch_first") else 1])
    if pos != 0 or order is None:
        return None
    return Packed(op.name, order)


def _unpack(op: Any) -> layout.Layout | None:
    """``_pad_packed_sequence(data, batch_sizes, batch_first, ...)``: padded rows in packing order."""
    lay = op.data[0][2]
    if not isinstance(lay, Packed):
        return None
    return _rows(0 if op.arg(2, "batch_first") or op.out.dim() == 1 else 1, lay.order, op.name)


def _recurrent_op(op: Any) -> layout.Layout | None:
    """``_VF.lstm/gru/rnn_tanh/rnn_relu`` keep the examples: ``(output, h_n[, c_n])``.

    Padded form ``(input, hx, weights, has_biases, layers, dropout, train, bidirectional, batch_first)``: the batch
    is on axis 0 (``batch_first``) or 1 of the input and the output, on axis 1 of the states. Packed form
    ``(data, batch_sizes, hx, weights, ...)``: packed output, states in packing order. Output and state are told
    apart by shape; where both shapes fit (batch = layers·directions = steps) the layout is unknown.
    """
    inp = op.args[0] if op.args else None
    if not torch.is_tensor(inp) or not op.data or op.data[0][0] != 0:
        return None
    packed = torch.is_tensor(op.args[1]) and op.args[1].dim() == 1 and not op.args[1].is_floating_point()
    first = op.data[0][2]
    if packed:
        if not isinstance(first, Packed):
            return None
        # initial states from the batch, in packing order (zeros sized by batch_sizes[0] carry the packed layout)
        others = [lay for pos, _, lay in op.data[1:] if pos != 1 and lay != first]
        if any(_order(lay, 1, len(first.order)) != first.order for lay in others):
            return Unknown(op.name)
        return first if op.out.dim() == 2 else _rows(1, first.order, op.name)
    if inp.dim() != 3 or len(op.args) < 9:
        return None
    batch_first, dirs, layers = bool(op.args[8]), 2 if op.args[7] else 1, int(op.args[4])
    axis = 0 if batch_first else 1
    if isinstance(first, Unknown) or first[0] != axis or any(
            isinstance(lay, Unknown) or lay != (1, first[1]) for _, _, lay in op.data[1:]):
        return Unknown(op.name)
    hidden = op.args[2][1].shape[1]  # weight_hh_l0: [gates, hidden (or proj_size)]
    rows, steps, out = inp.shape[axis], inp.shape[1 - axis], op.out
    is_output = out.dim() == 3 and out.shape[axis] == rows and out.shape[1 - axis] == steps and \
        out.shape[2] == dirs * hidden
    is_state = out.dim() == 3 and out.shape[0] == layers * dirs and out.shape[1] == rows
    if is_output and (not is_state or not batch_first):
        return (axis, first[1])
    return (1, first[1]) if is_state and not is_output else Unknown(op.name)


layout.register(("lstm", "gru", "rnn_tanh", "rnn_relu"), _recurrent_op)
layout.register(("index_select",), _index_select)
layout.register(("_pack_padded_sequence",), _pack)
layout.register(("_pad_packed_sequence",), _unpack)


def _bound(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """``(input, hx)`` of an RNN call."""
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    return x, hx


def rows_per_example(module: nn.RNNBase, args: tuple, kwargs: dict, layout_of: Any, n: int) -> int:
    """Rows of the call's batch axis per example, checking that the batch is where the module takes it.

    Args:
        module: The recurrent module.
        args: The call's positional arguments.
        kwargs: Its keyword arguments.
        layout_of: The example layout of a tensor (None for constants).
        n: Examples in the micro-batch.

    Raises:
        ValueError: The batch is not on the module's batch axis, or packed sequences that are not the examples.
    """
    x, _ = _bound(args, kwargs)
    name = type(module).__name__
    lay = layout_of(x.data if isinstance(x, PackedSequence) else x)
    if isinstance(x, PackedSequence):
        unsorted = range(int(x.batch_sizes[0])) if x.unsorted_indices is None else x.unsorted_indices.tolist()
        if not isinstance(lay, Packed) or [lay.order[i] for i in unsorted] != list(range(n)):
            raise ValueError(
                f"{name}: the packed sequences are not the examples of the batch in order; pack them with "
                "pack_padded_sequence from a padded batch of every example (inside the recorded forward), or exclude "
                "the module with layers=..."
            )
        return 1
    axis = 0 if module.batch_first else 1
    if x.dim() == 2:  # unbatched input [T, F]: the call is one example
        if n > 1:
            raise ValueError(f"{name} called on an unbatched sequence inside a batch of {n}; pass [batch, T, F]")
        return 1
    if lay is None or isinstance(lay, Unknown) or lay[0] != axis:
        where = f"after the op '{lay.op}'" if isinstance(lay, Unknown) else \
            "not in its input" if lay is None else f"on dimension {lay[0]}"
        raise ValueError(
            f"{name} (batch_first={module.batch_first}) takes the batch on dimension {axis} of its input but the "
            f"examples are {where}; transpose the input, or exclude the module with layers=..."
        )
    return lay[1]


def _cell(mode: str, a: torch.Tensor, b: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> tuple:
    """One step of the recurrence from the two projections: ``(new h before projection, new c)``."""
    if mode == "LSTM":
        i, f, g, o = (a + b).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ar, az, an = a.chunk(3, dim=-1)
        br, bz, bn = b.chunk(3, dim=-1)
        r, z = torch.sigmoid(ar + br), torch.sigmoid(az + bz)
        new = torch.tanh(an + r * bn)
        return (1 - z) * new + z * h, None
    pre = a + b
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


class _Replay:
    """The recurrence of one call replayed in autograd; records what each weight's factors need."""

    def __init__(self, module: nn.RNNBase) -> None:
        self.module = module
        self.wanted: list[torch.Tensor] = []  # tensors whose gradients are the u-factors
        self.forms: dict[str, tuple] = {}  # weight name -> (index of its δ in wanted, or one per step; v factor)

    def weight(self, name: str) -> torch.Tensor | None:
        p = getattr(self.module, name, None)  # a leaf of the replay, so that every projection is in its graph
        return None if p is None else p.detach().requires_grad_()

    def _want(self, t: torch.Tensor) -> int:
        self.wanted.append(t)
        return len(self.wanted) - 1

    def direction(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, suffix: str, reverse: bool,
                  mask: torch.Tensor | None) -> tuple:
        """Run one layer in one direction over ``x [n, T, F]``: ``(outputs [n, T, H_out], last h, last c)``."""
        m = self.module
        w_ih, w_hh = self.weight(f"weight_ih{suffix}"), self.weight(f"weight_hh{suffix}")
        b_ih, b_hh = self.weight(f"bias_ih{suffix}"), self.weight(f"bias_hh{suffix}")
        w_hr = self.weight(f"weight_hr{suffix}")
        a = F.linear(x, w_ih, b_ih)  # [n, T, G], all steps at once
        steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
        outs: list[torch.Tensor | None] = [None] * x.shape[1]
        bs, prev, hs, ms = [], [], [], []
        for t in steps:
            b = F.linear(h, w_hh, b_hh)
            new, new_c = _cell(m.mode, a[:, t], b, h, c)
            if w_hr is not None:
                ms.append(new.detach())
                new = F.linear(new, w_hr)
                hs.append(new)
            bs.append(b)
            prev.append(h.detach())
            if mask is not None:  # packed: an example past its length keeps its state and outputs zeros
                keep = mask[:, t : t + 1]
                outs[t] = torch.where(keep, new, torch.zeros_like(new))
                h = torch.where(keep, new, h)
                c = None if c is None else torch.where(keep, new_c, c)
            else:
                outs[t], h, c = new, new, new_c
        self.forms[f"weight_ih{suffix}"] = (self._want(a), x.detach())
        self.forms[f"weight_hh{suffix}"] = ([self._want(b) for b in bs], torch.stack(prev, 1))
        if w_hr is not None:
            self.forms[f"weight_hr{suffix}"] = ([self._want(v) for v in hs], torch.stack(ms, 1))
        return torch.stack(outs, 1), h, c


def _padded(x: Any, batch_first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The input as ``[n, T, F]`` in example order, and each example's length (None when not packed)."""
    if isinstance(x, PackedSequence):
        padded, lengths = pad_packed_sequence(x, batch_first=True)
        return padded, lengths
    if x.dim() == 2:
        return x.unsqueeze(0), None
    return (x if batch_first else x.transpose(0, 1)), None


def _initial(module: nn.RNNBase, hx: Any, n: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(h0, c0)`` as ``[layers·directions, n, ·]`` (zeros when not given)."""
    dirs = 2 if module.bidirectional else 1
    out_size = module.proj_size or module.hidden_size
    if module.mode == "LSTM":
        h0, c0 = hx if hx is not None else (None, None)
    else:
        h0, c0 = hx, None
    if h0 is None:
        h0 = x.new_zeros(module.num_layers * dirs, n, out_size)
    if c0 is None and module.mode == "LSTM":
        c0 = x.new_zeros(module.num_layers * dirs, n, module.hidden_size)
    if h0.dim() == 2:  # unbatched
        h0, c0 = h0.unsqueeze(1), None if c0 is None else c0.unsqueeze(1)
    return h0.detach(), None if c0 is None else c0.detach()


def _output_grads(module: nn.RNNBase, x: Any, grad_outputs: tuple, n: int, steps: int) -> tuple:
    """The gradients of ``(output [n, T, ·], h_n, c_n)`` (None where none arrived), in example order."""
    go = grad_outputs[0]
    lstm = module.mode == "LSTM"
    g_h = grad_outputs[-2] if lstm else grad_outputs[-1]
    g_c = grad_outputs[-1] if lstm else None
    if go is not None:
        if isinstance(x, PackedSequence):
            packed = PackedSequence(go, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
            go = pad_packed_sequence(packed, batch_first=True, total_length=steps)[0]
        elif go.dim() == 2:
            go = go.unsqueeze(0)
        elif not module.batch_first:
            go = go.transpose(0, 1)
    if g_h is not None and g_h.dim() == 2:
        g_h = g_h.unsqueeze(1)
    if g_c is not None and g_c.dim() == 2:
        g_c = g_c.unsqueeze(1)
    return go, g_h, g_c


def recurrent_rule(module: nn.RNNBase, args: tuple, kwargs: dict, grad_outputs: tuple) -> Composite:
    """``nn.LSTM``/``nn.GRU``/``nn.RNN``: per-example gradients of every weight by replaying the recurrence.

    Raises:
        ValueError: Dropout between layers in train mode (its mask lives inside the fused kernel).
    """
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise ValueError(
            f"{type(module).__name__} with dropout={module.dropout} between layers in train mode: the fused kernel "
            "draws that mask internally, so it cannot be replayed per example; set dropout=0 (apply nn.Dropout "
            "between single-layer modules instead) or exclude the module with layers=..."
        )
    x_in, hx = _bound(args, kwargs)
    x, lengths = _padded(x_in, module.batch_first)
    n, steps = x.shape[0], x.shape[1]
    h0, c0 = _initial(module, hx, n, x)
    mask = None if lengths is None else (torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)).to(x.device)
    go, g_h, g_c = _output_grads(module, x_in, grad_outputs, n, steps)
    dirs = 2 if module.bidirectional else 1
    replay = _Replay(module)
    with torch.enable_grad():
        layer_in = x.detach()
        last_h, last_c = [], []
        for layer in range(module.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                out, h, c = replay.direction(layer_in, h0[k], None if c0 is None else c0[k], suffix, d == 1, mask)
                outs.append(out)
                last_h.append(h)
                last_c.append(c)
            layer_in = torch.cat(outs, -1) if dirs > 1 else outs[0]
        results = [(layer_in, go), (torch.stack(last_h), g_h)]
        if c0 is not None:
            results.append((torch.stack(last_c), g_c))
        pairs = [(t, g) for t, g in results if g is not None]
        grads = torch.autograd.grad([t for t, _ in pairs], replay.wanted, [g for _, g in pairs], allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, replay.wanted, strict=True)]
    return Composite(_parts(module, replay, grads))


def _parts(module: nn.RNNBase, replay: _Replay, grads: list[torch.Tensor]) -> list[tuple]:
    """One ``(form, view)`` per trainable parameter, in ``named_parameters`` order.

    The per-step factors are stacked in the order the steps ran (reversed for the reverse direction): a sum of outer
    products does not depend on the order of its terms.
    """
    deltas: dict[str, torch.Tensor] = {}  # "ih_l0", "hh_l0_reverse", ...: the u-factor of that projection
    parts = []
    for name, p in module.named_parameters(recurse=False):
        kind, proj, suffix = name.split("_", 2)
        if kind == "weight":
            index, v = replay.forms[name]
            delta = grads[index] if isinstance(index, int) else torch.stack([grads[i] for i in index], 1)
            deltas[f"{proj}_{suffix}"] = delta
            form: Dense | Factored = Factored(delta, v)
        else:  # bias_ih / bias_hh: the sum over time of the matching projection's δ
            form = bias_grad(deltas[f"{proj}_{suffix}"])
        if p.requires_grad:
            parts.append((form, MatrixView.of([tuple(p.shape)])))
    return parts


recurrent_rule.rows_per_example = rows_per_example  # type: ignore[attr-defined]
