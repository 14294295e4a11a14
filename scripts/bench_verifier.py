"""Cost of the verifier (gradcoh.logger.verify): logged steps with and without verification, interleaved.

Prints, per model, the time of a logged step with ``verify_every=0`` (never) and ``verify_every=1`` (every step), the
ratio, and the overhead at the default rate, ``(t_every1 / t_never - 1) / verify_every``, against logged steps.

    python scripts/bench_verifier.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch
import torch.nn.functional as F
from gradcoh.logger import GradientLogger
from gradcoh.logger.config import LoggerConfig
from torch import nn

log = logging.getLogger("bench_verifier")


def models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
    encoder = nn.Sequential(nn.Linear(32, 128), layer, nn.Flatten(1), nn.Linear(128 * 32, 10))
    return {
        "mlp 256-512-512-10, n 64": (mlp, torch.randn(64, 256), torch.randint(0, 10, (64,))),
        "transformer layer d 128 T 32, n 32": (encoder, torch.randn(32, 32, 32), torch.randint(0, 10, (32,))),
    }


def step_time(glog: GradientLogger, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
    start = time.perf_counter()
    with glog.record(step) as rec:
        losses = F.cross_entropy(model(x), y, reduction="none")
        rec.loss(losses)
        losses.mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    default = LoggerConfig().verify_every
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, x, y) in models().items():
            never = GradientLogger(model, f"{tmp}/a.zarr", mode="overwrite", verify_every=0, handle_sigterm=False)
            always = GradientLogger(model, f"{tmp}/b.zarr", mode="overwrite", verify_every=1, handle_sigterm=False)
            times: dict[str, list[float]] = {"never": [], "always": []}
            for step in range(args.repeats + 3):  # interleaved; the first 3 warm up
                for key, glog in (("never", never), ("always", always)):
                    t = step_time(glog, model, x, y, step)
                    if step >= 3:
                        times[key].append(t)
            never.close()
            always.close()
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            ratio = med["always"] / med["never"]
            log.info("%s: logged step %.2f ms, verified every step %.2f ms (x%.3f); at verify_every=%d: +%.2f%%",
                     name, 1e3 * med["never"], 1e3 * med["always"], ratio, default, 100 * (ratio - 1) / default)


if __name__ == "__main__":
    main()
