"""Per-example layer gradients in the form layer rules produce them, and their exact reductions.

A layer's parameters are viewed as one matrix of shape ``(rows, cols)``: each parameter is reshaped to
``(shape[0], -1)`` and the pieces are concatenated along columns when they share ``shape[0]`` (Linear: ``[W | b]``
of shape ``(out, in + 1)``; Conv: ``(C_out, C_in·k… + 1)``; Embedding: ``(V, D)``; LayerNorm: ``(d, 2)``), otherwise
every parameter is flattened into one row ``(1, P)``. Per-example gradients come as:

* :class:`Factored` — ``G_n = Σ_t u[n, t] v[n, t]ᵀ`` (Linear, Conv via unfold, Embedding with ``rows`` indices):
  never materialised unless that is cheaper (Bu et al.'s mixed ghost-norm rule);
* :class:`Dense` — ``G_n`` materialised as ``[n, rows, cols]`` (normalisation layers, the torch.func fallback).

Their reductions are exact: per-example squared norms (ghost norm ``⟨u uᵀ, v vᵀ⟩`` or the materialised norm),
weighted group sums ``Σ_n w[n, g] G_n`` (the book-keeping GEMM) and sketches.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from . import ghost
from .costs import ONE_CPU_CORE, KernelCosts, kernel_costs
from .sketch import MATERIALISE_ELEMENTS, CountSketch, Form, Projection

MATERIALISE_BYTES = 64 * 2**20
"""Largest per-example gradient block ``[n, rows, cols]`` the mixed rule may materialise for one layer."""


@dataclass(frozen=True)
class MatrixView:
    """How a layer's parameters map onto its gradient matrix.

    Attributes:
        shapes: Shapes of the layer's trainable parameters, in ``named_parameters(recurse=False)`` order.
        rows: Rows of the matrix view.
        cols: Columns of the matrix view.
        stacked: True when parameters are concatenated along columns, False when flattened into one row.
    """

    shapes: tuple[tuple[int, ...], ...]
    rows: int
    cols: int
    stacked: bool

    @classmethod
    def of(cls, shapes: list[tuple[int, ...]]) -> MatrixView:
        """The view for parameters of the given shapes."""
        shapes = [tuple(s) for s in shapes]
        first = {s[0] if s else 1 for s in shapes}
        sizes = [_numel(s) for s in shapes]
        if len(first) == 1 and all(s for s in shapes):
            rows = first.pop()
            return cls(tuple(shapes), rows, sum(sizes) // rows, True)
        return cls(tuple(shapes), 1, sum(sizes), False)

    def to_flat(self, m: torch.Tensor) -> torch.Tensor:
        """``[n, rows, cols]`` in this view → ``[n, P]`` in parameter order (each parameter flattened)."""
        if not self.stacked:
            return m.reshape(m.shape[0], -1)
        pieces, start = [], 0
        for shape in self.shapes:
            width = _numel(shape) // self.rows
            pieces.append(m[:, :, start : start + width].reshape(m.shape[0], -1))
            start += width
        return torch.cat(pieces, dim=1)

    def to_matrix(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Per-example parameter gradients ``[n, *shape]`` → ``[n, rows, cols]``."""
        n = grads[0].shape[0]
        if self.stacked:
            return torch.cat([g.reshape(n, self.rows, -1) for g in grads], dim=2)
        return torch.cat([g.reshape(n, 1, -1) for g in grads], dim=2)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def bias_grad(delta: torch.Tensor) -> Dense:
    """Per-example gradient of an added bias, ``Σ_t δ_t``, as ``[n, out, 1]`` (``delta``: ``[n, T, out]``).

    The implicit bias column of a factored ``[W | b]`` gradient is this of its row factors.
    """
    return Dense(delta.sum(1).unsqueeze(2))


@dataclass
class Dense:
    """Materialised per-example gradients ``[n, rows, cols]``, kept as column blocks (e.g. weight | bias).

    Attributes:
        blocks: ``[n, rows, c_j]`` tensors covering consecutive column ranges; never concatenated in memory.
    """

    blocks: list[torch.Tensor]

    def __init__(self, *blocks: torch.Tensor) -> None:
        self.blocks = list(blocks)

    @property
    def n(self) -> int:
        """Number of examples."""
        return self.blocks[0].shape[0]

    @property
    def m(self) -> torch.Tensor:
        """The whole ``[n, rows, cols]`` tensor (concatenates the blocks)."""
        return self.blocks[0] if len(self.blocks) == 1 else torch.cat(self.blocks, dim=2)

    def sq_norms(self, grams: ghost.GramCache | None = None) -> torch.Tensor:
        """``[n]`` squared Frobenius norms (``grams``: unused, as :meth:`Factored.sq_norms`)."""
        return added(torch.linalg.vector_norm(b.reshape(self.n, -1), dim=1).square() for b in self.blocks)

    def group_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """``[g, rows, cols]`` sums ``Σ_n weights[n, g] m[n]``."""
        w = weights.to(self.blocks[0].dtype)
        return torch.cat([torch.einsum("ng,nrc->grc", w, b) for b in self.blocks], dim=2)

    def sketch(self, projector: Projection) -> torch.Tensor:
        """``[n, k]`` sketches."""
        out, offset = None, 0
        for b in self.blocks:
            s = projector.dense(b, col_offset=offset)
            out = s if out is None else out + s
            offset += b.shape[2]
        return out

    def __add__(self, other: Dense) -> Dense:
        if [b.shape for b in self.blocks] == [b.shape for b in other.blocks]:
            return Dense(*(a + b for a, b in zip(self.blocks, other.blocks, strict=True)))
        return Dense(self.m + other.m)


class Reduced(Dense):
    """Materialised per-example gradients ``[n, rows, cols]`` of factors, reduced while they were formed.

    :meth:`Factored.reduced` forms ``Σ_t u_t v_tᵀ`` a few examples at a time in a reused workspace and takes, from
    each chunk while it is in cache, the squared norms and the sketch of one projection (and fused mode's sum over
    examples); the tensor itself is not kept. Those reductions return what was taken; any other reduction (group
    sums, cross terms, the guard's values, kept forms) reads :attr:`blocks`, which materialises the factors then.

    Attributes:
        factors: The factors (no implicit bias column).
        bias: The bias column's per-example gradient ``Σ_t u_t`` (the view's last column), or None.
    """

    def __init__(self, factors: Factored, sq: torch.Tensor, projector: Projection | None,
                 sketch: torch.Tensor | None, bias: Dense | None = None) -> None:
        self.factors, self.bias = factors, bias
        self._sq, self._projector, self._sketch = sq, projector, sketch
        self._blocks: list[torch.Tensor] | None = None

    @property
    def blocks(self) -> list[torch.Tensor]:
        """The ``[n, rows, c_j]`` column blocks, materialised on first use."""
        if self._blocks is None:
            weight = self.factors.materialise().blocks
            self._blocks = weight if self.bias is None else [*weight, *self.bias.blocks]
        return self._blocks

    @property
    def n(self) -> int:
        """Number of examples."""
        return self.factors.n

    def unreduced(self) -> Factored:
        """The factors these gradients were formed from (with the bias column): for the reductions not taken."""
        return self.factors if self.bias is None else replace(self.factors, bias=True)

    def group_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """``[g, rows, cols]`` sums ``Σ_n weights[n, g] G_n`` from the factors (one GEMM per group)."""
        return self.unreduced().group_sums(weights)

    def parts(self) -> list[Dense]:
        """The weight's part (its reductions kept) and the bias column's, or ``[self]`` without a bias."""
        if self.bias is None:
            return [self]
        return [Reduced(self.factors, self._sq, self._projector, self._sketch), self.bias]

    def sq_norms(self, grams: ghost.GramCache | None = None) -> torch.Tensor:
        """``[n]`` squared Frobenius norms, as taken while the gradients were formed."""
        return self._sq if self.bias is None else self._sq + self.bias.sq_norms()

    def sketch(self, projector: Projection) -> torch.Tensor:
        """``[n, k]`` sketches: the one taken while the gradients were formed when ``projector`` is its projection."""
        if projector is self._projector and self._sketch is not None and self.bias is None:
            return self._sketch
        return super().sketch(projector)


def _outer_sums(u: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, rows, cols]`` ``Σ_t u[n, t] v[n, t]ᵀ`` (into ``out``): a batched GEMM, or a product for one position.

    One position: a broadcast product, the same values (one rounded product per entry); the GEMM with an inner size
    of 1 ran 3–5 times slower per entry on one core.
    """
    if u.shape[1] == 1:
        return torch.mul(u.transpose(1, 2), v, out=out)
    return torch.bmm(u.transpose(1, 2), v, out=out)


FACTOR_REDUCTION_POSITIONS = 4
"""Up to this many positions :meth:`Factored.reduced` takes the norms and the sum over examples from the factors."""

_workspace = threading.local()


def _scratch(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of ``numel`` elements of ``like``'s dtype on the CPU, kept per thread and reused across calls.

    Only :meth:`Factored.reduced` writes it, and nothing it returns views it.
    """
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    buf = bufs.get(like.dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return buf[:numel]


@dataclass
class Factored:
    """Per-example gradients ``G_n = Σ_t u[n, t] v[n, t]ᵀ`` kept as factors.

    Attributes:
        u: ``[n, T, rows]`` row factors, or None when ``rows_index`` is given.
        v: ``[n, T, c]`` column factors.
        rows_index: ``[n, T]`` int64 row of each position (``u`` is the one-hot of it), or None.
        n_rows: Rows of the matrix view.
        bias: ``v`` has an implicit trailing column of ones (a bias), so the view has ``c + 1`` columns; it is
            never concatenated in memory.
    """

    u: torch.Tensor | None
    v: torch.Tensor
    rows_index: torch.Tensor | None = None
    n_rows: int = 0
    bias: bool = False

    def __post_init__(self) -> None:
        if self.u is not None:
            self.n_rows = self.u.shape[-1]

    @property
    def n(self) -> int:
        """Number of examples."""
        return (self.v if self.u is None else self.u).shape[0]  # (u when there: a subclass may form v on demand)

    @property
    def positions(self) -> int:
        """Number of outer products ``T`` per example."""
        return (self.v if self.u is None else self.u).shape[1]

    @property
    def n_cols(self) -> int:
        """Columns of the matrix view."""
        return self.v.shape[-1] + self.bias

    def split_bias(self) -> tuple[Factored, Dense | None]:
        """The factors without the implicit column, and that column ``Σ_t u_t`` (None without a bias).

        The one place the ``bias`` flag is resolved: every reduction of a biased form is the reduction of its two
        parts (``[G | g_b]`` has ``‖G‖² + ‖g_b‖²``, sums and sketches by column blocks).
        """
        if not self.bias:
            return self, None
        return replace(self, bias=False), bias_grad(self.u)

    def materialise(self) -> Dense:
        """Form ``[n, rows, cols]`` (one batched GEMM or an index-add for embeddings)."""
        factors, bias = self.split_bias()
        if bias is not None:
            return Dense(*factors.materialise().blocks, *bias.blocks)
        if self.u is not None:
            return Dense(_outer_sums(self.u, self.v))
        n, t, c = self.v.shape
        out = self.v.new_zeros((n * self.n_rows, c))
        offset = (torch.arange(n, device=self.v.device) * self.n_rows).unsqueeze(1)  # [n, 1]
        out.index_add_(0, (self.rows_index + offset).reshape(-1), self.v.reshape(n * t, c))
        return Dense(out.view(n, self.n_rows, c))

    def live(self) -> Factored:
        """The same gradients without the positions whose row factor is zero for every example (on a CPU).

        ``u_t v_tᵀ = 0`` there, so dropping them changes no value, only the work of every reduction (a ViT's or
        BERT's last block: the output gradients are zero except at the class token). Unless a column factor is not
        finite: ``0·inf`` is nan, and the gradient with it (autograd's too), so nothing is dropped then. Looked
        for only when the last and the middle positions' row factors are zero for every example (``2·n·rows``
        values read; the class-token pattern, where every position after the first few is dead): then one
        ``abs().amax`` pass over ``u`` finds them, and they are dropped when they are at least half the positions
        (copying the factors costs more than fewer dead positions spare, and the copies miss the Gram cache that
        layers sharing an input hit: a causal LM's last position is dead in every layer — 1 of 128 positions —
        and dropping it made Llama's exact step 1.36 → 1.71× plain). Dead positions otherwise are kept (a cost,
        never a value), and so are convolutions' patch factors. Which projection a parameter gets is chosen from
        the forms before this (their nominal positions).
        """
        u = self.u
        if u is None or type(self) is not Factored or u.shape[1] <= 1 or u.device.type != "cpu" or not u.numel():
            return self
        t = u.shape[1]
        if bool(u[:, -1].abs().amax().ne(0)) or bool(u[:, t // 2].abs().amax().ne(0)):
            return self  # (the last or the middle position carries a gradient: nothing looked for)
        keep = u.abs().amax(2).amax(0).ne(0)  # [T]; nan ≠ 0: kept
        # (Σ v is finite only if every entry is: an inf or nan entry makes the sum inf or nan in any order; a
        # finite sum that overflows keeps every position — a cost, never a value. One pass at ≈ 0.3 ns per
        # entry, where isfinite(v).all() took ≈ 3.6 ns: ≈ 2.9 ms per ViT MLP layer of the last block.)
        if 2 * int(keep.sum()) > t or not bool(torch.isfinite(self.v.sum())):
            return self
        index = keep.nonzero().squeeze(1) if bool(keep.any()) else keep.new_zeros(1, dtype=torch.int64)
        return replace(self, u=u.index_select(1, index), v=self.v.index_select(1, index))

    def reduced(self, projector: Projection | None = None, summed: bool = False) -> tuple[Reduced, torch.Tensor | None]:
        """The materialised gradients' squared norms, sketch (``projector``) and sum over examples (``summed``).

        Forms ``G_n = u_nᵀ v_n`` (one batched GEMM) :data:`~gradcoh.logger.sketch.MATERIALISE_ELEMENTS` at a time
        on a CPU (every example at once elsewhere), in a workspace kept across calls, and reduces each chunk while
        it is in cache. The values are :meth:`materialise`'s, reduced the same way per example; the sum over
        examples is summed chunk by chunk (fused mode's ``.grad``: rounding).

        Returns:
            ``(gradients, Σ_n G_n [rows, cols] or None)``; a bias column is kept as its own block, not summed.
        """
        if self.u is None:
            raise TypeError("Factored.reduced needs row factors (an embedding's indexed form is not materialised so)")
        factors, bias = self.split_bias()
        factors = factors.live()
        u, v = factors.u, factors.v
        n, rows, cols = factors.n, factors.n_rows, v.shape[-1]
        size = rows * cols
        cpu = v.device.type == "cpu"
        step = max(1, min(n, MATERIALISE_ELEMENTS // max(size, 1))) if cpu else max(n, 1)
        # More rows than columns: the transposes G_nᵀ = v_nᵀ u_n are formed (a batched GEMM whose output has more
        # columns than rows runs 5–15% faster per multiply-add on one core) and reduced as they are (a CountSketch
        # scatters them with its transposed hash); Σ_n is transposed back once.
        flip = rows > cols and (projector is None or isinstance(projector, CountSketch))
        a, b, shape = (v, u, (cols, rows)) if flip else (u, v, (rows, cols))
        # At most FACTOR_REDUCTION_POSITIONS live positions (a ViT's or BERT's last block after live(): 1, DeiT's: 2),
        # the norms and the sum come from the factors: the ghost norm's T²·(rows + cols) multiply-adds and Σ_n by one
        # GEMM (T·rows·cols, at ≈ 0.035 ns each) cost less than a pass over each chunk (≈ 0.2 and ≈ 0.25 ns per entry).
        from_factors = factors.positions <= FACTOR_REDUCTION_POSITIONS
        sq = torch.empty(n, dtype=v.dtype, device=v.device)
        sketches, total = [], None
        with torch.no_grad():
            if from_factors:
                sq = factors.sq_norms()
                if summed:
                    total = u.reshape(-1, rows).T @ v.reshape(-1, cols)
            work = _scratch(min(step, n) * size, v) if cpu and not (from_factors and projector is None) else None
            for i in range(0, n, step) if not (from_factors and projector is None) else ():
                j = min(n, i + step)
                out = None if work is None else work[: (j - i) * size].view(j - i, *shape)
                g = _outer_sums(a[i:j], b[i:j], out)
                if not from_factors:
                    torch.linalg.vector_norm(g.view(j - i, -1), dim=1, out=sq[i:j])
                if projector is not None:
                    sketches.append(projector.dense_transposed(g) if flip else projector.dense(g))
                if summed and not from_factors:
                    part = g.sum(0)
                    total = part if total is None else total.add_(part)
            if not from_factors:
                sq = sq.square_()
                if flip and total is not None:
                    total = total.T.contiguous()
        sketch = None if projector is None else (sketches[0] if len(sketches) == 1 else torch.cat(sketches))
        return Reduced(factors, sq, projector, sketch, bias), total

    def sq_norms(self, grams: ghost.GramCache | None = None) -> torch.Tensor:
        """``[n]`` exact squared norms by the ghost-norm identity ``‖Σ_t u_t v_tᵀ‖² = ⟨U Uᵀ, V Vᵀ⟩``.

        Args:
            grams: The backward pass's Gram blocks, shared with other forms reading the same factors (None: none).
        """
        factors, bias = self.split_bias()
        if bias is not None:
            return factors.sq_norms(grams) + bias.sq_norms()
        if self.positions == 1:
            vv = self.v.pow(2).sum((1, 2))
            return vv if self.u is None else self.u.pow(2).sum((1, 2)) * vv
        if self.u is not None:  # symmetric blocks of both Grams (logger/ghost.py)
            return ghost.sq_norms(self.u, self.v, grams)
        gv = torch.bmm(self.v, self.v.transpose(1, 2))  # [n, T, T]
        return (_gram_u(self, self) * gv).sum((1, 2))

    def group_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """``[g, rows, cols]`` sums ``Σ_n weights[n, g] G_n`` (one GEMM per group)."""
        factors, bias = self.split_bias()
        if bias is not None:
            return torch.cat([factors.group_sums(weights), bias.group_sums(weights)], dim=2)
        n, t, c = self.v.shape
        w = weights.to(self.v.dtype)
        out = []
        for g in range(w.shape[1]):
            wv = (self.v * w[:, g].view(n, 1, 1)).reshape(n * t, c)
            if self.u is None:
                out.append(self.v.new_zeros((self.n_rows, c)).index_add_(0, self.rows_index.reshape(-1), wv))
            else:
                out.append(self.u.reshape(n * t, -1).T @ wv)
        return torch.stack(out)

    def sketch(self, projector: Projection) -> torch.Tensor:
        """``[n, k]`` sketches by the projection's factored (or indexed) route; a bias column, materialised."""
        factors, bias = self.split_bias()
        if bias is not None:
            return factors.sketch(projector) + projector.dense(bias.m, col_offset=factors.n_cols)
        if self.u is None:
            return projector.indexed(self.rows_index, self.v)
        return projector.factored(self.u, self.v)

    def norm_macs(self) -> float:
        """Multiply-adds per example of :meth:`sq_norms` (the factored route's cost in :func:`choose_route`)."""
        return ghost.ghost_macs(self.positions, self.n_rows, self.n_cols)

    def columns_dot(self, b: torch.Tensor) -> torch.Tensor:
        """``[n, T]`` products ``v_t · b`` of the column factors with one vector ``b [c]`` (the guard's)."""
        return self.v @ as_dtype(b, self.v.dtype)

    def concatenates(self, other: Factored) -> bool:
        """Whether ``self + other`` can concatenate the positions (same kind of factors, same columns)."""
        return (self.u is None) == (other.u is None) and self.bias == other.bias and self.n_cols == other.n_cols

    def __add__(self, other: Factored) -> Factored:
        # Σ_t over two calls of a shared module is Σ_t over the concatenated positions.
        if not self.concatenates(other):
            raise TypeError("cannot concatenate factors of different kinds")
        u = None if self.u is None else torch.cat([self.u, other.u], 1)
        idx = None if self.rows_index is None else torch.cat([self.rows_index, other.rows_index], 1)
        return replace(self, u=u, v=torch.cat([self.v, other.v], 1), rows_index=idx)


@dataclass
class Composite:
    """Per-example gradients of a layer whose parameters share no matrix view, as parts in their own views.

    The layer uses the flat ``(1, P)`` view; its parts cover consecutive parameter ranges (e.g. MultiheadAttention:
    in_proj and out_proj, both factored). Norms and group sums stay exact per part; sketching materialises the parts
    in flat order.

    Attributes:
        parts: ``(gradient, view)`` pairs in parameter order.
    """

    parts: list[tuple[Dense | Factored, MatrixView]]

    @property
    def n(self) -> int:
        """Number of examples."""
        return self.parts[0][0].n

    def sq_norms(self) -> torch.Tensor:
        """``[n]`` squared norms: the parts' norms add."""
        return sum(part.sq_norms() for part, _ in self.parts)

    def group_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """``[g, 1, P]`` group sums in flat parameter order."""
        return torch.cat([view.to_flat(part.group_sums(weights)) for part, view in self.parts], dim=1).unsqueeze(1)

    def sketch(self, projector: Projection) -> torch.Tensor:
        """``[n, k]`` sketches of the flat per-example gradients (materialises each part once)."""
        blocks = [view.to_flat(as_dense(part).m).unsqueeze(1) for part, view in self.parts]
        return Dense(*blocks).sketch(projector)

    def __add__(self, other: Composite) -> Composite:
        return Composite([(combine([a, b]), view) for (a, view), (b, _) in zip(self.parts, other.parts, strict=True)])


LayerGrad = Dense | Factored | Composite


def combine(parts: list[LayerGrad]) -> LayerGrad:
    """The per-example gradient of a module called several times: the sum over its calls."""
    out = parts[0]
    for part in parts[1:]:
        if isinstance(out, Composite):
            out = out + part
        elif isinstance(out, Factored) and isinstance(part, Factored) and out.concatenates(part):
            out = out + part
        else:
            out = as_dense(out) + as_dense(part)
    return out


def as_dense(grad: LayerGrad) -> Dense:
    """Materialise if needed."""
    return grad if isinstance(grad, Dense) else grad.materialise()


def form_of(form: ParamGrad) -> Form:
    """What the sketch cost model needs of a per-example gradient: its route and positions."""
    if isinstance(form, Dense):
        return "dense", 1
    return ("indexed" if form.u is None else "factored"), form.positions


def fits(n: int, rows: int, cols: int, element_size: int) -> bool:
    """Whether ``n`` per-example gradients ``[rows, cols]`` fit in :data:`MATERIALISE_BYTES`."""
    return n * rows * cols * element_size <= MATERIALISE_BYTES


def materialise_is_cheaper(n: int, positions: int, rows: int, cols: int, element_size: int,
                           projector: Projection | None = None, costs: KernelCosts = ONE_CPU_CORE,
                           saved: int = 0, factored: float | None = None) -> bool:
    """Whether to materialise ``[n, rows, cols]`` rather than keep factors: the one place this is decided.

    The mixed ghost-norm rule (Bu, Mao, Xu 2022): materialise when that costs less than the factored route and
    :func:`fits`. (Fused mode materialises whatever :func:`fits`, since it needs ``Σ_n G_n``; grouped convolutions
    have no factored route.)

    Costs per example: factored = ghost norm ``T²·(rows + cols)`` times the Gram blocks' fraction
    (:func:`~gradcoh.logger.ghost.ghost_macs`); materialised = one batched GEMM ``T·rows·cols``.
    With a sketch, each route adds the projection's own cost of sketching that form
    (:meth:`~gradcoh.logger.sketch.Projection.route_cost`: a CountSketch materialises factors anyway, a
    TensorSketch mean sketches factors without forming them).
    ``costs`` weighs the kernels (:func:`~gradcoh.logger.costs.kernel_costs` of the device in use): both routes
    give the same values, so measured costs may choose. ``saved``: multiply-adds per example that materialising
    spares elsewhere (fused mode: the weight-gradient GEMM, :func:`~gradcoh.logger.fused.fill_slot`).
    ``factored``: multiply-adds per example of the factored norm when it is not the ghost norm of the factors
    (:meth:`Factored.norm_macs`; a convolution's patch Gram from its input map's Gram, :mod:`.ops.conv`).
    """
    if not fits(n, rows, cols, element_size):
        return False
    t, size = positions, rows * cols
    factored = costs.gemm * (ghost.ghost_macs(t, rows, cols) if factored is None else factored)
    materialised = costs.gemm * ((t + 1) * size - saved)
    if projector is not None:
        factored += projector.route_cost(("factored", t), costs)
        materialised += projector.route_cost(("dense", 1), costs)
    return materialised < factored


def choose_route(grad: LayerGrad, projector: Projection | None) -> LayerGrad:
    """Materialise a factored gradient when :func:`materialise_is_cheaper` says so."""
    if isinstance(grad, Composite):
        return Composite([(choose_route(part, None), view) for part, view in grad.parts])
    if isinstance(grad, Dense):
        return grad
    grad = grad.live()
    ref = grad.v if grad.u is None else grad.u  # (a convolution's v may be formed only when read)
    costs = kernel_costs(ref.device, ref.dtype)
    cheaper = materialise_is_cheaper(grad.n, grad.positions, grad.n_rows, grad.n_cols, ref.element_size(),
                                     projector, costs, factored=grad.norm_macs())
    if not cheaper:
        return grad
    return grad.materialise() if grad.u is None else grad.reduced(projector)[0]


# --- per-parameter decomposition -------------------------------------------------------------------------------
# A layer's per-example gradient may come from several sources (a module's rule, a tied module's rule, direct uses
# of its parameters by other code). Every source's gradient is split into one form per parameter, each in the
# parameter's *natural view* ``(shape[0], numel / shape[0])``; contributions to the same parameter add, and the
# squared norm of their sum needs the cross terms ``2⟨A_i, B_i⟩`` (e.g. a tied embedding used as lookup and as
# output projection, cf. the ghost norm of Li et al. 2022 applied to both uses).

ParamGrad = Dense | Factored
"""A per-example gradient of one parameter in its natural view."""


def natural_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` of a parameter's natural matrix view: ``(shape[0], numel / shape[0])``; ``(1, 1)`` if 0-d."""
    if not shape:
        return 1, 1
    rows = shape[0]
    return rows, _numel(shape) // max(rows, 1)


def split_params(grad: LayerGrad, view: MatrixView) -> list[ParamGrad | None]:
    """One form per parameter of ``view`` (in its natural view); None where the form says nothing of it.

    Args:
        grad: A per-example gradient in ``view`` (parameters in ``view.shapes`` order).
        view: The matrix view ``grad`` is expressed in.
    """
    if isinstance(grad, Composite):
        out: list[ParamGrad | None] = []
        for part, part_view in grad.parts:
            out += split_params(part, part_view)
        return out
    shapes = view.shapes
    if isinstance(grad, Reduced) and view.stacked and len(shapes) == 1 + (grad.bias is not None) and \
            _numel(shapes[0]) == grad.factors.n_rows * grad.factors.n_cols:
        return grad.parts()  # (its reductions kept; nothing materialised)
    if isinstance(grad, Factored) and view.stacked:
        factors, bias = grad.split_bias()  # a bias is the view's last parameter
        weights = shapes[:-1] if bias is not None else shapes
        if len(weights) == 1:
            pieces: list[ParamGrad | None] = [factors]
        else:
            widths = [_numel(shape) // view.rows for shape in weights]
            pieces = [replace(factors, v=v) for v in factors.v.split(widths, dim=-1)]
        return [*pieces, bias] if bias is not None else pieces
    dense = as_dense(grad)
    n = dense.n
    if view.stacked and len(dense.blocks) == len(shapes) and all(
        b.shape[2] * view.rows == _numel(s) for b, s in zip(dense.blocks, shapes, strict=True)
    ):
        return [Dense(b) for b in dense.blocks]
    flat = view.to_flat(dense.m)
    out, start = [], 0
    for shape in shapes:
        size = _numel(shape)
        rows, cols = natural_view(shape)
        out.append(Dense(flat[:, start : start + size].reshape(n, rows, cols)))
        start += size
    return out


def _gram_u(a: Factored, b: Factored) -> torch.Tensor:
    """``[n, T_a, T_b]`` inner products of the row factors of two factored forms."""
    if a.u is not None and b.u is not None:
        return torch.bmm(a.u, b.u.transpose(1, 2))
    if a.u is None and b.u is None:
        return (a.rows_index.unsqueeze(2) == b.rows_index.unsqueeze(1)).to(a.v.dtype)
    if a.u is None:
        return _gram_u(b, a).transpose(1, 2)
    # a dense, b indexed: a.u[n, t, rows] at b's row of position s
    idx = b.rows_index.unsqueeze(1).expand(-1, a.u.shape[1], -1)  # [n, T_a, T_b]
    return a.u.gather(2, idx)


def _factors_of(form: ParamGrad) -> ParamGrad:
    """A :class:`Reduced` form's factors (what a reduction it did not take reads instead of materialising)."""
    return form.factors if isinstance(form, Reduced) and form.bias is None else form


def inner(a: ParamGrad, b: ParamGrad) -> torch.Tensor:
    """``[n]`` per-example inner products ``⟨A_i, B_i⟩`` of two forms of the same parameter (natural view)."""
    a, b = _factors_of(a), _factors_of(b)
    if isinstance(a, Dense) and isinstance(b, Dense):
        return (a.m * b.m).flatten(1).sum(1)
    if isinstance(a, Dense):
        a, b = b, a
    if isinstance(b, Dense):  # Σ_t u_tᵀ D v_t
        d = b.m  # [n, rows, cols]
        dv = torch.bmm(a.v, d.transpose(1, 2))  # [n, T, rows]
        if a.u is None:
            return dv.gather(2, a.rows_index.unsqueeze(2)).sum((1, 2))
        return (dv * a.u).sum((1, 2))
    gv = torch.bmm(a.v, b.v.transpose(1, 2))
    return (_gram_u(a, b) * gv).sum((1, 2))


def bilinear(form: ParamGrad, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[n]`` values ``aᵀ G_i b`` (``left [rows]``, ``right [cols]``): the reconciliation guard's values."""
    form = _factors_of(form)
    if isinstance(form, Dense):
        out = None
        start = 0
        for b in form.blocks:  # column blocks: no concatenation
            width = b.shape[2]
            part = (b @ as_dtype(right[start : start + width], b.dtype)) @ as_dtype(left, b.dtype)  # [n]
            out = part if out is None else out + part
            start += width
        return out
    vb = form.columns_dot(right)  # [n, T]
    ua = as_dtype(left, form.v.dtype)[form.rows_index] if form.u is None else form.u @ as_dtype(left, form.u.dtype)
    return (ua * vb).sum(1)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no op dispatched when it already is: the logged step's fixed cost is per op)."""
    return t if t.dtype == dtype else t.to(dtype)


def added(parts: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the tensors in ``parts`` (None entries skipped; None when there are none), with no ``0 +``."""
    out = None
    for t in parts:
        if t is not None:
            out = t if out is None else out + t
    return out


def dot(form: ParamGrad, m: torch.Tensor) -> torch.Tensor:
    """``[n]`` inner products ``⟨G_i, M⟩`` of each example's gradient with one fixed matrix ``M [rows, cols]``.

    Factored gradients are never materialised: ``Σ_t u_tᵀ M v_t`` is one GEMM of the smaller factor with ``M``
    (the cost of the layer's own weight gradient); embedding lookups gather the rows of ``M``.
    """
    form = _factors_of(form)
    if isinstance(form, Dense):
        out, start = None, 0
        for b in form.blocks:  # column blocks: no concatenation
            width = b.shape[2]
            part = (b * m[:, start : start + width].to(b.dtype)).sum((1, 2))
            out = part if out is None else out + part
            start += width
        return out
    factors, bias = form.split_bias()
    if bias is not None:
        return dot(factors, m[:, : factors.n_cols]) + dot(bias, m[:, factors.n_cols :])
    c = form.v.shape[-1]
    mm = m.to(form.v.dtype)
    if form.u is None:
        return (mm[form.rows_index] * form.v).sum((1, 2))
    body = mm[:, :c]
    if form.n_rows <= c:
        out = (torch.matmul(form.v, body.T) * form.u).sum((1, 2))  # [n, T, rows]
    else:
        out = (torch.matmul(form.u, body) * form.v).sum((1, 2))  # [n, T, cols]
    return out


def fold(grad: LayerGrad, r: int) -> LayerGrad:
    """Per-example gradients of a call whose batch axis held ``r`` rows per example (example-major): sum them.

    E.g. Swin's window attention sees ``[B·nW, N, C]``: each example's gradient is the sum over its ``nW`` rows.
    """
    if r == 1:
        return grad
    if isinstance(grad, Composite):
        return Composite([(fold(part, r), view) for part, view in grad.parts])
    if isinstance(grad, Factored):
        def merge(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.reshape(t.shape[0] // r, r * t.shape[1], *t.shape[2:])

        return replace(grad, u=merge(grad.u), v=merge(grad.v), rows_index=merge(grad.rows_index))
    return Dense(*(b.reshape(b.shape[0] // r, r, *b.shape[1:]).sum(1) for b in grad.blocks))
