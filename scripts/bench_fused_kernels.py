"""Fused mode's choice per call against the kernels it weighs: one Linear/conv call's exact statistics unfused
(autograd's weight-gradient GEMM + the ghost norm) and fused (materialise + the slot's sum + squared norms), the
fastest of 3×15 interleaved repetitions on 1 thread, next to what :func:`gradcoh.logger.fused.fused_is_cheaper` says.

    python scripts/bench_fused_kernels.py
"""

from __future__ import annotations

import logging
import time

import torch
from gradcoh.logger.fused import fused_is_cheaper
from gradcoh.logger.grads import Factored

log = logging.getLogger("bench_fused_kernels")

SHAPES = {"llama q_proj": (8, 128, 256, 256), "llama mlp": (8, 128, 688, 256), "gpt2 c_fc-like": (8, 128, 1024, 256),
          "vit qkv": (16, 65, 576, 192), "vit fc1": (16, 65, 768, 192), "vit head": (16, 1, 10, 192),
          "mlp T=1": (32, 1, 256, 256), "resnet-18 layer4 conv": (32, 4, 512, 4608),
          "resnet-18 layer1 conv": (32, 256, 64, 576)}
"""(n, T, rows, cols) of representative calls of the zoo at the bench sizes."""


def fastest_ms(fn, reps: int = 15) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    log.info("| call (n, T, rows × cols) | unfused ms | fused ms | fused / unfused | cost model |")
    log.info("|---|---:|---:|---:|---|")
    for name, (n, t, rows, cols) in SHAPES.items():
        u, v = torch.randn(n, t, rows), torch.randn(n, t, cols)
        form = Factored(u, v)

        def unfused(u=u, v=v, form=form, rows=rows, cols=cols):
            return u.reshape(-1, rows).T @ v.reshape(-1, cols), form.sq_norms()

        def fused(form=form, n=n):
            d = form.materialise().blocks[0]
            return d.sum(0), torch.linalg.vector_norm(d.reshape(n, -1), dim=1).square()

        a, b = [], []
        for _ in range(3):
            a.append(fastest_ms(unfused))
            b.append(fastest_ms(fused))
        choice = "fused" if fused_is_cheaper(n, t, rows, cols, 4) else "refused"
        log.info("| %s (%d, %d, %d × %d) | %.2f | %.2f | %.2f | %s |", name, n, t, rows, cols, min(a), min(b),
                 min(b) / min(a), choice)


if __name__ == "__main__":
    main()
