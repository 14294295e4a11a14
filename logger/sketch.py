"""Seeded TensorSketch projections of per-example gradients, one per parameter, summed per layer.

Every parameter's gradient is viewed as a matrix ``M`` of shape ``(rows, cols) = (shape[0], numel / shape[0])``
(see :func:`gradcoh.logger.grads.natural_view`); a layer's sketch is the sum of its parameters' sketches, so that a
parameter used in several places (tied weights) is sketched once, as the sum over its uses. The sketch of ``M`` is
the TensorSketch (Pham & Pagh 2013)::

    s[m] = Σ_{i, j : (h_r(i) + h_c(j)) mod k = m}  σ_r(i) σ_c(j) M[i, j]

with hash functions ``h_r, h_c`` into ``[0, k)`` and random signs ``σ_r, σ_c``. It is linear in ``M`` (so sums of
sketches are sketches of sums), unbiased for inner products (``E⟨s(M), s(N)⟩ = ⟨M, N⟩``) and, for a sum of outer
products ``M = Σ_t u_t v_tᵀ``, computable without forming ``M``: ``s = IFFT(Σ_t FFT(CS_r u_t) ⊙ FFT(CS_c v_t))``.

The hashes depend only on ``(seed, parameter name, rows, cols, k)`` through :class:`numpy.random.SeedSequence`, are
generated on the CPU with NumPy and then moved to the device, so that the projection is identical across steps,
processes, restarts and devices. :func:`sketch_hashes` rebuilds them without torch for analysis code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

SKETCH_KIND = "tensorsketch"
SKETCH_VERSION = 2
"""1: one projection per layer matrix view; 2: one per parameter (natural view), summed per layer."""


def _entropy(seed: int, name: str, rows: int, cols: int, dim: int) -> list[int]:
    digest = hashlib.sha256(f"{SKETCH_KIND}/{SKETCH_VERSION}/{name}".encode()).digest()
    name_words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return [int(seed), *name_words, rows, cols, dim]


def sketch_hashes(seed: int, name: str, rows: int, cols: int, dim: int) -> dict[str, np.ndarray]:
    """Hash functions and signs of one layer's TensorSketch.

    Args:
        seed: The logger's seed.
        name: Qualified parameter name.
        rows: Rows of the parameter's matrix view.
        cols: Columns of the parameter's matrix view.
        dim: Sketch dimension ``k``.

    Returns:
        ``{"row_hash", "row_sign", "col_hash", "col_sign"}`` as NumPy arrays (int64 hashes in ``[0, dim)``,
        float32 signs ±1).
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy(seed, name, rows, cols, dim))))
    return {
        "row_hash": rng.integers(0, dim, size=rows, dtype=np.int64),
        "row_sign": rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=rows),
        "col_hash": rng.integers(0, dim, size=cols, dtype=np.int64),
        "col_sign": rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=cols),
    }


@dataclass
class TensorSketch:
    """The projection of one parameter, on one device.

    Attributes:
        dim: Sketch dimension ``k``.
        rows: Rows of the gradient matrix view.
        cols: Columns of the gradient matrix view.
        row_hash: ``[rows]`` int64 bucket of each row.
        row_sign: ``[rows]`` ±1 sign of each row.
        col_hash: ``[cols]`` int64 bucket of each column.
        col_sign: ``[cols]`` ±1 sign of each column.
    """

    dim: int
    rows: int
    cols: int
    row_hash: torch.Tensor
    row_sign: torch.Tensor
    col_hash: torch.Tensor
    col_sign: torch.Tensor
    _flat: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def create(
        cls, seed: int, name: str, rows: int, cols: int, dim: int, device: torch.device | str = "cpu"
    ) -> TensorSketch:
        """Build the projection of parameter ``name`` from the seed (see :func:`sketch_hashes`)."""
        hashes = sketch_hashes(seed, name, rows, cols, dim)
        h = {key: torch.from_numpy(value).to(device) for key, value in hashes.items()}
        return cls(dim, rows, cols, h["row_hash"], h["row_sign"], h["col_hash"], h["col_sign"])

    def count_sketch_cols(self, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """CountSketch ``[..., c] → [..., k]`` with the column hashes (``bias``: plus an implicit ones column)."""
        c = v.shape[-1]
        out = v.new_zeros((*v.shape[:-1], self.dim))
        out.index_add_(-1, self.col_hash[:c], v * self.col_sign[:c].to(v.dtype))
        if bias:
            out[..., self.col_hash[c]] += self.col_sign[c].to(v.dtype)
        return out

    def count_sketch_rows(self, u: torch.Tensor) -> torch.Tensor:
        """CountSketch ``[..., rows] → [..., k]`` with the row hashes."""
        out = u.new_zeros((*u.shape[:-1], self.dim))
        return out.index_add_(-1, self.row_hash, u * self.row_sign.to(u.dtype))

    def factored(self, u: torch.Tensor, v: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """Sketch ``[n, k]`` of ``M_n = Σ_t u[n, t] v[n, t]ᵀ`` without forming ``M``.

        Args:
            u: ``[n, T, rows]`` row factors.
            v: ``[n, T, c]`` column factors.
            bias: ``v`` has an implicit trailing column of ones (the last column of the view).
        """
        fu = torch.fft.rfft(self.count_sketch_rows(u), dim=-1)  # [n, T, k//2+1]
        fv = torch.fft.rfft(self.count_sketch_cols(v, bias), dim=-1)
        return torch.fft.irfft((fu * fv).sum(1), n=self.dim, dim=-1)  # [n, k]

    def indexed(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sketch ``[n, k]`` of ``M_n = Σ_t e_{rows[n, t]} v[n, t]ᵀ`` (an embedding gradient).

        Args:
            rows: ``[n, T]`` int64 row of each position (the token id).
            v: ``[n, T, cols]`` column factors (the output gradients).
        """
        cs = self.count_sketch_cols(v)  # [n, T, k]
        # Circular convolution with a signed one-hot is a signed roll by the row's bucket.
        shift = self.row_hash[rows].unsqueeze(-1)  # [n, T, 1]
        idx = (torch.arange(self.dim, device=v.device) - shift) % self.dim
        rolled = cs.gather(-1, idx) * self.row_sign[rows].unsqueeze(-1).to(cs.dtype)
        return rolled.sum(1)

    def dense(self, m: torch.Tensor, col_offset: int = 0) -> torch.Tensor:
        """Sketch ``[n, k]`` of materialised matrices ``m`` ``[n, rows, c]`` placed at columns ``col_offset…``."""
        cols = m.shape[2]
        key = (col_offset, cols)
        if key not in self._flat:
            col_hash = self.col_hash[col_offset : col_offset + cols]
            col_sign = self.col_sign[col_offset : col_offset + cols]
            idx = (self.row_hash[:, None] + col_hash[None, :]) % self.dim  # [rows, c]
            sign = self.row_sign[:, None] * col_sign[None, :]
            self._flat[key] = (idx.reshape(-1), sign.reshape(-1))
        idx, sign = self._flat[key]
        n = m.shape[0]
        out = m.new_zeros((n, self.dim))
        return out.index_add_(1, idx, m.reshape(n, -1) * sign.to(m.dtype))
