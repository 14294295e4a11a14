"""Which BatchNorm probe semantics is closest to each example's own loss gradient in the network as it trains?

In train mode example i's loss ℓ_i depends on the other examples through the batch statistics; its gradient
∇_w ℓ_i, *through* the statistics (a row of the Jacobian of the per-example losses, not gradcoh's per-example
contribution), is what "the per-example gradient of the training network" means, but it costs one backward pass per
example through the whole batch. This script computes its m-coherence on a 64-example sample (one batch, statistics of
the sample) with plain autograd, next to the two exact probe semantics: the sample's statistics held constant
(``probe_mode="constant"``) and running statistics (``"eval"``). No gradcoh code is used.

ResNet-18 (CIFAR stem) on digits, SGD lr 0.02, momentum 0.9, batch 64, its own seeded batch order:

    OMP_NUM_THREADS=1 python scripts/bn_jacobian_reference.py --noise 0 --steps-at 0 3 6
    OMP_NUM_THREADS=1 python scripts/bn_jacobian_reference.py --noise 1 --steps-at 24 27
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from gradcoh.logger.experiment.datasets import load_dataset
from gradcoh.logger.experiment.models import build_model
from gradcoh.logger.experiment.noise import corrupt_labels
from torch import nn


def m_coherence(grads) -> float:
    """‖Σ g_i‖² / Σ ‖g_i‖² over an iterable of per-example gradients (tuples of tensors), in float64."""
    total, sq = None, 0.0
    for g in grads:
        v = torch.cat([t.reshape(-1).double() for t in g])
        total = v if total is None else total + v
        sq += float(v @ v)
    return float(total @ total) / sq


def through_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Each example's loss gradient in the train-mode network on the batch ``x`` (through the batch statistics)."""
    m = copy.deepcopy(model).train()
    params = list(m.parameters())
    per = F.cross_entropy(m(x), y, reduction="none")
    return m_coherence(torch.autograd.grad(per[i], params, retain_graph=True) for i in range(len(y)))


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, constant: bool) -> float:
    """Per-example gradients in eval mode: running statistics, or ``x``'s batch statistics held constant."""
    m = copy.deepcopy(model)
    if constant:
        stats = {}
        bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
        hooks = [b.register_forward_pre_hook(lambda mod, a: stats.__setitem__(
            mod, (a[0].mean((0, 2, 3)), a[0].var((0, 2, 3), unbiased=False)))) for b in bns]
        with torch.no_grad():
            m.train()(x)
        for h in hooks:
            h.remove()
        for b in bns:
            b.running_mean, b.running_var = stats[b]
    m.eval()
    params = list(m.parameters())
    return m_coherence(torch.autograd.grad(F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]), params)
                       for i in range(len(y)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-at", type=int, nargs="+", default=[0, 3, 6])
    ap.add_argument("--m", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load_dataset("digits", None, seed=args.seed)
    labels, _ = corrupt_labels(data.targets, data.num_classes, args.noise, args.seed + 100)
    model = build_model("resnet18", data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    sample = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + 7))[: args.m]
    px, py = data.batch(sample), labels[sample]
    torch.manual_seed(args.seed + 1)
    order = torch.randperm(len(data))
    for step in range(max(args.steps_at) + 1):
        start = (step * 64) % (len(data) // 64 * 64)
        idx = order[start : start + 64]
        model.train()
        F.cross_entropy(model(data.batch(idx)), labels[idx]).backward()
        opt.step()
        opt.zero_grad()
        if step in args.steps_at:
            row = {"noise": args.noise, "seed": args.seed, "step": step, "m": args.m,
                   "through_statistics": through_statistics(model, px, py),
                   "constant": per_example(model, px, py, True), "eval": per_example(model, px, py, False)}
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
