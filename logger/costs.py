"""What kernels cost on the device in use: measured once per device and dtype, for choosing between exact routes.

Two routes that give the same values (to rounding) can differ several-fold in time, and by how much depends on the
device: a batched GEMM is cheap on a GPU and relatively dear on one CPU core, a scattered add the other way round.
:func:`kernel_costs` times three small kernels at first use per ``(device, dtype)`` and gives nanoseconds per
element, cached in one process-wide :class:`Calibration`; measuring on a GPU synchronises the device, once per
entry. (The convolution weight-gradient routes are chosen from the shapes alone,
:func:`~gradcoh.logger.ops.conv.per_example_weight_grad`.)

Only choices whose results are equal to rounding use these measurements. Choices that change *what* is stored (the
kind of a sketch projection) use fixed constants, so that every process and every restart of a run makes the same
one. ``GRADCOH_CALIBRATE=0`` in the environment turns measuring off: the fixed one-CPU-core constants are used.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class KernelCosts:
    """Nanoseconds per element of the kernels the route choices weigh.

    Attributes:
        gemm: One multiply-add of a batched GEMM.
        scatter: One scattered add (``index_add_``, a CountSketch).
        fft: One unit of ``k·log2(k)`` in a real FFT of size ``k``.
    """

    gemm: float
    scatter: float
    fft: float


ONE_CPU_CORE = KernelCosts(gemm=0.02, scatter=1.9, fft=0.4)
"""Fixed constants from the first profile on one CPU core (scripts/profile_logger.py): used when not calibrating
(today's measurement on that core: gemm 0.022, scatter 0.85, fft 0.08)."""


SKETCH_COSTS = KernelCosts(gemm=0.025, scatter=0.65, fft=0.15)
"""Fixed constants for choosing the kind of a sketch projection (:func:`gradcoh.logger.sketch.choose_projection`):
never measured, so that every machine, rank and resumed run makes the same choice. From one CPU core on
2026-12-02 with the kernels the sketches run: a batched GEMM 0.025 ns per multiply-add, ``scatter_add_``
0.60–0.75 ns per element, a real FFT of size 256–1024 0.10–0.25 ns per ``k·log2(k)``. Changing them changes which
parameters get which projection: bump :data:`~gradcoh.logger.sketch.SKETCH_VERSION` with them."""


FUSED_CALL_NS = 290_000.0
"""Fixed cost of one fused call (:mod:`gradcoh.logger.fused`: the Python ``autograd.Function`` in the forward and the
backward, the slot's bookkeeping), in nanoseconds: 0.29 ms per call measured on one CPU core (ConvNeXt-atto, 23
fused calls, session 33)."""

FUSED_SUM_NS = 0.5
"""Nanoseconds per element of a fused call's slot sum ``Σ_n G_n`` over its materialised ``[n, rows, cols]``: a
reduction bound by reading memory once the gradients outgrow the cache (one CPU core, in a logged ConvNeXt-atto
step: 0.4–0.7 ns for ``[32, 160, 640]``; alone: 0.47–0.53 ns at 3–13 M elements, 0.12–0.3 ns below 1 M).

Level ``"auto"`` fuses a call only where the weight-gradient GEMM it spares, ``n·T·rows·cols`` multiply-adds at
``SKETCH_COSTS.gemm``, costs at least :data:`FUSED_CALL_NS` plus this sum (about ``T ≥ 20`` positions, and 12 M
multiply-adds): fixed constants, so every machine fuses the same calls."""


def _enabled() -> bool:
    return os.environ.get("GRADCOH_CALIBRATE", "1") != "0"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int = 2) -> float:
    """Best time of ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


class Calibration:
    """Measured kernel costs per ``(device, dtype)``."""

    def __init__(self) -> None:
        self._costs: dict[tuple[str, torch.dtype], KernelCosts] = {}

    def kernel_costs(self, device: torch.device, dtype: torch.dtype) -> KernelCosts:
        """Per-element costs on ``device`` for ``dtype`` (measured at first use, a few milliseconds)."""
        if not _enabled():
            return ONE_CPU_CORE
        key = (str(device), dtype)
        if key not in self._costs:
            self._costs[key] = _measure(torch.device(device), dtype)
            log.info("kernel costs on %s (%s): %s", device, dtype, self._costs[key])
        return self._costs[key]


def _measure(device: torch.device, dtype: torch.dtype) -> KernelCosts:
    """Time a batched GEMM, an ``index_add_`` and a real FFT of fixed sizes on ``device``."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 128, 128, generator=gen).to(device, dtype)
    src = torch.randn(2**18, generator=gen).to(device, dtype)
    index = torch.randint(0, 4096, (2**18,), generator=gen).to(device)
    out = torch.zeros(4096, device=device, dtype=dtype)
    k = 1024
    signal = torch.randn(64, k, generator=gen).to(device, torch.float32)
    gemm = _seconds(lambda: torch.bmm(a, a), device) / a.numel() / 128
    scatter = _seconds(lambda: out.index_add_(0, index, src), device) / src.numel()
    fft = _seconds(lambda: torch.fft.irfft(torch.fft.rfft(signal), n=k), device) / (2 * 64 * k * 10)
    return KernelCosts(gemm=gemm * 1e9, scatter=scatter * 1e9, fft=fft * 1e9)


CALIBRATION = Calibration()
"""The process-wide measurements (device properties, not run state: shared by every logger of the process)."""


def kernel_costs(device: torch.device, dtype: torch.dtype) -> KernelCosts:
    """:meth:`Calibration.kernel_costs` of the process-wide :data:`CALIBRATION`."""
    return CALIBRATION.kernel_costs(device, dtype)
