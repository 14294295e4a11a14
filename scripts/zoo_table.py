"""Generate docs/models.md: the supported-model table, from the conformance zoo (tests/zoo.py).

For every zoo model: exactness at the zoo's tiny size (every layer's per-example squared norm against a float64
per-example loop), the layers and rules used, and the step time relative to a plain forward+backward at a realistic
small size (median of interleaved repetitions, writer flushed outside the timed region): exact statistics, k = 256
sketches, and the exact statistics without the reconciliation guard (its cost).

    python scripts/zoo_table.py                       # all models, writes docs/models.md
    python scripts/zoo_table.py --models hf-gpt2 timm-vit --reps 5 --out -
    python scripts/zoo_table.py --reps 0              # exactness, rules and coverage only (no timing)
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo
from gradcoh.logger import GradientLogger, validate
from gradcoh.logger import results as results_module
from gradcoh.logger import tracker as tracker_module
from gradcoh.logger.attributes import layer_table
from gradcoh.logger.layers import default_rules
from gradcoh.logger.plan import plan_layers
from gradcoh.logger.tracker import LayerTracker
from oracle import log_same_forward

log = logging.getLogger("zoo_table")

# Realistic small sizes for timing (the tests use the tiny ones in tests/zoo.py).
TEXT = dict(T=64, n=8)
BENCH_HF = {
    "hf-gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8000, n_positions=128,
                                                      bos_token_id=0, eos_token_id=0)),
    "hf-bert": ("BertConfig", "BertForSequenceClassification",
                dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     vocab_size=8000, num_labels=3)),
    "hf-bert-mlm": ("BertConfig", "BertForMaskedLM", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                         intermediate_size=1024, vocab_size=8000)),
    "hf-distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                      dict(dim=256, n_layers=4, n_heads=4, hidden_dim=1024, vocab_size=8000, num_labels=3)),
    "hf-roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                   dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                        vocab_size=8000, num_labels=3, pad_token_id=1, max_position_embeddings=130)),
    "hf-t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4,
                                                            vocab_size=8000, decoder_start_token_id=0)),
    "hf-llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                         num_key_value_heads=2, intermediate_size=688, vocab_size=8000,
                                                         bos_token_id=0, eos_token_id=0)),
    "hf-vit": ("ViTConfig", "ViTForImageClassification",
               dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, image_size=64,
                    patch_size=8, num_labels=10)),
}
BENCH_TIMM = {
    "timm-vit": ("vit_tiny_patch16_224", dict(img_size=64, patch_size=8, depth=4)),
    "timm-deit": ("deit_tiny_distilled_patch16_224", dict(img_size=64, patch_size=8, depth=4)),
    "timm-convnext": ("convnext_atto", {}),
    "timm-swin": ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, embed_dim=48, depths=(2, 2),
                                                       num_heads=(2, 4))),
    "timm-resnet": ("resnet18", {}),
    "timm-efficientnet": ("efficientnet_b0", {}),
}


TV_BENCH = ("tv-vit", "tv-swin", "tv-convnext", "tv-resnet", "tv-mobilenet", "tv-efficientnet")


def _tv_bench(name: str) -> torch.nn.Module:
    import torchvision
    from torchvision.models import VisionTransformer
    from torchvision.models.swin_transformer import SwinTransformer

    if name == "tv-vit":
        return VisionTransformer(image_size=64, patch_size=8, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768,
                                 num_classes=10)
    if name == "tv-swin":
        return SwinTransformer(patch_size=[4, 4], embed_dim=48, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                               num_classes=10)
    if name == "tv-convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        return ConvNeXt([CNBlockConfig(40, 80, 2), CNBlockConfig(80, 160, 2), CNBlockConfig(160, None, 2)],
                        num_classes=10)
    return {"tv-resnet": lambda: torchvision.models.resnet18(num_classes=10),
            "tv-mobilenet": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
            "tv-efficientnet": lambda: torchvision.models.efficientnet_b0(num_classes=10)}[name]()


def bench_case(name: str) -> tuple[torch.nn.Module, dict, str]:
    """The model at its timing size, a batch, and a description of the size."""
    case = zoo.CASES[name]
    if name in BENCH_HF:
        config, model, kw = BENCH_HF[name]
        m = zoo._hf(config, model, **kw)()
        if name == "hf-vit":
            return m, zoo._images(16, 64), "d 192, 4 layers, 64 px, patch 8, batch 16"
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 8000, (TEXT["n"], TEXT["T"]), generator=g)
        target = torch.randint(0, 3, (TEXT["n"],), generator=g) if case.loss is zoo.hf_classifier else ids
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target": target}
        return m, batch, f"d 256, 4 layers, T {TEXT['T']}, batch {TEXT['n']}"
    if name in BENCH_TIMM:
        import timm

        arch, kw = BENCH_TIMM[name]
        m = timm.create_model(arch, pretrained=False, num_classes=10, **kw)
        size = 64
        return m, zoo._images(16, size), f"{arch}, {size} px, batch 16"
    if name in TV_BENCH:
        return _tv_bench(name), zoo._images(16, 64), f"{name.removeprefix('tv-')}, 64 px, batch 16"
    return case.build(), case.batch(16), "zoo size, batch 16"  # the newer families: their tiny zoo configs


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_times(name: str, reps: int) -> dict[str, float]:
    """Median step time of each method, interleaved."""
    case = zoo.CASES[name]
    model, batch, _ = bench_case(name)
    model.eval()
    times: dict[str, list[float]] = {"plain": [], "exact": [], "k256": [], "no guard": []}
    with tempfile.TemporaryDirectory() as tmp:
        loggers = {
            "exact": GradientLogger(model, f"{tmp}/e.zarr", handle_sigterm=False),
            "k256": GradientLogger(model, f"{tmp}/k.zarr", sketch_dim=256, handle_sigterm=False),
            "no guard": GradientLogger(model, f"{tmp}/n.zarr", handle_sigterm=False),
        }
        original = results_module.LayerResults.reconciled, tracker_module.bilinear

        def step(method: str, k: int) -> None:
            model.zero_grad(set_to_none=True)
            if method == "plain":
                case.loss(model, batch).mean().backward()
                return
            glog = loggers[method]
            if method == "no guard":  # neither the per-example probes nor the comparison
                results_module.LayerResults.reconciled = lambda self: torch.ones((), dtype=torch.bool)
                tracker_module.bilinear = lambda form, left, right: torch.zeros(form.n)
            try:
                with glog.record(k):
                    case.loss(model, batch).mean().backward()
            finally:
                results_module.LayerResults.reconciled, tracker_module.bilinear = original

        for k in range(reps + 1):
            for method in times:
                t = timed(lambda m=method, k=k: step(m, k))
                if method != "plain":
                    loggers[method].flush()  # the writer's work outside the timed region
                if k:  # the first round warms up
                    times[method].append(t)
        for glog in loggers.values():
            glog.close()
    return {m: statistics.median(v) for m, v in times.items()}


def exactness(name: str) -> tuple[float, list[dict]]:
    """Largest relative error over layers and examples at the tiny size, and the layer table."""
    case = zoo.CASES[name]
    torch.manual_seed(0)
    model = case.build()
    batch = case.batch(3)
    if "pixels" in batch:
        inputs = {"pixel_values": batch["pixels"]} if case.family == "transformers" else batch["pixels"]
    elif case.loss in (zoo.hf_classifier, zoo.hf_causal_lm, zoo.hf_masked_lm, zoo.hf_seq2seq):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if case.loss is zoo.hf_seq2seq:
            inputs["labels"] = batch["target"]
    else:  # keyword inputs as the zoo loss passes them
        inputs = {k: v for k, v in batch.items() if k != "target"}

    def loss_fn(out, b):  # the zoo losses take the model; replay them on precomputed outputs
        return case.loss(_Replay(out), b)

    report = validate(model, inputs, batch, loss_fn, examples=3)
    if report.error:
        raise RuntimeError(report.error)
    layers = layer_table([LayerTracker(plan) for plan in plan_layers(model, default_rules())])
    return max(r.max_rel_error for r in report.rows), layers


def train_exactness(name: str) -> float | None:
    """Largest relative error in train mode (dropout) against autograd through the same batch forward, or None."""
    case = zoo.CASES[name]
    if not case.train:
        return None
    torch.manual_seed(0)
    model = case.build().train()
    batch = case.batch(3)

    def losses(m: torch.nn.Module) -> torch.Tensor:
        dtype = next(m.parameters()).dtype
        return case.loss(m, {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()})

    with tempfile.TemporaryDirectory() as tmp:
        ds, grads = log_same_forward(model, losses, f"{tmp}/s.zarr")
    worst = 0.0
    for i, layer in enumerate(ds.attrs["gradcoh_layers"]):
        g = torch.cat([grads[p].reshape(3, -1) for p in layer["params"]], 1)
        want = (g**2).sum(1).numpy()
        got = ds.sq_norm.values[0, :3, i]
        worst = max(worst, float(np.max(np.abs(got - want) / np.maximum(want, 1e-30))))
    return worst if bool(ds.reconciled.values.all()) else float("inf")


class _Replay(torch.nn.Module):
    """Stands in for the model inside a zoo loss: returns precomputed outputs."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, *args, **kwargs):
        return self.out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(zoo.CASES))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per method (0: no timing)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/models.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for name in args.models:
        try:
            err, layers = exactness(name)
            train_err = train_exactness(name)
        except (RuntimeError, ValueError, AssertionError) as failure:
            row = f"| {name} | – | – | refused: {str(failure).splitlines()[0][:300]} | – | – |" + \
                (" – | – | – | – |" if args.reps else "")
            log.info(row)
            rows.append(row)
            continue
        rules = Counter(r for layer in layers for r in layer["rule"].split("+"))
        tied = [layer["name"] for layer in layers if len(layer["modules"]) > 1]
        if args.reps:
            t = step_times(name, args.reps)
            _, _, size = bench_case(name)
            timing = (f"{size} | {t['exact'] / t['plain']:.2f}× | {t['k256'] / t['plain']:.2f}× | "
                      f"{(t['exact'] - t['no guard']) / t['plain'] * 100:+.0f}% |")
        else:
            timing = ""
        row = (f"| {name} | {len(layers)} | {', '.join(f'{k} ×{v}' for k, v in sorted(rules.items()))} | "
               f"{'yes' if err <= 1e-4 else 'NO'} ({err:.0e}) | "
               f"{'–' if train_err is None else ('yes' if train_err <= 1e-3 else 'NO') + f' ({train_err:.0e})'} | "
               f"{', '.join(tied) or '–'} |{' ' + timing if timing else ''}")
        log.info(row)
        rows.append(row)
    text = _page(rows, args)
    if args.out == "-":
        print(text)
    else:
        Path(args.out).write_text(text)
        log.info("wrote %s", args.out)


def _timing_legend(args: argparse.Namespace) -> str:
    if not args.reps:
        return ("- Not timed in this generation (`--reps 0`: the shared machine was saturated): the step times of the\n"
                "  zoo are in docs/benchmarks.md (`scripts/bench_overhead.py --zoo`), recurrent layers in its\n"
                '  "recurrent layers" section.')
    return f"""- **exact / k = 256**: step time with the logger relative to a plain forward+backward at the stated size
  (median of {args.reps} interleaved repetitions, {args.threads} thread(s), writer flushed outside the timed region);
  **guard**: the part of the exact step due to the reconciliation guard, in % of a plain step."""


def _timing_header(args: argparse.Namespace) -> str:
    if not args.reps:
        return "\n|---|---|---|---|---|---|"
    return " timing size | exact | k = 256 | guard |\n|---|---|---|---|---|---|---|---|---|---|"


def _page(rows: list[str], args: argparse.Namespace) -> str:
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers", "timm", "torchvision")}
    return f"""# Supported models

Generated by `python scripts/zoo_table.py --reps {args.reps} --threads {args.threads}` from the conformance zoo
(tests/zoo.py; random-init configurations built from the packages' config classes, no downloads), on a 2-core
CPU ({', '.join(f'{k} {v}' for k, v in versions.items())}).

- **exact**: every layer's per-example squared norm at the zoo's tiny size against an independent float64
  per-example loop (`gradcoh.logger.validate`); the largest relative error over layers and examples in brackets.
  tests/logger/test_zoo.py checks the same (plus `sum_sq_norm`, m-coherence, coverage of every trainable
  parameter, `.grad` unchanged and sketch linearity) in CI.
- **train mode**: for models trained with dropout (PyTorch's `nn.Transformer` defaults, BART, Whisper, ...), every
  layer in train mode against autograd's per-example gradients through the same batch forward (a float64 copy run
  from the same seed: the same dropout masks); largest relative error in brackets (tests/logger/test_zoo.py).
- **rules**: how the layers' per-example gradients are computed: a module rule (`linear_rule`, ...), or `uses`
  for parameters observed op by op (container-owned parameters such as `cls_token`, `pos_embed`, layer-scale
  `gamma`, relative position bias tables; custom layers such as `LayerNorm2d`, `LlamaRMSNorm`).
- **tied**: layers made of several modules sharing a parameter (input embedding = output projection).
{_timing_legend(args)}

| model | layers | rules | exact | train mode | tied |{_timing_header(args)}
""" + "\n".join(rows) + """

## Refused, with the reason

What is refused has no per-example gradient gradcoh could compute exactly from one batch forward and backward:

- Dropout *between the layers* of a multi-layer `nn.LSTM`/`nn.GRU`/`nn.RNN` in train mode: the fused kernel draws
  that mask internally and keeps it, so no replay can reproduce it; the error says to use `dropout=0` (or
  `nn.Dropout` between single-layer modules) or to exclude the module. Everything else about recurrent layers
  (`batch_first` either way, layers, bidirectional, `proj_size`, packed sequences) is exact.
- Ops that move the batch axis in a way gradcoh cannot follow (for example a `transpose(0, 1)` followed by a
  `reshape` that merges the batch into another axis) before a tracked layer: an error names the module and the op.
- A use of a parameter whose result cannot be split by example (a weight penalty added to the loss inside the
  backward): the reconciliation guard raises (or flags the layer with `on_mismatch="flag"`).
"""


if __name__ == "__main__":
    main()
