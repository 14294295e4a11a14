"""Per-example convolution weight gradients of the CNN zoo: the kernels alone, their ATen op counts, and MACs.

For every ``nn.Conv2d`` call of a zoo model's forward (bench_overhead.py sizes), the rule's route choice
(:func:`gradcoh.logger.grads.materialise_is_cheaper`; grouped convolutions always materialise), and for the calls
that materialise, :func:`gradcoh.logger.ops.conv.per_example_weight_grad` timed alone (median of 7, interleaved
with ``--before``'s when given: an older ``logger/ops/conv.py``), with the number of ATen ops each call dispatches.
Counts per model: per-example multiply-adds done by the chosen routes (materialised ``n·T·rows·cols``, factored
ghost norm ``n·T²·(rows + cols)``) against the minimum of the two per call, and the calls above that minimum; for the
factored calls, the Gram multiply-adds and im2col bytes of the formed patches against the map-Gram route where it is
chosen (:class:`gradcoh.logger.ops.conv.Patches`).

    git show 348fef5:logger/ops/conv.py > /tmp/conv_before.py
    python scripts/bench_conv_routes.py --models timm-convnext,timm-efficientnet,timm-resnet \\
        --before /tmp/conv_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import default_batch, make_zoo_case
from gradcoh.logger import costs
from gradcoh.logger import ghost as ghost_norms
from gradcoh.logger.grads import materialise_is_cheaper
from gradcoh.logger.ops import conv as conv_ops

_CHOSEN: dict = {}


def _fastest(key, device, candidates):
    """The older conv.py's route choice (``costs.fastest``, since removed): each candidate timed once per key."""
    if key not in _CHOSEN:
        times = []
        for candidate in candidates:
            start = time.perf_counter()
            candidate()
            times.append(time.perf_counter() - start)
        _CHOSEN[key] = min(range(len(times)), key=times.__getitem__)
    return candidates[_CHOSEN[key]]()


def _before(path: Path):
    """The older module, loaded inside the package (its relative imports resolve)."""
    if not hasattr(costs, "fastest"):
        costs.fastest = _fastest  # what the older module imports
    spec = importlib.util.spec_from_file_location("gradcoh.logger.ops._conv_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _aten_ops(fn: Callable) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def _medians(fns: list[Callable], reps: int = 7) -> list[float]:
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(reps):
        order = list(range(len(fns)))
        for i in order[r % len(fns):] + order[: r % len(fns)]:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _gram_counts(m: nn.Conv2d, x: torch.Tensor, out_shape: tuple) -> tuple[float, int, float, int, bool]:
    """A factored call's (Gram multiply-adds, im2col bytes) from formed patches, then now, and whether the map's
    Gram is the route now."""
    xp, pad = conv_ops._explicit_padding(m, x)
    p = conv_ops.Patches(xp, tuple(m.kernel_size), tuple(m.dilation), tuple(pad), tuple(m.stride),
                         tuple(out_shape[2:]))
    n, rows, t = x.shape[0], m.out_channels, out_shape[2] * out_shape[3]
    view = all(k == 1 for k in m.kernel_size) and not any(pad)  # the input itself: no copy
    macs = n * ghost_norms.ghost_macs(t, rows, p.cols + (m.bias is not None))
    size = 0 if view else n * t * p.cols * x.element_size()
    if not p.map_route(rows):
        return macs, size, macs, size, False
    s_in = xp.shape[2] * xp.shape[3]
    return macs, size, n * (s_in * s_in * xp.shape[1] + t * t * rows), 0, True


def _print_gram(factored: list[tuple[float, int, float, int, bool]]) -> None:
    total = [sum(c[i] for c in factored) for i in range(5)]
    print(f"factored calls' Gram multiply-adds: {total[0] / 1e6:.0f} M from formed patches, {total[2] / 1e6:.0f} M "
          f"now ({total[4]} calls by the map's Gram); im2col {total[1] / 1e6:.1f} MB -> {total[3] / 1e6:.1f} MB "
          "per step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="timm-convnext,timm-efficientnet,timm-resnet")
    ap.add_argument("--before", type=Path, default=None, help="an older logger/ops/conv.py to time against")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before = _before(args.before) if args.before else None
    for name in args.models.split(","):
        case = make_zoo_case(name, default_batch(name), 0, "cpu")
        model = case["models"]["default"]
        calls = []
        hooks = [m.register_forward_hook(lambda m, i, o, calls=calls: calls.append((m, i[0].detach(), o.shape)))
                 for m in model.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            case["loss"](model, case["batch"])
        for h in hooks:
            h.remove()
        done = minimum = 0
        above, ms, ops = [], {"before": 0.0, "now": 0.0}, {"before": 0, "now": 0}
        materialised, factored = 0, []
        for m, x, out_shape in calls:
            n, rows, t, cols = x.shape[0], m.out_channels, out_shape[2] * out_shape[3], m.weight[0].numel()
            ghost, mat = n * t * t * (rows + cols), n * t * rows * cols
            chosen = m.groups > 1 or materialise_is_cheaper(n, t, rows, cols + (m.bias is not None), 4)
            done += mat if chosen else ghost
            minimum += min(ghost, mat)
            if (mat if chosen else ghost) > min(ghost, mat):
                above.append(f"{tuple(x.shape)} k{m.kernel_size[0]} g{m.groups}: {min(ghost, mat) / 1e6:.1f} M "
                             f"-> {(mat if chosen else ghost) / 1e6:.1f} M")
            if not chosen:
                factored.append(_gram_counts(m, x, out_shape))
                continue
            materialised += 1
            delta = torch.randn(out_shape)
            routes = {"now": lambda m=m, x=x, d=delta: conv_ops.per_example_weight_grad(m, x, d, m.padding)}
            if before is not None:
                routes["before"] = lambda m=m, x=x, d=delta: before.per_example_weight_grad(m, x, d, m.padding)
            for key, sec in zip(routes, _medians(list(routes.values())), strict=True):
                ms[key] += sec * 1e3
                ops[key] += _aten_ops(routes[key])
        print(f"## {name}: {len(calls)} conv calls, {materialised} materialised")
        if before is not None:
            print(f"weight-gradient kernels: before {ms['before']:.1f} ms ({ops['before']} ATen ops), "
                  f"now {ms['now']:.1f} ms ({ops['now']} ATen ops)")
        else:
            print(f"weight-gradient kernels: {ms['now']:.1f} ms ({ops['now']} ATen ops)")
        print(f"per-example multiply-adds: {done / 1e6:.0f} M done, {minimum / 1e6:.0f} M the minimum of the two "
              f"routes per call; above it ({len(above)} calls, grouped convolutions have no factored route):")
        for line in above:
            print("   ", line)
        _print_gram(factored)


if __name__ == "__main__":
    main()
