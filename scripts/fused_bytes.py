"""What fused mode materialises per logged step: per-example weight gradients formed only to fill a fused call's slot
(the unfused exact step never forms them) against those materialised anyway, at the bench sizes of
scripts/bench_overhead.py (one logged step, ``fused=True``, 1 thread).

    python scripts/fused_bytes.py timm-deit llama bert hf-vit timm-resnet timm-convnext timm-efficientnet
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
from gradcoh.logger.grads import Dense

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_overhead

log = logging.getLogger("fused_bytes")


def materialised(name: str) -> dict[str, int]:
    """``{"anyway": floats, "for_fusing": floats}`` of one logged step of zoo model ``name`` in fused mode."""
    case = bench_overhead.make_zoo_case(name, bench_overhead.default_batch(name), 0, "cpu")
    model = case["models"]["default"]
    real = tracker_module.fill_slot
    counts = {"anyway": 0, "for_fusing": 0}

    def counted(grad, slot, projector=None):
        out = real(grad, slot, projector)
        if slot.weight_grad is not None:  # the slot was filled: Dense came materialised, else formed for it
            counts["anyway" if isinstance(grad, Dense) else "for_fusing"] += out.blocks[0].numel()
        return out

    tracker_module.fill_slot = counted
    try:
        with tempfile.TemporaryDirectory() as tmp, GradientLogger(model, Path(tmp) / "s.zarr", fused=True,
                                                                  handle_sigterm=False) as glog:
            glog._output.put = lambda *a: None  # the writer is not what is counted
            with glog.record(0):
                case["loss"](model, case["batch"]).mean().backward()
    finally:
        tracker_module.fill_slot = real
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", choices=bench_overhead.ZOO, metavar="MODEL",
                    help=f"zoo models of scripts/bench_overhead.py: {', '.join(bench_overhead.ZOO)}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    log.info("| model | materialised for fusing only | materialised anyway |")
    log.info("|---|---:|---:|")
    for name in args.models:
        c = materialised(name)
        log.info("| %s | %.1f M floats (%.0f MB) | %.1f M |", name, c["for_fusing"] / 1e6, c["for_fusing"] * 4 / 1e6,
                 c["anyway"] / 1e6)


if __name__ == "__main__":
    main()
