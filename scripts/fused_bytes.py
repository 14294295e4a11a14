"""What fused mode does per logged step: the calls it fuses, the weight-gradient GEMM multiply-adds they spare, and
the per-example weight gradients formed only to fill a fused call's slot (the unfused step never forms them) against
those materialised anyway, at the bench sizes of scripts/bench_overhead.py (one logged step, 1 thread). Counts of
shapes, not timings: they do not depend on the machine's load.

    python scripts/fused_bytes.py --level auto --sketch-dim 256 gpt2 llama timm-vit timm-convnext timm-resnet
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from gradcoh.logger import GradientLogger
from gradcoh.logger import tracker as tracker_module
from gradcoh.logger import uses as uses_module
from gradcoh.logger.costs import kernel_costs
from gradcoh.logger.fused import call_shape
from gradcoh.logger.grads import Composite, Dense, materialise_is_cheaper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead

log = logging.getLogger("fused_bytes")


def materialised(name: str, level: bool | str, sketch_dim: int) -> dict[str, int]:
    """Counts of one logged step of zoo model ``name`` at fused level ``level``.

    ``calls``: calls run through a fused Function; ``filled``: of those, slots filled (their GEMM spared);
    ``spared``: the spared GEMMs' multiply-adds ``n·T·rows·cols``; ``anyway`` / ``for_fusing``: floats of the filled
    slots' per-example gradients that the unfused route materialises anyway (the rule's Dense, or
    :func:`~gradcoh.logger.grads.choose_route`'s choice with the weight's projector and the kernel costs in use) /
    that were formed only to fill the slot.
    """
    case = bench_overhead.make_zoo_case(name, bench_overhead.default_batch(name), 0, "cpu")
    model = case["models"]["default"]
    real_fill, real_call = tracker_module.fill_slot, uses_module.call_is_fused
    counts = {"calls": 0, "filled": 0, "spared": 0, "anyway": 0, "for_fusing": 0}
    macs: dict[int, int] = {}  # id(weight) -> multiply-adds of its last fused call's GEMM

    def call(n, x, weight, bias, conv=None, **kwargs):
        fused = real_call(n, x, weight, bias, conv, **kwargs)
        if fused:
            t, rows, cols, _ = call_shape(n, x, weight, bias, conv, kwargs.get("transposed", False))
            counts["calls"] += 1
            macs[id(weight)] = n * t * rows * cols
        return fused

    def fill(grad, slot, projector=None):
        out = real_fill(grad, slot, projector)
        if slot.weight_grad is not None:  # filled: Dense came materialised, else formed for it
            weight = grad.parts[0][0] if isinstance(grad, Composite) else grad
            done = out.parts[0][0] if isinstance(out, Composite) else out
            anyway = isinstance(weight, Dense) or materialise_is_cheaper(  # what the unfused route does
                weight.n, weight.positions, weight.n_rows, weight.n_cols, weight.v.element_size(), projector,
                kernel_costs(weight.v.device, weight.v.dtype))
            counts["anyway" if anyway else "for_fusing"] += done.blocks[0].numel()
            counts["filled"] += 1
            counts["spared"] += macs.get(slot.weight, 0)
        return out

    tracker_module.fill_slot, uses_module.call_is_fused = fill, call
    try:
        with tempfile.TemporaryDirectory() as tmp, GradientLogger(model, Path(tmp) / "s.zarr", fused=level,
                                                                  sketch_dim=sketch_dim, handle_sigterm=False) as glog:
            glog._output.put = lambda *a: None  # the writer is not what is counted
            with glog.record(0):
                case["loss"](model, case["batch"]).mean().backward()
    finally:
        tracker_module.fill_slot, uses_module.call_is_fused = real_fill, real_call
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", choices=bench_overhead.ZOO, metavar="MODEL",
                    help=f"zoo models of scripts/bench_overhead.py: {', '.join(bench_overhead.ZOO)}")
    ap.add_argument("--level", default="auto", choices=("auto", "true"), help="fused level (default auto)")
    ap.add_argument("--sketch-dim", type=int, default=0, help="sketch dimension k (default 0: exact only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gradcoh").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    level = True if args.level == "true" else "auto"
    log.info("fused=%r, k=%d", level, args.sketch_dim)
    log.info("| model | fused calls | slots filled | GEMM multiply-adds spared | materialised for fusing only "
             "| materialised anyway |")
    log.info("|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        c = materialised(name, level, args.sketch_dim)
        log.info("| %s | %d | %d | %.0f M | %.1f M floats (%.0f MB) | %.1f M |", name, c["calls"], c["filled"],
                 c["spared"] / 1e6, c["for_fusing"] / 1e6, c["for_fusing"] * 4 / 1e6, c["anyway"] / 1e6)


if __name__ == "__main__":
    main()
