"""Seeded sketches of per-example gradients: one linear projection per parameter, summed per layer.

Every parameter's gradient is viewed as a matrix ``M`` of shape ``(rows, cols) = (shape[0], numel / shape[0])``
(see :func:`gradcoh.logger.grads.natural_view`); a layer's sketch is the sum of its parameters' sketches, so that a
parameter used in several places (tied weights) is sketched once, as the sum over its uses. Each parameter gets one
of two projections into ``k`` coordinates:

* **CountSketch** (Charikar, Chen & Farach-Colton 2002) with an independent hash and sign per entry of ``M``:
  ``s[h(i, j)] += σ(i, j) M[i, j]``. For a parameter with at most ``k`` entries the hash is injective and the
  projection is an isometry (its own contribution is exact). Otherwise the squared-norm estimate has relative
  variance ``(2/k)(1 − ‖M‖₄⁴/‖M‖⁴) ≤ 2/k``, a dense Johnson–Lindenstrauss projection's. It needs ``M`` itself (one
  scattered add per entry), so it suits gradients that are materialised anyway or are cheap to materialise: many
  positions per example, small matrices, vectors, convolution kernels.
* **Block TensorSketch** (Pham & Pagh 2013), computable from the factors of ``M = Σ_t u_t v_tᵀ`` without forming
  ``M``: the mean of ``B`` independent TensorSketches, ``s = B^{-1/2} Σ_b IFFT(Σ_t FFT(CS_{r,b} u_t) ⊙
  FFT(CS_{c,b} v_t))``. One TensorSketch (``B = 1``) has up to three times the dense variance when ``M`` has rank
  one (each frequency is a product of two independent complex Gaussians, relative variance 3 instead of 1); the
  mean of ``B`` independent ones brings it to ``(2/k)(1 + 2/B)`` at worst and to ``≈ 2/k`` for high-rank ``M``.
  ``B`` = :data:`TENSORSKETCH_BLOCKS`. It costs ``2B`` FFTs per position, so it suits few positions per example
  (classifier heads, MLPs: ``T = 1``) on large matrices.

Which one a parameter gets is decided once, at the first step that sketches it, from the shapes of its per-example
gradients (:func:`gradcoh.logger.grads.choose_projection`), and kept for the rest of the run.
Every projection is linear (sums of sketches are sketches of sums) and unbiased for inner products. The hashes
depend only on ``(seed, kind, parameter name, rows, cols, k)`` through :class:`numpy.random.SeedSequence` and are
generated on the CPU with NumPy, then moved to the device; :func:`sketch_hashes` rebuilds them without torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

SKETCH_KIND = "countsketch+tensorsketch"
SKETCH_VERSION = 3
"""1: one TensorSketch per layer matrix view; 2: one TensorSketch per parameter, summed per layer; 3: a CountSketch
or a block TensorSketch per parameter."""

KINDS = ("countsketch", "tensorsketch")

TENSORSKETCH_BLOCKS = 8
"""Independent TensorSketches averaged per parameter: worst-case relative sd √(2/k)·√(1 + 2/B) = 1.12·√(2/k)."""

_CHUNK_ELEMENTS = 2**22
"""Elements of the largest temporary a TensorSketch kernel builds at once (positions are chunked)."""


def _entropy(seed: int, kind: str, name: str, rows: int, cols: int, dim: int) -> list[int]:
    digest = hashlib.sha256(f"{kind}/{SKETCH_VERSION}/{name}".encode()).digest()
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
        kind: ``"countsketch"`` or ``"tensorsketch"``.

    Returns:
        CountSketch: ``{"hash", "sign"}`` of shape ``[rows, cols]`` (int64 buckets in ``[0, dim)``, distinct when
        ``rows·cols ≤ dim``; float32 ±1). Block TensorSketch: ``{"row_hash", "row_sign"}`` ``[B, rows]`` and
        ``{"col_hash", "col_sign"}`` ``[B, cols]``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rows, cols = view
    numel = rows * cols
    blocks = TENSORSKETCH_BLOCKS
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy(seed, kind, name, rows, cols, dim))))
    if kind == "countsketch":
        buckets = rng.permutation(dim)[:numel] if numel <= dim else rng.integers(0, dim, size=numel)
        return {"hash": buckets.astype(np.int64).reshape(rows, cols), "sign": _signs(rng, (rows, cols))}
    return {
        "row_hash": rng.integers(0, dim, size=(blocks, rows), dtype=np.int64),
        "row_sign": _signs(rng, (blocks, rows)),
        "col_hash": rng.integers(0, dim, size=(blocks, cols), dtype=np.int64),
        "col_sign": _signs(rng, (blocks, cols)),
    }


@dataclass
class Projection:
    """The seeded projection of one parameter into ``dim`` coordinates, on one device.

    Attributes:
        kind: ``"countsketch"`` or ``"tensorsketch"``.
        dim: Sketch dimension ``k``.
        rows: Rows of the gradient's natural view.
        cols: Columns of the gradient's natural view.
        blocks: Independent TensorSketches averaged (1 for a CountSketch).
        hashes: The tensors of :func:`sketch_hashes` on the device.
    """

    kind: str
    dim: int
    rows: int
    cols: int
    blocks: int
    hashes: dict[str, torch.Tensor]
    _flat: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def create(cls, seed: int, name: str, view: tuple[int, int], dim: int, kind: str,
               device: torch.device | str = "cpu") -> Projection:
        """Build the projection of parameter ``name`` (natural view ``(rows, cols)``) from the seed."""
        hashes = {key: torch.from_numpy(value).to(device) for key, value in
                  sketch_hashes(seed, name, view, dim, kind).items()}
        return cls(kind, dim, *view, TENSORSKETCH_BLOCKS if kind == "tensorsketch" else 1, hashes)

    # --- materialised gradients --------------------------------------------------------------------------
    def _entries(self, col_offset: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat bucket and sign of every entry of columns ``col_offset…`` (all blocks for a TensorSketch)."""
        key = (col_offset, cols)
        if key not in self._flat:
            h = self.hashes
            if self.kind == "countsketch":
                idx = h["hash"][:, col_offset : col_offset + cols]
                sign = h["sign"][:, col_offset : col_offset + cols]
            else:
                col_hash = h["col_hash"][:, col_offset : col_offset + cols]  # [B, c]
                col_sign = h["col_sign"][:, col_offset : col_offset + cols]
                idx = (h["row_hash"][:, :, None] + col_hash[:, None, :]) % self.dim  # [B, rows, c]
                sign = h["row_sign"][:, :, None] * col_sign[:, None, :] / math.sqrt(self.blocks)
            self._flat[key] = (idx.reshape(-1), sign.reshape(-1))
        return self._flat[key]

    def dense(self, m: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
        """Sketch ``[n, k]`` of materialised matrices ``m`` ``[n, rows, c]`` placed at columns ``col_offset…``."""
        n, _, cols = m.shape
        idx, sign = self._entries(col_offset, cols)
        flat = m.reshape(n, -1)
        if self.blocks > 1:
            flat = flat.repeat(1, self.blocks)
        out = m.new_zeros((n, self.dim))
        return out.index_add_(1, idx, flat * sign.to(m.dtype))

    # --- factored gradients ------------------------------------------------------------------------------
    def factored(self, u: torch.Tensor, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """Block TensorSketch ``[n, k]`` of ``M_n = Σ_t u[n, t] v[n, t]ᵀ`` without forming ``M``.

        Args:
            u: ``[n, T, rows]`` row factors.
            v: ``[n, T, c]`` column factors.
            bias: ``v`` has an implicit trailing column of ones (the last column of the view).

        Raises:
            ValueError: A CountSketch, which needs the materialised gradient (``Factored.sketch`` forms it).
        """
        if self.kind != "tensorsketch":
            raise ValueError("a CountSketch projects materialised gradients (dense), not factors")
        n, t = v.shape[:2]
        step = max(1, _CHUNK_ELEMENTS // max(1, n * self.blocks * self.dim))
        out = None
        for t0 in range(0, t, step):
            fu = torch.fft.rfft(self._count_rows(u[:, t0 : t0 + step]), dim=-1)  # [n, t, B, k//2+1]
            fv = torch.fft.rfft(self._count_cols(v[:, t0 : t0 + step], bias), dim=-1)
            part = (fu * fv).sum((1, 2))
            out = part if out is None else out + part
        return torch.fft.irfft(out, n=self.dim, dim=-1) / math.sqrt(self.blocks)

    def _count_rows(self, u: torch.Tensor) -> torch.Tensor:
        """Per-block CountSketch ``[..., rows] → [..., B, k]`` with the row hashes."""
        return self._count(u, self.hashes["row_hash"], self.hashes["row_sign"])

    def _count_cols(self, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """Per-block CountSketch ``[..., c] → [..., B, k]`` with the column hashes (``bias``: a ones column)."""
        c = v.shape[-1]
        h, s = self.hashes["col_hash"], self.hashes["col_sign"]
        out = self._count(v, h[:, :c], s[:, :c])
        if bias:
            for b in range(self.blocks):
                out[..., b, h[b, c]] += s[b, c].to(v.dtype)
        return out

    def _count(self, x: torch.Tensor, hashes: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        blocks, width = hashes.shape
        offsets = torch.arange(blocks, device=x.device).unsqueeze(1) * self.dim
        src = (x.unsqueeze(-2) * signs.to(x.dtype)).reshape(*x.shape[:-1], blocks * width)
        out = x.new_zeros((*x.shape[:-1], blocks * self.dim))
        out.index_add_(-1, (hashes + offsets).reshape(-1), src)
        return out.view(*x.shape[:-1], blocks, self.dim)

    def indexed(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sketch ``[n, k]`` of ``M_n = Σ_t e_{rows[n, t]} v[n, t]ᵀ`` (an embedding gradient).

        Args:
            rows: ``[n, T]`` int64 row of each position (the token id).
            v: ``[n, T, cols]`` column factors (the output gradients).
        """
        n, t, c = v.shape
        out = v.new_zeros((n, self.dim))
        if self.kind == "countsketch":
            idx = self.hashes["hash"][rows][..., :c]  # [n, T, c]
            src = v * self.hashes["sign"][rows][..., :c].to(v.dtype)
            return out.scatter_add_(1, idx.reshape(n, -1), src.reshape(n, -1))
        # Circular convolution with a signed one-hot is a signed roll by the row's bucket.
        step = max(1, _CHUNK_ELEMENTS // max(1, n * self.blocks * self.dim))
        ramp = torch.arange(self.dim, device=v.device)
        for t0 in range(0, t, step):
            part = rows[:, t0 : t0 + step]
            cs = self._count_cols(v[:, t0 : t0 + step])  # [n, t, B, k]
            idx = (ramp - self.hashes["row_hash"].T[part].unsqueeze(-1)) % self.dim  # [n, t, B, k]
            sign = self.hashes["row_sign"].T[part].unsqueeze(-1).to(cs.dtype)
            out += (cs.gather(-1, idx) * sign).sum((1, 2))
        return out / math.sqrt(self.blocks)
