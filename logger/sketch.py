"""Seeded sketches of per-example gradients: one linear projection per parameter, summed per layer.

Every parameter's gradient is viewed as a matrix ``M`` of shape ``(rows, cols) = (shape[0], numel / shape[0])``
(see :func:`gradcoh.logger.grads.natural_view`); a layer's sketch is the sum of its parameters' sketches, so that a
parameter used in several places (tied weights) is sketched once, as the sum over its uses. Each parameter gets one
projection into ``k`` coordinates, an instance of one of the :class:`Projection` classes below. Every class sketches
each form a per-example gradient comes in — materialised (:meth:`Projection.dense`), as factors ``Σ_t u_t v_tᵀ``
(:meth:`Projection.factored`) or as embedding rows (:meth:`Projection.indexed`) — and the routes of one class give
the same values to rounding, so *which route* runs may depend on measured costs while *which class* a parameter
gets may not:

* :class:`CountSketch` (Charikar, Chen & Farach-Colton 2002) with an independent hash and sign per entry of ``M``:
  ``s[h(i, j)] += σ(i, j) M[i, j]``. Injective (an isometry) for at most ``k`` entries; otherwise the relative
  variance of ``‖s‖²`` is ``(2/k)(1 − ‖M‖₄⁴/‖M‖⁴) ≤ 2/k``. It needs ``M`` itself: one add per entry, which suits
  gradients materialised anyway (many positions per example, small matrices, vectors). The sign is folded into the
  bucket (``2k`` signed buckets, one ``int64`` per entry, no sign array and no multiply pass), and the add is one
  ``scatter_add_`` with the hash broadcast over examples.
* :class:`TensorSketchMean`: the mean of ``B`` independent TensorSketches (Pham & Pagh 2013). Block ``b`` is the
  CountSketch of ``M`` with bucket ``(h₁ᵇ(r) + h₂ᵇ(c)) mod k`` and sign ``s₁ᵇ(r)s₂ᵇ(c)``, so it needs only
  ``O(rows + cols)`` hashes and is computed from the factors without forming ``M``: ``Σ_t FFT(C₁ u_t) ⊙
  FFT(C₂ v_t)`` accumulated in the frequency domain over positions and blocks, one inverse FFT per example. For a
  materialised ``M`` the same sketch is applied row-wise (each row's column sketch, rolled by the row's bucket).
  With independent row and column hashes one TensorSketch has up to three times the dense variance for rank-one
  ``M``: two rows that collide bring every pair of their columns into collision at once (and two columns every
  pair of rows). A side of at most ``k`` entries is therefore hashed injectively (its own collisions vanish), a
  longer one balanced (each bucket holds ``⌊w/k⌋`` or ``⌈w/k⌉`` of its ``w`` entries: fewer collisions than
  independent buckets, :func:`side_collision`), and the number of blocks follows from the shape alone
  (:func:`tensorsketch_blocks`): the fewest of 1, 2 and 4 whose worst case is within ``≈ 1.5·(2/k)`` (sd
  ``1.2256·√(2/k)`` at ``k = 256``) — 1 when both sides have at most ``k`` entries, or one has and the other at
  most about ``2k``; within the ``1.25·√(2/k)`` the sketches promise, and ``≈ 2/k`` for high-rank ``M``; the exact
  variance for a given ``M`` is in :data:`TENSORSKETCH_BLOCKS`'s note.

Which class a parameter gets is decided once per run by :func:`choose_projection` from a cost model of the shapes
(FLOPs and bytes weighed with the fixed :data:`~gradcoh.logger.costs.SKETCH_COSTS`, never with timings) at the
first step that sketches it, kept for the run and recorded in the store (:class:`ProjectionTable`): an appending run
adopts the recorded projections, so that a resumed run sketches exactly as before. Every projection is linear and
unbiased for inner products. The hashes depend only on ``(seed, kind, parameter name, rows, cols, k)`` through
:class:`numpy.random.SeedSequence`, are generated on the CPU with NumPy and then moved to the device;
:func:`sketch_hashes` rebuilds them without torch.
"""

from __future__ import annotations

import functools
import hashlib
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from . import schema
from .costs import FUSED_SUM_NS, SKETCH_COSTS, KernelCosts
from .ghost import ghost_macs

SKETCH_KIND = "countsketch+tensorsketch"
SKETCH_VERSION = 7
"""1: one TensorSketch per layer matrix view; 2: one TensorSketch per parameter, summed per layer; 3: a CountSketch
or a block TensorSketch per parameter; 4: the same projections, chosen by a cost model of the shapes and recorded
per parameter in the store (a version 3 store cannot be continued: its choices were not recorded); 5: the
TensorSketch mean of 4 blocks instead of 8 (half its cost), chosen by a cost model that counts the exact
statistics' route with the sketch (:func:`form_cost`); 6: the TensorSketch mean hashes a side of at most ``k``
entries injectively and averages 1, 2 or 4 blocks by the number of such sides (:func:`tensorsketch_blocks`), its
cost model proportional to the blocks; 7: a side longer than ``k`` is hashed balanced instead of independently
(:func:`side_collision`) and the blocks are the fewest whose worst-case variance is within that of version 6
(:func:`tensorsketch_blocks`: 1 instead of 2 for e.g. 1152 × 192 at ``k = 1024``, 2 instead of 4 for 320 × 640 at
``k = 256``; projections of views with both sides at most ``k`` are those of version 6 for ``k = 3`` and
``k ≥ 5``: at ``k`` = 1, 2 and 4 one block's worst case exceeds the limit, so such views get 4, 4 and 2 blocks
instead of 1). A store of an earlier version cannot be appended to with sketches."""

HASH_VERSION = 3
"""Enters the hash seeds: unchanged since version 3, so a CountSketch (whose hashes version 6 leaves as they were)
gives the same projection as in version 3; the TensorSketch mean's hashes are drawn differently since version 6
(version 7: its sides longer than ``k`` differently again)."""

TENSORSKETCH_BLOCKS = 4
"""The most independent TensorSketches averaged per parameter (their sum divided by ``√B``); :func:`tensorsketch_blocks`
gives fewer (2 or 1) where the sides' collisions allow. The cost of the TensorSketch mean is proportional to ``B``.

One TensorSketch puts entry ``(i, j)`` of ``M`` (``x_e``, ``‖M‖ = 1`` below) in bucket ``(h₁(i) + h₂(j)) mod k``
with sign ``s₁(i)s₂(j)``. A side of at most ``k`` entries is hashed injectively (distinct buckets, uniformly placed:
a random permutation's first entries), a longer side of ``w`` entries balanced (every bucket holds ``⌊w/k⌋`` or
``⌈w/k⌉`` entries, uniformly assigned; version 6: independent uniform buckets); signs are independent. With
``π_side(x)`` the distribution of the difference ``h(a) − h(b) mod k`` of two distinct entries of a side (``π(0)``
from :func:`side_collision` — 0 for an injective side, ``< 1/k`` for a balanced one, ``1/k`` for an independent
one — and ``(1 − π(0))/(k − 1)`` at every other ``x``, the buckets' labels being uniformly permuted), the
relative variance of ``‖s‖²`` is exactly ``V₁/B + (2/k)(B − 1)/B`` (the cross terms between independent blocks,
as every bucket is uniform: ``E[ssᵀ] = I/k``) with one TensorSketch's

    V₁ = 2·(π₂(0)·R + π₁(0)·C + p·D) + 2·(π₂(0) + π₁(0) + q)·Q

where ``R = Σ_i ‖M_i·‖⁴ − ‖M‖₄⁴`` (pairs of entries in one row: they collide when their columns do), ``C = Σ_j
‖M_·j‖⁴ − ‖M‖₄⁴`` (in one column), ``D = 1 − ‖M‖₄⁴ − R − C`` (pairs in different rows and columns: they collide
with probability ``p = Σ_x π₁(x)π₂(−x)``, ``1/k`` when a side is independent, ``1/(k − 1)`` when both are
injective), and ``Q = ‖MᵀM‖_F² − Σ_i ‖M_i·‖⁴ − Σ_j ‖M_·j‖⁴ + ‖M‖₄⁴ ≤ D`` weighs the quadruples of entries in two
rows and two columns whose four signs cancel: a pair in one row collides together with the same pair of columns in
every other row (probability ``π₂(0)``), symmetrically for columns (``π₁(0)``), and the two diagonals of a 2×2
sub-matrix collide together when ``2·(h₁(i) − h₁(i')) ≡ 0`` and ``h₁(i) − h₁(i') ≡ h₂(j) − h₂(j')`` (``q =
Σ_{2x ≡ 0} π₁(x)π₂(x)``: ``O(1/k²)``). At worst (``Q``, ``R + C + D`` → 1: rank one, spread over many rows and
columns), :func:`tensorsketch_worst_variance`; for even ``k`` (odd ``k``: less) with independent long sides
(version 6; balanced ones have less, which :func:`tensorsketch_blocks` turns into fewer blocks):

* neither side injective, ``B = 4``: ``V₁ ≤ (2/k)(3 + 2/k)``, ``V ≤ (2/k)(1.5 + 1/(2k))``: sd ``1.2248·√(2/k)``
  (``k = 256``: ``1.2256``);
* one side injective, ``B = 2``: its own collisions vanish, ``V₁ ≤ (2/k)(2 + 1/(k − 1))``, ``V ≤ (2/k)(1.5 +
  1/(2(k − 1)))``: sd ``1.2255·√(2/k)`` at ``k = 256`` (one block alone would be ``1.41``);
* both injective, ``B = 1``: ``V ≤ (2/(k − 1))(1 + 1/(k − 1)) = (2/k)·k²/(k − 1)²``: sd ``k/(k − 1)·√(2/k)``
  (``1.004`` at ``k = 256``), about a CountSketch's.

All three are within the ``1.25·√(2/k)`` the sketches promise for every ``k ≥ 9``, per example and for the batch
sum (the same formula for the summed matrix). High-rank ``M`` (``Q ≪ 1``) get ``≈ 2/k`` in every case. A balanced
side of ``w ≤ 2k`` entries has ``k·π(0) ≤ 2(w − k)/w·k/(w − 1) ≤ ≈ 0.5``, so with an injective other side one block
stays within ``≈ 1.5·(2/k)``; two balanced sides with ``k·(π₁(0) + π₂(0)) ≤ ≈ 1`` need 2 blocks, not 4."""


def side_collision(width: int, dim: int) -> float:
    """``π(0)``: probability that two distinct entries of a side of ``width`` entries share a bucket out of ``dim``.

    Every side is hashed *balanced* (:func:`sketch_hashes`): its buckets hold ``⌊width/dim⌋`` or ``⌈width/dim⌉``
    entries each, uniformly assigned, so ``π(0) = Σ_b c_b(c_b − 1) / (width·(width − 1))``: 0 when ``width ≤ dim``
    (injective), below the ``1/dim`` of independent buckets otherwise (``1/(2·dim − 1)`` at ``width = 2·dim``).
    """
    if width < 2:
        return 0.0
    q, r = divmod(width, dim)
    return (r * (q + 1) * q + (dim - r) * q * (q - 1)) / (width * (width - 1))


def tensorsketch_worst_variance(view: tuple[int, int], dim: int, blocks: int) -> float:
    """Supremum over matrices of the relative variance of ``‖s‖²`` of a TensorSketch mean, in units of ``2/dim``.

    The mean of ``blocks`` TensorSketches of a ``rows × cols`` view: the formula of :data:`TENSORSKETCH_BLOCKS` at
    ``Q = R + C + D = 1`` (approached by rank-one matrices spread over many rows and columns).
    """
    k = dim
    if k < 2:  # one bucket: every pair collides, no bound to keep
        return math.inf
    a, b = side_collision(view[0], k), side_collision(view[1], k)
    apart = a * b + (1 - a) * (1 - b) / (k - 1)  # p = Σ_x π₁(x)π₂(−x), a difference ≠ 0 uniform over k − 1 values
    diagonals = a * b + (1 - a) * (1 - b) / (k - 1) ** 2 * (k % 2 == 0)  # q = Σ_{2x ≡ 0} π₁(x)π₂(x)
    one = 2 * max(a, b, apart) + 2 * (a + b + diagonals)
    return (one / blocks + 2 / k * (blocks - 1) / blocks) / (2 / k)


WORST_VARIANCE = 1.5
"""The largest worst-case relative variance of ``‖s‖²``, in units of ``2/k`` and up to ``O(1/k)``, the TensorSketch
mean may have (:func:`tensorsketch_blocks` allows ``WORST_VARIANCE + 1/(2(k − 1))``): sd ``1.2256·√(2/k)`` at
``k = 256``, within the ``1.25·√(2/k)`` the sketches promise for every ``k ≥ 9`` (sketch version 6's own worst
case, with 4 blocks or 2 and an injective side)."""


@functools.lru_cache(maxsize=4096)
def tensorsketch_blocks(view: tuple[int, int], dim: int) -> int:
    """TensorSketches the mean averages for a natural view ``(rows, cols)`` at sketch dimension ``dim``.

    The fewest of 1, 2 and 4 (:data:`TENSORSKETCH_BLOCKS`) whose worst-case variance
    (:func:`tensorsketch_worst_variance`) is within :data:`WORST_VARIANCE` ``+ 1/(2(k − 1))`` (4 otherwise): 1 when
    both sides have at most ``dim`` entries (injective; for ``dim`` = 3 or ≥ 5: at 1, 2 and 4 one block's worst
    case is above the limit) or one has and the other at most about ``2·dim`` (balanced: few collisions), 2 or 4
    for longer sides. A function of the shapes only, so every process, rank and resumed run
    averages the same blocks.
    """
    limit = WORST_VARIANCE + 1 / (2 * max(dim - 1, 1))
    for blocks in (1, 2):
        if tensorsketch_worst_variance(view, dim, blocks) <= limit:
            return blocks
    return TENSORSKETCH_BLOCKS

_CHUNK_ELEMENTS = 2**22
"""Elements of the largest temporary a sketch kernel builds at once (examples or positions are chunked)."""

MATERIALISE_ELEMENTS = 2**20
"""Elements of the per-example gradients materialised from factors at once on a CPU (a few examples, 4 MB in float32):
by a CountSketch's factored route, then scattered while they are still in cache (10–30% faster than 2²² on one core
at the zoo's shapes), and by :meth:`~gradcoh.logger.grads.Factored.reduced`, which reduces each chunk in a workspace
kept across calls (a freshly allocated ``[n, rows, cols]`` block was page-faulted in on every step: 13.9 k minor
faults per timm ViT step at k = 256)."""

_CACHE_ELEMENTS = 2**18
"""Elements of the temporaries one block of the factored TensorSketch route works on at once: about 1 MB, a core's
L2 cache (at k = 1024 the whole-chunk temporaries were 2–3 times slower)."""

Form = tuple[str, int]
"""What the cost model needs of one per-example gradient: ``("dense" | "factored" | "indexed", positions T)``."""


def _entropy(seed: int, kind: str, name: str, rows: int, cols: int, dim: int) -> list[int]:
    digest = hashlib.sha256(f"{kind}/{HASH_VERSION}/{name}".encode()).digest()
    name_words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return [int(seed), *name_words, rows, cols, dim]


def _signs(rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=size)


def sketch_hashes(seed: int, name: str, view: tuple[int, int], dim: int, kind: str) -> dict[str, np.ndarray]:
    """Hashes and signs of one parameter's projection (NumPy only).

    Args:
        seed: The logger's seed.
        name: Qualified parameter name.
        view: ``(rows, cols)`` of the parameter's natural view (:func:`gradcoh.logger.grads.natural_view`).
        dim: Sketch dimension ``k``.
        kind: A key of :data:`PROJECTIONS`.

    Returns:
        CountSketch: ``{"hash", "sign"}`` of shape ``[rows, cols]`` (int64 buckets in ``[0, dim)``, distinct when
        ``rows·cols ≤ dim``; float32 ±1). TensorSketch mean: ``{"row_hash", "row_sign"}`` ``[B, rows]`` and
        ``{"col_hash", "col_sign"}`` ``[B, cols]`` with ``B =`` :func:`tensorsketch_blocks` ``(view, dim)``; a
        side of at most ``dim`` entries gets distinct buckets in every block (the first entries of a random
        permutation of ``range(dim)``), a longer side balanced ones (a permutation of its entries taken ``mod dim``,
        the buckets relabelled by a permutation of ``range(dim)``).
    """
    if kind not in PROJECTIONS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rows, cols = view
    numel = rows * cols
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy(seed, kind, name, rows, cols, dim))))
    if kind == CountSketch.kind:
        buckets = rng.permutation(dim)[:numel] if numel <= dim else rng.integers(0, dim, size=numel)
        return {"hash": buckets.astype(np.int64).reshape(rows, cols), "sign": _signs(rng, (rows, cols))}
    blocks = tensorsketch_blocks(view, dim)

    def side(width: int) -> np.ndarray:
        """``[B, width]`` buckets of one side, injective when ``width ≤ dim``, otherwise balanced.

        Injective: a permutation's first entries. Balanced: a permutation of the entries taken ``mod dim``, the
        buckets relabelled by a permutation of ``range(dim)`` (each holds ``⌊width/dim⌋`` or ``⌈width/dim⌉``
        entries, uniformly assigned).
        """
        if width <= dim:
            return np.stack([rng.permutation(dim)[:width] for _ in range(blocks)]).astype(np.int64)
        return np.stack([rng.permutation(dim)[rng.permutation(width) % dim] for _ in range(blocks)]).astype(np.int64)

    row_hash, row_sign = side(rows), _signs(rng, (blocks, rows))
    col_hash, col_sign = side(cols), _signs(rng, (blocks, cols))
    return {"row_hash": row_hash, "row_sign": row_sign, "col_hash": col_hash, "col_sign": col_sign}


def _signed(hashes: np.ndarray, signs: np.ndarray, dim: int) -> np.ndarray:
    """Buckets in ``[0, 2·dim)``: ``h`` for a + sign, ``h + dim`` for a − sign (the sketch: the halves' difference)."""
    return hashes + dim * (signs < 0)


def _fold(out: torch.Tensor, dim: int) -> torch.Tensor:
    """``[..., 2·dim]`` signed buckets → ``[..., dim]`` sketch."""
    return out[..., :dim] - out[..., dim:]


class Projection(ABC):
    """The seeded projection of one parameter's per-example gradients into ``dim`` coordinates, on one device.

    Subclasses implement the three routes; every route of one projection gives the same values to rounding.

    Attributes:
        kind: The name recorded in the store (a key of :data:`PROJECTIONS`).
        dim: Sketch dimension ``k``.
        rows: Rows of the gradient's natural view.
        cols: Columns of the gradient's natural view.
    """

    kind: ClassVar[str]

    def __init__(self, seed: int, name: str, view: tuple[int, int], dim: int,
                 device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.rows, self.cols = view
        self._build(sketch_hashes(seed, name, view, dim, self.kind), torch.device(device))

    @staticmethod
    def create(seed: int, name: str, view: tuple[int, int], dim: int, kind: str,
               device: torch.device | str = "cpu") -> Projection:
        """The projection of kind ``kind`` of parameter ``name`` (natural view ``(rows, cols)``) from the seed."""
        if kind not in PROJECTIONS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return PROJECTIONS[kind](seed, name, view, dim, device)

    @abstractmethod
    def _build(self, hashes: dict[str, np.ndarray], device: torch.device) -> None:
        """Keep what the routes need of :func:`sketch_hashes` on the device."""

    @abstractmethod
    def dense(self, m: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
        """Sketch ``[n, k]`` of materialised matrices ``m`` ``[n, rows, c]`` placed at columns ``col_offset…``."""

    @abstractmethod
    def factored(self, u: torch.Tensor, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """Sketch ``[n, k]`` of ``M_n = Σ_t u[n, t] v[n, t]ᵀ``.

        Args:
            u: ``[n, T, rows]`` row factors.
            v: ``[n, T, c]`` column factors.
            bias: ``v`` has an implicit trailing column of ones (the last column of the view).
        """

    @abstractmethod
    def indexed(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sketch ``[n, k]`` of ``M_n = Σ_t e_{rows[n, t]} v[n, t]ᵀ`` (an embedding gradient).

        Args:
            rows: ``[n, T]`` int64 row of each position (the token id).
            v: ``[n, T, cols]`` column factors (the output gradients).
        """

    @classmethod
    @abstractmethod
    def cost(cls, view: tuple[int, int], dim: int, form: Form, costs: KernelCosts = SKETCH_COSTS) -> float:
        """Nanoseconds per example to sketch one per-example gradient of ``form`` with this class (a model)."""

    @classmethod
    def applies(cls, view: tuple[int, int], dim: int) -> bool:
        """Whether this class may project a parameter of natural view ``view`` into ``dim`` coordinates."""
        return True

    def route_cost(self, form: Form, costs: KernelCosts) -> float:
        """:meth:`cost` of this projection's shapes, weighed with ``costs`` (for choosing a route, not a class)."""
        return self.cost((self.rows, self.cols), self.dim, form, costs)


class CountSketch(Projection):
    """CountSketch with an independent hash and sign per entry (see the module docstring)."""

    kind = "countsketch"

    def _build(self, hashes: dict[str, np.ndarray], device: torch.device) -> None:
        self.signed = torch.from_numpy(_signed(hashes["hash"], hashes["sign"], self.dim)).to(device)  # [rows, cols]
        self._flat: dict[tuple[int, int], torch.Tensor] = {}

    def _columns(self, col_offset: int, cols: int, transposed: bool = False) -> torch.Tensor:
        """``[1, rows·c]`` signed buckets of columns ``col_offset…`` (contiguous, cached).

        In the order of the block's entries, or of its transpose's (``transposed``).
        """
        key = (col_offset, cols, transposed)
        if key not in self._flat:
            block = self.signed if (col_offset, cols) == (0, self.cols) else \
                self.signed[:, col_offset : col_offset + cols]
            self._flat[key] = (block.T if transposed else block).reshape(1, -1).contiguous()
        return self._flat[key]

    def dense(self, m: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
        """One ``scatter_add_`` of every entry into ``2k`` signed buckets, the hash broadcast over examples."""
        return self._scatter(m, self._columns(col_offset, m.shape[2]))

    def dense_transposed(self, mt: torch.Tensor) -> torch.Tensor:
        """:meth:`dense` of ``mt.transpose(1, 2)``, given the contiguous transposes ``mt`` ``[n, cols, rows]``.

        ``mt`` covers the whole view; each entry goes into its bucket, the sums' order differs (the same sketch to
        rounding).
        """
        return self._scatter(mt, self._columns(0, mt.shape[1], transposed=True))

    def _scatter(self, m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``[n, k]``: every entry of ``m`` ``[n, …]`` added into its signed bucket ``idx`` ``[1, m[0].numel()]``."""
        n = m.shape[0]
        out = m.new_zeros((n, 2 * self.dim))
        return _fold(out.scatter_add_(1, idx.expand(n, -1), m.reshape(n, -1)), self.dim)

    def factored(self, u: torch.Tensor, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """Materialises the gradients a few examples at a time (one batched GEMM), then :meth:`dense`."""
        n = v.shape[0]
        step = max(1, min(MATERIALISE_ELEMENTS, _CHUNK_ELEMENTS) // max(1, self.rows * self.cols))
        parts = []
        for i in range(0, n, step):
            ui, vi = u[i : i + step], v[i : i + step]
            s = self.dense(torch.bmm(ui.transpose(1, 2), vi))
            if bias:
                s = s + self.dense(ui.sum(1).unsqueeze(2), col_offset=vi.shape[-1])
            parts.append(s)
        return torch.cat(parts)

    def indexed(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Each position's row of the hash, gathered by its token id, then one ``scatter_add_``."""
        n, _, c = v.shape
        idx = self.signed[rows][..., :c]  # [n, T, c]
        out = v.new_zeros((n, 2 * self.dim))
        return _fold(out.scatter_add_(1, idx.reshape(n, -1), v.reshape(n, -1)), self.dim)

    @classmethod
    def cost(cls, view: tuple[int, int], dim: int, form: Form, costs: KernelCosts = SKETCH_COSTS) -> float:
        """One scattered add per entry; factors are materialised first (``T·rows·cols`` multiply-adds)."""
        route, t = form
        rows, cols = view
        if route == "indexed":
            return costs.scatter * t * cols
        materialise = costs.gemm * t * rows * cols if route == "factored" else 0.0
        return materialise + costs.scatter * rows * cols


class TensorSketchMean(Projection):
    """The mean of :func:`tensorsketch_blocks` TensorSketches with combined row/column hashes (module docstring)."""

    kind = "tensorsketch"

    def _build(self, hashes: dict[str, np.ndarray], device: torch.device) -> None:
        k = self.dim
        self.blocks = hashes["row_hash"].shape[0]
        self.row_hash = torch.from_numpy(hashes["row_hash"]).to(device)  # [B, rows]
        self.row_sign = torch.from_numpy(hashes["row_sign"]).to(device)
        self.row_signed = torch.from_numpy(_signed(hashes["row_hash"], hashes["row_sign"], k)).to(device)
        self.col_signed = torch.from_numpy(_signed(hashes["col_hash"], hashes["col_sign"], k)).to(device)
        self.col_hash = torch.from_numpy(hashes["col_hash"]).to(device)
        self.col_sign = torch.from_numpy(hashes["col_sign"]).to(device)
        self._taps_last: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # column hashes in (tap, channel) order

    @classmethod
    def applies(cls, view: tuple[int, int], dim: int) -> bool:
        """A matrix (both sides > 1) with more entries than ``dim`` (below that a CountSketch is exact)."""
        return min(view) > 1 and view[0] * view[1] > dim

    def _count(self, x: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
        """Per-block CountSketch ``[N, w] → [B, N, k]`` with the signed buckets ``signed [B, ≥ w]``."""
        n, width = x.shape
        out = x.new_zeros((self.blocks, n, 2 * self.dim))
        for b in range(self.blocks):  # each block's output contiguous: one scatter_add_ with a broadcast hash
            out[b].scatter_add_(1, signed[b, :width].expand(n, -1), x)
        return _fold(out, self.dim)

    def factored(self, u: torch.Tensor, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """Never forms ``M``: ``B`` CountSketches of both factors and ``2B`` real FFTs per position.

        Blocks are the inner loop and examples (or, for long sequences, positions) the outer one, sized so that one
        block's counts of both factors stay within :data:`_CACHE_ELEMENTS` (the products are accumulated per example
        in the frequency domain: one inverse FFT per example). When every block's counts fit at once (few positions,
        e.g. ``T = 1``), all blocks are counted together.
        """
        return self._factored(u, v, bias, self.col_hash, self.col_sign, self.col_signed)

    def factored_taps_last(self, u: torch.Tensor, v: torch.Tensor, channels: int) -> torch.Tensor:
        """:meth:`factored` of a convolution's patches whose columns are ordered ``(tap, channel)``.

        The natural view orders a patch's ``channels·taps`` columns ``(channel, tap)``; patches formed from a
        channels-last input come ``(tap, channel)`` and contiguous (:meth:`~gradcoh.logger.ops.conv.Patches.
        unfold_taps_last`: memory copies of ``channels`` entries instead of a transposing copy of every entry). Each
        column keeps its own hash and sign (permuted with it), so the sketch is the same projection (to rounding).

        Args:
            u: ``[n, T, rows]`` output gradients.
            v: ``[n, T, taps·channels]`` patches, column ``o·channels + c`` holding channel ``c`` at tap ``o``.
            channels: Input channels ``C`` (the view's first ``C·taps`` columns; a bias column is sketched apart).
        """
        c = v.shape[-1]
        key = (channels, c)
        if key not in self._taps_last:
            if c > self.cols or c % channels:
                raise ValueError(f"patches of {c} columns in {channels} channels do not match the "
                                 f"{self.rows}×{self.cols} view of this projection")
            order = torch.arange(c, device=self.col_hash.device).view(channels, c // channels).T.reshape(-1)
            self._taps_last[key] = (self.col_hash[:, order], self.col_sign[:, order], self.col_signed[:, order])
        return self._factored(u, v, False, *self._taps_last[key])

    def _factored(self, u: torch.Tensor, v: torch.Tensor, bias: bool, col_hash: torch.Tensor,
                  col_sign: torch.Tensor, col_signed: torch.Tensor) -> torch.Tensor:
        """:meth:`factored` with the column hashes given (``[B, ≥ c]``, in the order of ``v``'s columns)."""
        n, t, c = v.shape
        k = self.dim
        budget = min(_CACHE_ELEMENTS, _CHUNK_ELEMENTS)
        per_example = t * 2 * k
        if self.blocks * n * per_example <= budget:
            return self._factored_all_blocks(u, v, bias, col_signed)
        ne = max(1, budget // per_example)
        tt = t if per_example <= budget else max(1, budget // (2 * k))  # (ne > 1 implies per_example <= budget)
        ones = self._ones_column(c, v.dtype) if bias else None
        rows = u.shape[2]
        parts = []
        for e0 in range(0, n, ne):
            part = None
            for t0 in range(0, t, tt):
                ue, ve = u[e0 : e0 + ne, t0 : t0 + tt], v[e0 : e0 + ne, t0 : t0 + tt]
                m, p = ve.shape[:2]
                ue, ve = ue.reshape(m * p, rows), ve.reshape(m * p, c)
                for b in range(self.blocks):
                    cv = self._count_block(ve, col_hash[b], col_sign[b], col_signed[b])
                    if ones is not None:  # the implicit ones column: +1 at its signed bucket
                        cv += ones[b]
                    prod = torch.fft.rfft(self._count_block(ue, self.row_hash[b], self.row_sign[b],
                                                            self.row_signed[b]), dim=-1)
                    prod *= torch.fft.rfft(cv, dim=-1)
                    prod = prod.view(m, p, -1).sum(1)
                    part = prod if part is None else part.add_(prod)
            parts.append(part)
        return torch.fft.irfft(torch.cat(parts), n=k, dim=-1) / math.sqrt(self.blocks)

    def _factored_all_blocks(self, u: torch.Tensor, v: torch.Tensor, bias: bool,
                             col_signed: torch.Tensor) -> torch.Tensor:
        """:meth:`factored` with every block counted at once (its temporaries fit the cache)."""
        n, t, c = v.shape
        fu = torch.fft.rfft(self._count(u.reshape(n * t, -1), self.row_signed), dim=-1)  # [B, n·t, k/2+1]
        cv = self._count(v.reshape(n * t, c), col_signed)
        if bias:
            cv += self._ones_column(c, cv.dtype).unsqueeze(1)
        acc = (fu * torch.fft.rfft(cv, dim=-1)).view(self.blocks, n, t, -1).sum((0, 2))
        return torch.fft.irfft(acc, n=self.dim, dim=-1) / math.sqrt(self.blocks)

    def _count_block(self, x: torch.Tensor, hashes: torch.Tensor, signs: torch.Tensor,
                     signed: torch.Tensor) -> torch.Tensor:
        """One block's CountSketch ``[N, w] → [N, k]``.

        Narrower than ``k``: signs multiplied in, ``k`` buckets; otherwise ``2k`` signed buckets folded (reads of
        the input or of the buckets, whichever are fewer).
        """
        n, width = x.shape
        if width < self.dim:
            out = x.new_zeros((n, self.dim))
            return out.scatter_add_(1, hashes[:width].expand(n, -1), x * signs[:width].to(x.dtype))
        out = x.new_zeros((n, 2 * self.dim)).scatter_add_(1, signed[:width].expand(n, -1), x)
        return _fold(out, self.dim)

    def _ones_column(self, c: int, dtype: torch.dtype) -> torch.Tensor:
        """``[B, k]`` per-block CountSketch of the unit vector of column ``c``."""
        one = torch.zeros(self.blocks, 2 * self.dim, dtype=dtype, device=self.col_signed.device)
        one.scatter_(1, self.col_signed[:, c : c + 1], 1.0)
        return _fold(one, self.dim)

    def dense(self, m: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
        """Row-wise: each row's per-block column sketch, rolled by the row's bucket and signed, summed over rows.

        Rows and examples are chunked so that no temporary (the roll's index included) exceeds ``2²²`` elements.
        """
        n, rows, c = m.shape
        k = self.dim
        cols = self.col_signed[:, col_offset : col_offset + c]
        ramp = torch.arange(k, device=m.device)
        out = m.new_zeros((n, k))
        rstep = max(1, _CHUNK_ELEMENTS // (2 * k))
        for r0 in range(0, rows, rstep):
            part = m[:, r0 : r0 + rstep]
            rr = part.shape[1]
            nstep = max(1, _CHUNK_ELEMENTS // (rr * 2 * k))
            for b in range(self.blocks):
                shift = (ramp - self.row_hash[b, r0 : r0 + rr, None]) % k  # [rr, k]: the roll of each row
                sign = self.row_sign[b, r0 : r0 + rr].to(m.dtype)
                for i in range(0, n, nstep):
                    mi = part[i : i + nstep]
                    ni = mi.shape[0]
                    y = mi.new_zeros((ni * rr, 2 * k)).scatter_add_(1, cols[b].expand(ni * rr, -1),
                                                                     mi.reshape(ni * rr, c))
                    y = _fold(y, k).view(ni, rr, k).gather(2, shift.expand(ni, -1, -1))
                    out[i : i + ni] += torch.einsum("nrk,r->nk", y, sign)
        return out / math.sqrt(self.blocks)

    def indexed(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Circular convolution with a signed one-hot is a signed roll by the row's bucket."""
        n, t, c = v.shape
        k = self.dim
        out = v.new_zeros((n, k))
        step = max(1, _CHUNK_ELEMENTS // max(1, n * self.blocks * k))
        ramp = torch.arange(k, device=v.device)
        for t0 in range(0, t, step):
            part = rows[:, t0 : t0 + step]
            tt = part.shape[1]
            cs = self._count(v[:, t0 : t0 + step].reshape(n * tt, c), self.col_signed)
            cs = cs.view(self.blocks, n, tt, k).permute(1, 2, 0, 3)  # [n, t, B, k]
            idx = (ramp - self.row_hash.T[part].unsqueeze(-1)) % k  # [n, t, B, k]
            sign = self.row_sign.T[part].unsqueeze(-1).to(cs.dtype)
            out += (cs.gather(-1, idx) * sign).sum((1, 2))
        return out / math.sqrt(self.blocks)

    @classmethod
    def cost(cls, view: tuple[int, int], dim: int, form: Form, costs: KernelCosts = SKETCH_COSTS) -> float:
        """Per route, per example.

        Factored: ``B·T·(rows + cols)`` scattered adds and ``2B·T`` FFTs of size ``k``, one inverse FFT;
        materialised: ``B`` scattered adds per entry and ``B·rows·k`` to roll the rows; indexed: ``B·T·(cols + k)``.
        """
        route, t = form
        rows, cols = view
        fft = costs.fft * dim * math.log2(max(dim, 2))
        b = tensorsketch_blocks(view, dim)
        if route == "factored":
            return b * t * (costs.scatter * (rows + cols) + 2 * fft) + fft
        if route == "indexed":
            return b * t * (costs.scatter * (cols + dim) + fft)
        return b * (costs.scatter * rows * cols + 3 * costs.scatter * rows * dim)


PROJECTIONS: dict[str, type[Projection]] = {cls.kind: cls for cls in (CountSketch, TensorSketchMean)}
"""The projection classes by the kind recorded in the store."""

KINDS = tuple(PROJECTIONS)


def form_cost(cls: type[Projection], view: tuple[int, int], dim: int, form: Form,
              costs: KernelCosts = SKETCH_COSTS) -> float:
    """Nanoseconds per example of the exact statistics' route *and* the sketch of one form with class ``cls``.

    A factored form is sketched either as factors, next to the ghost norm the exact statistics then compute
    (``T²·(rows + cols)`` multiply-adds, :func:`~gradcoh.logger.ghost.ghost_macs`), or materialised, which costs
    ``(T + 1)·rows·cols`` multiply-adds (the gradient and its norm) and gives the dense route; the cheaper of the two
    counts, as :func:`~gradcoh.logger.grads.materialise_is_cheaper` decides per step. (Without the ghost norm a
    CountSketch's materialising looked dearer than it is: at four TensorSketch blocks every transformer MLP at
    T = 128 would have been moved to a TensorSketch mean that is no cheaper once the ghost norm is counted.)
    Materialised gradients also supply the layer's ``.grad`` in fused mode ``"auto"`` (:mod:`~gradcoh.logger.fused`),
    sparing autograd's weight-gradient GEMM, ``T·rows·cols`` multiply-adds, for the slot's sum, ``rows·cols`` at
    :data:`~gradcoh.logger.costs.FUSED_SUM_NS`: the materialised route is credited with the difference where it is
    positive (``T ≥ 20``; the call's fixed cost, ``FUSED_CALL_NS / n``, is left out: the model sees no batch size).
    Measured in whole steps, session 35: without this credit one- and two-block TensorSketch means took the
    transformers' Linear layers at T = 65–128 and their logged steps got 0.03–0.14× of a plain step slower. The
    credit is counted whatever the fused mode (the choice must not depend on options a resumed run may change), and
    also for convolutions, which fuse only as a first layer: at worst a CountSketch where a TensorSketch mean would be
    slightly cheaper. Dense and indexed forms cost the same exact statistics whichever class sketches them: only the
    sketch counts.
    """
    route, t = form
    own = cls.cost(view, dim, form, costs)
    if route != "factored":
        return own
    rows, cols = view
    kept = costs.gemm * ghost_macs(t, rows, cols) + own
    fused = max(0.0, costs.gemm * t - FUSED_SUM_NS) * rows * cols
    materialised = costs.gemm * (t + 1) * rows * cols - fused + cls.cost(view, dim, ("dense", 1), costs)
    return min(kept, materialised)


def choose_projection(view: tuple[int, int], dim: int, forms: list[Form]) -> str:
    """The kind of projection a parameter gets: the applicable class that sketches ``forms`` at the lowest cost.

    The costs are a model of the shapes (:func:`form_cost`: the sketch with the exact statistics' route it implies,
    FLOPs and scattered bytes weighed with the fixed :data:`~gradcoh.logger.costs.SKETCH_COSTS`), never timings, so
    the same model and shapes get the same kind on every machine and every rank; ties go to the first class of
    :data:`PROJECTIONS`. Without forms (a parameter no step has reached yet): a CountSketch.

    Args:
        view: The parameter's natural view ``(rows, cols)``.
        dim: Sketch dimension ``k``.
        forms: ``(route, positions)`` of each of its per-example gradients at the first step that sketches it.
    """
    best, best_cost = CountSketch.kind, math.inf
    for kind, cls in PROJECTIONS.items():
        if not forms or not cls.applies(view, dim):
            continue
        total = sum(form_cost(cls, view, dim, form) for form in forms)
        if total < best_cost:
            best, best_cost = kind, total
    return best


class ProjectionTable:
    """Which projection each parameter of one run gets, and what the store records of it (:meth:`attribute`).

    A kind is chosen once per parameter (:func:`choose_projection`), or adopted from the store appended to.

    Args:
        seed: The logger's seed.
        dim: Sketch dimension ``k``.
    """

    def __init__(self, seed: int, dim: int) -> None:
        self.seed, self.dim = seed, dim
        self.kinds: dict[str, str] = {}
        self.views: dict[str, tuple[int, int]] = {}
        self.unsaved = False

    def adopt(self, attrs: dict[str, Any], views: dict[str, tuple[int, int]], where: str) -> None:
        """Take the projections a store records (an appending run sketches exactly as the run before it).

        Args:
            attrs: The attributes of the group being appended to: its ``SKETCH_KEY`` (the sketch version) and
                ``PROJECTIONS_KEY`` (:meth:`attribute`; absent in a new store, or when no step sketched yet).
            views: Natural view of every parameter of this run, by name.
            where: The store, for error messages.

        Raises:
            ValueError: The store's sketches come from another sketch version, another dimension, unknown
                kinds or parameters of other shapes: appending would mix two projections in one store.
        """
        if not self.dim:
            return
        sketch = attrs.get(schema.SKETCH_KEY) or {}
        stored = attrs.get(schema.PROJECTIONS_KEY)
        if stored is None and sketch.get("version", SKETCH_VERSION) == SKETCH_VERSION:
            return
        stored = stored or {"version": sketch.get("version"), "dim": sketch.get("dim")}
        version, dim = stored.get("version"), stored.get("dim")
        if version != SKETCH_VERSION or dim != self.dim:
            raise ValueError(
                f"{where}: its sketches were made by sketch version {version!r} with k={dim!r}, this gradcoh makes "
                f"version {SKETCH_VERSION} with k={self.dim}; appending would mix two projections in one store. "
                "Start a new store (mode='create' or 'overwrite'), or append with sketch_dim=0")
        for name, entry in stored.get("params", {}).items():
            kind, view = entry.get("kind"), tuple(entry.get("view", ()))
            if kind not in PROJECTIONS or (name in views and views[name] != view):
                raise ValueError(
                    f"{where}: parameter {name!r} was sketched with a projection this gradcoh cannot reproduce "
                    f"(kind {kind!r}, view {list(view)}; known kinds {list(KINDS)}, this run's view "
                    f"{list(views.get(name, ()))}); start a new store")
            self.kinds[name], self.views[name] = kind, view

    def get(self, name: str, view: tuple[int, int], forms: list[Form], device: torch.device) -> Projection:
        """Parameter ``name``'s projection on ``device``, its kind chosen from ``forms`` if none is recorded yet."""
        kind = self.kinds.get(name)
        if kind is None:
            kind = self.kinds[name] = choose_projection(view, self.dim, forms)
            self.views[name] = view
            self.unsaved = True
        return Projection.create(self.seed, name, view, self.dim, kind, device)

    def attribute(self) -> dict[str, Any]:
        """The store's record: ``{version, dim, params: {name: {kind, view}}}``."""
        return {"version": SKETCH_VERSION, "dim": self.dim,
                "params": {name: {"kind": kind, "view": list(self.views[name])}
                           for name, kind in sorted(self.kinds.items())}}
