"""Step-time and memory overhead of gradcoh's logger against plain training and peer per-example-gradient tools.

One process, one model, batch and data per model for every method; repetitions are interleaved across methods after
a warm-up; we report the median step time, its ratio to the plain forward+backward, and the peak memory added by one
step, measured in a separate pass after all timings (CPU: RSS sampled by a thread; before that pass glibc's mmap
threshold is pinned with ``mallopt`` and the heap trimmed before each call, so freed tensors leave RSS; CUDA: the
caching allocator's peak). Timings run with the default allocator settings. The gradcoh step includes the whole
``record`` block (hooks, the packing, the one device→host copy and the queue put); the Zarr writing itself runs on
the logger's background thread.

The real-models zoo (``--zoo`` or ``--models gpt2,llama,...``; Hugging Face and timm models built from their config
classes with random weights, no downloads; transformers/timm are imported only when selected) runs every method on
the same model in train mode with every dropout 0 (BatchNorm layers in eval mode) and the per-example losses of
tests/zoo.py (causal LMs: each example's mean token cross-entropy), trained on their mean. Each method's per-example
squared norms are compared with gradcoh_exact's ("Δ vs gradcoh_exact"); peers that fail are recorded as
``failed: <reason>`` and peers that leave parameters out say how many they cover.

    python scripts/bench_overhead.py --models cnn --batch 64 --json out.json   # overhead table
    python scripts/bench_overhead.py --zoo --threads 1 --reps 5 --warmup 1     # the zoo, summary table at the end
    python scripts/bench_overhead.py --zoo --isolate --threads 1 --reps 7      # each zoo model in its own process
    python scripts/bench_overhead.py --writer                                    # writer throughput
    python scripts/bench_overhead.py --probe                                     # exact m-coherence, m=4096
    python scripts/bench_overhead.py --tiny                                      # smoke run (seconds)
    python scripts/bench_overhead.py --tiny --models gpt2                        # one tiny zoo model
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from gradcoh.logger import GradientLogger
from torch import nn

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the bench extra
    psutil = None

ALL_METHODS = ("plain", "gradcoh_exact", "gradcoh_fused", "gradcoh_k256", "gradcoh_k1024", "gradcoh_fused_k256",
               "gradcoh_fused_k1024", "gradcoh_align",
               "gradcoh_unlogged",
               "opacus_hooks", "opacus_ghost", "backpack_l2", "backpack_grad", "vmap", "naive_loop")
GRADCOH = {"gradcoh_exact": {}, "gradcoh_unfused": {"fused": False}, "gradcoh_k256": {"sketch_dim": 256},
           "gradcoh_unfused_k256": {"fused": False, "sketch_dim": 256},
           "gradcoh_unfused_k1024": {"fused": False, "sketch_dim": 1024},
           "gradcoh_k1024": {"sketch_dim": 1024}, "gradcoh_align": {"alignment": True},
           "gradcoh_unlogged": {"every": 10**9},
           # fused mode, opt-in (fused=True; where its cost model fuses a call):
           "gradcoh_fused": {"fused": True}, "gradcoh_fused_k256": {"fused": True, "sketch_dim": 256},
           "gradcoh_fused_k1024": {"fused": True, "sketch_dim": 1024}}
"""gradcoh's variants: exact statistics (the default, ``fused=False``: bitwise ``.grad``; ``unfused`` names the
default explicitly, as in the runs of 2026-12-03 when fused mode was briefly the default; ``fused``: fused mode where
its cost model fuses a call), with sketches, with each example's alignment with the batch gradient, and a step
that ``every`` skips (the other steps' cost when logging every N-th: nothing armed)."""
SLOW = {"opacus_hooks", "backpack_grad", "vmap", "naive_loop"}


# --- models ------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """3 conv + 2 linear, 32×32×3 input, 321,290 parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class SmallTransformer(nn.Module):
    """Linear input projection, ``nn.TransformerEncoder`` (batch_first, dropout 0), mean pool, linear head."""

    def __init__(self, d_in: int = 32, d: int = 128, layers: int = 2, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.inp(x)).mean(1))


def resnet18(norm: str) -> nn.Module:
    """torchvision resnet18 (10 classes) with BatchNorm ("bn") or GroupNorm(32) ("gn"), no in-place ReLU."""
    layer = (lambda c: nn.GroupNorm(min(32, c), c)) if norm == "gn" else nn.BatchNorm2d
    model = torchvision.models.resnet18(num_classes=10, norm_layer=layer)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


def xy_loss(model: Callable, b: dict) -> torch.Tensor:
    """Per-example cross-entropy of ``model(x)`` against ``y`` (the built-in models and the writer MLP)."""
    return F.cross_entropy(model(b["x"]), b["y"], reduction="none")


def xy_case(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, note: str = "") -> dict:
    """A case of a model called as ``model(x)`` with class labels ``y``."""
    return {"models": models, "batch": {"x": x, "y": y}, "loss": xy_loss, "labels": y, "note": note,
            "size": "", "separate_peer": models["peer"] is not models["default"]}


def make_case(name: str, batch: int, seq: int, device: str, seed: int = 0, tiny: bool = False) -> dict:
    """Model variants (the same weights where they share an architecture), one fixed batch and the per-example loss.

    A case is a dict: ``models`` (``default`` for plain and gradcoh, ``peer`` for the other methods), ``batch`` (a
    dict of tensors with the examples on dim 0), ``loss(model, batch) -> [n]`` per-example losses (every method
    trains on their mean), ``labels`` ([n] class labels or None), ``note``, ``size`` and ``separate_peer``.
    """
    if name in ZOO:
        return make_zoo_case(name, batch, seq, device, seed, tiny)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "cnn":
        base = SmallCNN()
        x = torch.randn(batch, 3, 32, 32, generator=g)
        models, note = {"default": base, "peer": base}, ""
    elif name == "resnet18":
        bn, gn = resnet18("bn"), resnet18("gn")
        bn.eval()  # gradcoh with running statistics: exact per example (train-mode BN couples the examples)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        models = {"default": bn, "peer": gn}
        note = ("plain and gradcoh use BatchNorm in eval mode (exact per-example values); Opacus, BackPACK, vmap and "
                "the naive loop use the GroupNorm(32) variant (the ratio is to a plain step of that variant)")
    elif name == "transformer":
        base = SmallTransformer()
        x = torch.randn(batch, seq or 64, 32, generator=g)
        models, note = {"default": base, "peer": base}, ""
    else:
        raise ValueError(f"unknown model {name!r}")
    y = torch.randint(0, 10, (batch,), generator=g)
    return xy_case({k: m.to(device) for k, m in models.items()}, x.to(device), y.to(device), note)


# --- the real-models zoo (Hugging Face and timm, random weights from config classes) --------------------------
# Same families and per-example losses as tests/zoo.py (what gradcoh's exactness tests use), at realistic small
# sizes; ``--tiny`` builds a much smaller configuration of each (2 layers, d 32, T 16, batch 4) for smoke tests.
ZOO = ("gpt2", "llama", "bert", "hf-vit", "timm-vit", "timm-deit", "timm-resnet", "timm-convnext",
       "timm-efficientnet")
ZOO_BATCH = {"gpt2": 8, "llama": 8, "bert": 8, "hf-vit": 16, "timm-vit": 16, "timm-deit": 16, "timm-resnet": 32,
             "timm-convnext": 32, "timm-efficientnet": 32}
LM_SEQ, TINY_SEQ, CLASSES = 128, 16, 10


def causal_lm_loss(model: Callable, b: dict) -> torch.Tensor:
    """Next-token prediction: each example's mean token cross-entropy over its unpadded positions."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    tok = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="none")
    mask = b["attention_mask"][:, 1:].to(tok.dtype)
    return (tok.view_as(mask) * mask).sum(1) / mask.sum(1)


def seq_cls_loss(model: Callable, b: dict) -> torch.Tensor:
    """Sequence classification: cross-entropy of the logits."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(logits, b["target"], reduction="none")


def hf_image_loss(model: Callable, b: dict) -> torch.Tensor:
    """Hugging Face image classification."""
    return F.cross_entropy(model(pixel_values=b["pixels"]).logits, b["target"], reduction="none")


def image_loss(model: Callable, b: dict) -> torch.Tensor:
    """timm image classification."""
    return F.cross_entropy(model(b["pixels"]), b["target"], reduction="none")


def _hf_text_spec(name: str, tiny: bool, seq: int) -> tuple[str, str, dict, str]:
    """(config class, model class, config kwargs, size) of a Hugging Face text model; every dropout 0."""
    d, layers, heads, vocab = (32, 2, 2, 128) if tiny else (256, 4, 4, 1024)
    common = f"d {d}, {layers} layers, {heads} heads, vocab {vocab}"
    positions = max(seq, LM_SEQ)
    if name == "gpt2":
        kw = dict(n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=positions, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return "GPT2Config", "GPT2LMHeadModel", kw, f"GPT2LMHeadModel {common}"
    if name == "llama":
        ff = 64 if tiny else 688
        kw = dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                  intermediate_size=ff, vocab_size=vocab, max_position_embeddings=positions, attention_dropout=0.0,
                  bos_token_id=0, eos_token_id=0)
        return ("LlamaConfig", "LlamaForCausalLM", kw,
                f"LlamaForCausalLM d {d}, {layers} layers, {heads} heads ({heads // 2} kv), vocab {vocab}, "
                f"intermediate {ff}")
    kw = dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * d,
              vocab_size=vocab, max_position_embeddings=max(positions, 512), num_labels=CLASSES,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    return ("BertConfig", "BertForSequenceClassification", kw,
            f"BertForSequenceClassification {common}, intermediate {4 * d}, {CLASSES} labels")


def _hf_vit_spec(tiny: bool) -> tuple[str, str, dict, str, int]:
    d, layers, heads, px = (32, 2, 2, 16) if tiny else (192, 4, 3, 64)
    kw = dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * d,
              image_size=px, patch_size=8, num_labels=CLASSES, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
    return ("ViTConfig", "ViTForImageClassification", kw,
            f"ViTForImageClassification d {d}, {layers} layers, {heads} heads, {px} px, patch 8", px)


def _timm_spec(name: str, tiny: bool) -> tuple[str, dict, int]:
    """(timm architecture, create_model kwargs, image size); drop rates 0."""
    vit = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2) if tiny else dict(
        img_size=64, patch_size=8, depth=4)
    px = 32 if tiny else 64
    arch, kw = {
        "timm-vit": ("vit_tiny_patch16_224", vit),
        "timm-deit": ("deit_tiny_distilled_patch16_224", vit),
        "timm-resnet": ("resnet10t" if tiny else "resnet18", {}),
        "timm-convnext": ("convnext_atto", dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1)) if tiny else {}),
        "timm-efficientnet": ("efficientnet_b0", {}),
    }[name]
    return arch, kw, vit["img_size"] if "vit" in name or "deit" in name else px


def build_zoo_model(name: str, tiny: bool, seq: int) -> tuple[nn.Module, str, str, int]:
    """(model, size description, kind: "lm", "cls", "hf-image" or "image", image size); imports lazily."""
    if name in ("gpt2", "llama", "bert", "hf-vit"):
        import transformers

        transformers.logging.set_verbosity_error()
        if name == "hf-vit":
            config, cls, kw, size, px = _hf_vit_spec(tiny)
            kind = "hf-image"
        else:
            (config, cls, kw, size), px = _hf_text_spec(name, tiny, seq), 0
            kind = "cls" if name == "bert" else "lm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = getattr(transformers, cls)(getattr(transformers, config)(**kw))
        return model, size, kind, px
    import timm

    arch, kw, px = _timm_spec(name, tiny)
    model = timm.create_model(arch, pretrained=False, num_classes=CLASSES, drop_rate=0.0, drop_path_rate=0.0, **kw)
    extra = ", ".join(f"{k}={v}" for k, v in kw.items())
    return model, f"timm {arch}{f' ({extra})' if extra else ''}, {px} px", "image", px


def _zoo_batch(kind: str, n: int, seq: int, vocab: int, px: int, g: torch.Generator) -> tuple[dict, Callable]:
    """Inputs (examples on dim 0, no padding) and the per-example loss of a zoo model."""
    target = torch.randint(0, CLASSES, (n,), generator=g)
    if kind in ("lm", "cls"):
        ids = torch.randint(0, vocab, (n, seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if kind == "lm":
            return batch, causal_lm_loss
        return batch | {"target": target}, seq_cls_loss
    batch = {"pixels": torch.randn(n, 3, px, px, generator=g), "target": target}
    return batch, hf_image_loss if kind == "hf-image" else image_loss


def make_zoo_case(name: str, batch: int, seq: int, device: str, seed: int = 0, tiny: bool = False) -> dict:
    """A zoo model in train mode (dropout 0; BatchNorm layers in eval mode), one batch and its per-example loss."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    seq = seq or (TINY_SEQ if tiny else LM_SEQ)
    model, size, kind, px = build_zoo_model(name, tiny, seq)
    model.train()
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bn:
        m.eval()  # running statistics: per-example gradients are exact (train-mode BN couples the examples)
    vocab = getattr(model.config, "vocab_size", 0) if hasattr(model, "config") else 0
    inputs, loss = _zoo_batch(kind, batch, seq, vocab, px, g)
    if kind in ("lm", "cls"):
        size += f", T {seq}"
    notes = ["train mode, every dropout 0; all methods on the same model"]
    if bn:
        notes.append(f"its {len(bn)} BatchNorm layers in eval mode (running statistics, exact per example)")
    if kind == "lm":
        notes.append("loss: each example's mean token cross-entropy, mean over the batch")
    return {"models": {"default": model.to(device), "peer": model.to(device)},
            "batch": {k: v.to(device) for k, v in inputs.items()}, "loss": loss,
            "labels": None if kind == "lm" else inputs["target"].to(device), "note": "; ".join(notes),
            "size": size, "separate_peer": False}


# --- methods -----------------------------------------------------------------------------------------------
# Every step is a forward+backward of the mean of the per-example losses, with gradients set to None first, and
# returns the per-example squared gradient norms it computed ([n], the gradient of each example's own loss term;
# None for the plain step), which build_steps compares with gradcoh's.
Step = Callable[[], "torch.Tensor | None"]


def _n(case: dict) -> int:
    return next(iter(case["batch"].values())).shape[0]


def plain_step(model: nn.Module, case: dict) -> Step:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        case["loss"](model, case["batch"]).mean().backward()

    return step


class GradcohMethod:
    """One GradientLogger on its own store; each call is one recorded step."""

    def __init__(self, model: nn.Module, case: dict, store: Path, options: dict, drop_writes: bool = False) -> None:
        self.model, self.case = model, case
        self.glog = GradientLogger(model, store, seed=0, loss_reduction="mean", mode="overwrite", **options)
        self.last = None
        real_put = self.glog._output._writer.put

        def put(stream: str, record: object) -> None:
            self.last = record  # keep a reference (no copy) to read the per-example norms back
            if not drop_writes:
                real_put(stream, record)

        self.glog._output._writer.put = put
        self.step_no = 0
        self.index = torch.arange(_n(case))

    def __call__(self) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        with self.glog.record(self.step_no, index=self.index, labels=self.case["labels"]):
            self.case["loss"](self.model, self.case["batch"]).mean().backward()
        self.step_no += 1
        return None if self.last is None else torch.from_numpy(self.last.sq_norm.sum(1))

    def close(self) -> None:
        self.glog.close()


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:200]


def _covered(params: list[nn.Parameter], value: Callable, n: int) -> tuple[list[nn.Parameter], str]:
    """The parameters whose per-example values (``value(p)``, None if missing) have the n examples on dim 0, and a
    note on those left out ("" when none is)."""
    got = [p for p in params if value(p) is not None]
    ok = [p for p in got if value(p).shape[0] == n]
    if len(ok) == len(params):
        return ok, ""
    total, cov = sum(p.numel() for p in params), sum(p.numel() for p in ok)
    parts = [f"covers {cov:,} of {total:,} parameters"]
    if len(got) < len(params):
        parts.append(f"{len(params) - len(got)} tensors without per-example values")
    if len(ok) < len(got):
        sizes = sorted({value(p).shape[0] for p in got if value(p).shape[0] != n})
        parts.append(f"{len(got) - len(ok)} with values for a batch of {'/'.join(map(str, sizes))} instead of {n} "
                     "(an input without the batch, e.g. position ids), left out")
    return ok, "; ".join(parts)


def _train_once(module: nn.Module, case: dict, ctx: Callable = contextlib.nullcontext) -> None:
    module.zero_grad(set_to_none=True)
    with ctx():
        case["loss"](module, case["batch"]).mean().backward()


def _opacus_module(model: nn.Module, ghost: bool) -> tuple[nn.Module, str]:
    """Opacus' wrapper; when strict mode refuses the model (buffers), the best-effort ``strict=False`` one."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    cls = GradSampleModuleFastGradientClipping if ghost else GradSampleModule
    kw = dict(max_grad_norm=1.0, use_ghost_clipping=True) if ghost else {}
    try:
        return cls(copy.deepcopy(model), loss_reduction="mean", **kw), ""
    except NotImplementedError as err:  # buffers (BatchNorm statistics, HF position ids, rotary frequencies)
        gsm = cls(copy.deepcopy(model), loss_reduction="mean", strict=False, **kw)
        return gsm, f"strict=True refused it ({_short(err)[:80]}), run with strict=False"


def opacus_step(model: nn.Module, case: dict, ghost: bool) -> Step:
    gsm, note = _opacus_module(model, ghost)
    params = [p for p in gsm.parameters() if p.requires_grad]
    if ghost:  # per-example norms (one backward; clipping would need a second one)
        def value(p: nn.Parameter) -> torch.Tensor | None:
            return getattr(p, "_norm_sample", None)

        def sq(v: torch.Tensor) -> torch.Tensor:
            return v.pow(2)
    else:
        def value(p: nn.Parameter) -> torch.Tensor | None:
            return getattr(p, "grad_sample", None)

        def sq(v: torch.Tensor) -> torch.Tensor:
            return v.flatten(1).pow(2).sum(1)

    _train_once(gsm, case)  # fail here (not mid-timing) on unsupported models
    covered, cov_note = _covered(params, value, _n(case))
    if not covered:
        raise RuntimeError(f"no parameter got per-example values ({cov_note})")

    def step() -> torch.Tensor:
        _train_once(gsm, case)
        return torch.stack([sq(value(p)) for p in covered]).sum(0)

    step.note = "; ".join(s for s in (note, cov_note) if s)
    return step


def _backpack_model(model: nn.Module, case: dict) -> nn.Module:
    from backpack import extend

    try:
        m = extend(copy.deepcopy(model))
        case["loss"](m, case["batch"])
        return m
    except Exception as err:  # residual connections etc. need the torch.fx converter
        first = _short(err)
    try:
        return extend(copy.deepcopy(model), use_converter=True)
    except Exception as err:
        raise RuntimeError(f"extend: {first[:90]} | use_converter=True: {_short(err)[:90]}") from err


def backpack_step(model: nn.Module, case: dict, grad: bool) -> Step:
    from backpack import backpack
    from backpack.extensions import BatchGrad, BatchL2Grad

    m = _backpack_model(model, case)
    ext = BatchGrad() if grad else BatchL2Grad()
    n = _n(case)
    scale = n**2  # BackPACK's values are of the 1/n-scaled terms of the mean loss
    params = [p for p in m.parameters() if p.requires_grad]

    # Parameters of modules BackPACK does not support (e.g. GroupNorm, LayerNorm) get no attribute: those are left
    # out (and counted in the note).
    def value(p: nn.Parameter) -> torch.Tensor | None:
        return getattr(p, "grad_batch" if grad else "batch_l2", None)

    def run() -> None:
        _train_once(m, case, lambda: backpack(ext))

    run()
    covered, note = _covered(params, value, n)
    if not covered:
        raise RuntimeError(f"no parameter got per-example values ({note})")

    def step() -> torch.Tensor:
        run()
        if grad:
            return scale * torch.stack([p.grad_batch.flatten(1).pow(2).sum(1) for p in covered]).sum(0)
        return scale * torch.stack([p.batch_l2 for p in covered]).sum(0)

    step.note = note
    return step


def vmap_step(model: nn.Module, case: dict) -> Step:
    """``vmap(grad(loss of one example))``. Hugging Face's mask code branches on the mask's values (``.all()``), which
    vmap cannot trace: when that fails and the attention mask is all ones, it is left out (the same computation)."""
    try:
        return _vmap_step(model, case, case["batch"])
    except RuntimeError as err:
        mask = case["batch"].get("attention_mask")
        if mask is None or not bool(mask.all()):
            raise
        print(f"vmap with the attention mask: {_short(err)}; retrying without it", file=sys.stderr, flush=True)
    step = _vmap_step(model, case, {k: v for k, v in case["batch"].items() if k != "attention_mask"})
    step.note = "attention_mask (all ones) left out: HF's mask code calls .all() on it, which vmap cannot trace"
    return step


def _vmap_step(model: nn.Module, case: dict, batch: dict) -> Step:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    masked = "attention_mask" in case["batch"] and "attention_mask" not in batch

    def loss(p: dict, example: dict) -> torch.Tensor:
        def call(*args: object, **kwargs: object) -> object:
            if masked:
                kwargs.pop("attention_mask")
            return functional_call(model, (p, buffers), args, kwargs)

        one = {k: v.unsqueeze(0) for k, v in example.items()}
        if masked:  # the loss still reads the (all-ones) mask
            one["attention_mask"] = torch.ones_like(one["input_ids"])
        return case["loss"](call, one).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))

    def step() -> torch.Tensor:
        g = per_sample(params, batch)
        return torch.stack([v.flatten(1).pow(2).sum(1) for v in g.values()]).sum(0)

    step()
    return step


def naive_step(model: nn.Module, case: dict) -> Step:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        sq = []
        for i in range(_n(case)):
            model.zero_grad(set_to_none=True)
            case["loss"](model, {k: v[i : i + 1] for k, v in case["batch"].items()}).sum().backward()
            sq.append(sum(p.grad.pow(2).sum() for p in params if p.grad is not None))
        return torch.stack(sq)

    return step


def build_method(name: str, case: dict, tmp: Path) -> tuple[Step, Callable[[], None] | None]:
    """(step, close) for one method; raises if the method does not support the model."""
    default, peer = case["models"]["default"], case["models"]["peer"]
    if name == "plain":
        return plain_step(default, case), None
    if name == "plain_peer":
        return plain_step(peer, case), None
    if name.startswith("gradcoh"):
        method = GradcohMethod(default, case, tmp / f"{name}.zarr", GRADCOH[name])
        return method, method.close
    if name.startswith("opacus"):
        return opacus_step(peer, case, ghost=name == "opacus_ghost"), None
    if name.startswith("backpack"):
        return backpack_step(peer, case, grad=name == "backpack_grad"), None
    if name == "vmap":
        return vmap_step(peer, case), None
    if name == "naive_loop":
        return naive_step(peer, case), None
    raise ValueError(f"unknown method {name!r}")


# --- measurement -------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call; on CUDA the device is synchronised before and after (queued kernels included)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class PeakRSS:
    """Samples the process RSS on a thread; ``peak - base`` is the memory one call added (CPU)."""

    def __enter__(self) -> PeakRSS:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def pin_malloc() -> None:
    """glibc: fixed mmap threshold (large blocks are unmapped on free, so RSS follows live memory)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def trim_malloc() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Extra memory at the peak of one call, relative to just before it (gradients set to None first)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if psutil is None:
        return None
    trim_malloc()
    with PeakRSS() as p:
        fn()
    return (p.peak - p.base) / 2**20


def default_batch(model_name: str) -> int:
    """Batch of a model when --batch is not given."""
    return ZOO_BATCH.get(model_name) or {"cnn": 64, "resnet18": 32, "transformer": 32}[model_name]


def bench_model(model_name: str, methods: list[str], args: argparse.Namespace, tmp: Path,
                memory: bool = True) -> dict:
    """Interleaved step times of every method on one model, then (``memory``) each method's peak extra memory.

    The memory pass pins glibc's mmap threshold for the rest of the process (see :func:`pin_malloc`), which makes
    every later step of the process page-fault on its large blocks (ConvNeXt's plain step 262 -> 354 ms). A run of
    several models in one process therefore times them all first and measures memory afterwards
    (:func:`add_memory`).
    """
    batch = args.batch or default_batch(model_name)
    case = make_case(model_name, batch, args.seq, args.device, tiny=args.tiny)
    names = list(methods)
    if case["separate_peer"] and any(m not in ("plain",) and not m.startswith("gradcoh") for m in names):
        names.insert(1, "plain_peer")
    steps, closers, results, checks = build_steps(model_name, names, case, args, tmp)
    times = time_steps(steps, args)
    mems = measure_memory(steps, args) if memory else {}
    for name in steps:
        ts = times[name]
        results[name] = {"status": "ok", "median_s": statistics.median(ts), "min_s": min(ts), "reps": len(ts),
                         "times_s": ts,
                         "peak_extra_mb": mems.get(name), "note": getattr(steps[name], "note", "")}
    for close in closers:
        close()
    add_ratios(names, results)
    add_checks(results, checks, case)
    results = {n: results[n] for n in names}  # table order = method order, failures included
    n_params = sum(p.numel() for p in case["models"]["default"].parameters())
    return {"model": model_name, "batch": batch, "params": n_params, "size": case["size"], "note": case["note"],
            "methods": results}


def measure_memory(steps: dict[str, Step], args: argparse.Namespace) -> dict[str, float | None]:
    """Peak extra memory (MiB) of one call of each method; pins the allocator for the rest of the process."""
    if args.device == "cpu" and sys.platform.startswith("linux"):
        pin_malloc()
    mems = {}
    for name, step in steps.items():  # one extra call per method, after timing
        step()  # settle allocations under the pinned allocator settings
        mems[name] = peak_memory_mb(step, args.device)
    return mems


def add_memory(res: dict, methods: list[str], args: argparse.Namespace, tmp: Path) -> None:
    """Fill a timed model's ``peak_extra_mb`` (and memory ratios) from a fresh build of its methods."""
    batch = args.batch or default_batch(res["model"])
    case = make_case(res["model"], batch, args.seq, args.device, tiny=args.tiny)
    names = [n for n, r in res["methods"].items() if r.get("status") == "ok"]
    steps, closers, _, _ = build_steps(res["model"], names, case, args, tmp)
    mems = measure_memory(steps, args)
    for close in closers:
        close()
    for name, mb in mems.items():
        res["methods"][name]["peak_extra_mb"] = mb
    add_ratios(list(res["methods"]), res["methods"])


def build_steps(model_name: str, names: list[str], case: dict, args: argparse.Namespace,
                tmp: Path) -> tuple[dict[str, Step], list, dict[str, dict], dict[str, torch.Tensor]]:
    """Each method's step (warmed up), their closers, the failures (a peer not supporting a model), and the
    per-example squared norms each method computed on its last warm-up call."""
    steps: dict[str, Step] = {}
    closers = []
    results: dict[str, dict] = {}
    checks: dict[str, torch.Tensor] = {}
    for name in names:
        try:
            step, close = build_method(name, case, tmp)
            if close:
                closers.append(close)
            for _ in range(max(args.warmup, 1)):
                sq = step()
            steps[name] = step
            if sq is not None:
                checks[name] = sq.detach().double().cpu()
        except Exception as err:  # record and go on: a peer not supporting a model is a result
            reason = _short(err)
            results[name] = {"status": f"failed: {reason}"}
            print(f"[{model_name}] {name}: failed: {reason}", file=sys.stderr, flush=True)
    return steps, closers, results, checks


def add_checks(results: dict[str, dict], checks: dict[str, torch.Tensor], case: dict) -> None:
    """Largest difference of each method's per-example squared norms from gradcoh_exact's, relative to the largest
    norm (methods on the same model only): a peer that covers part of the model, or gets it wrong, shows here."""
    ref = checks.get("gradcoh_exact")
    if ref is None:
        return
    scale = float(ref.abs().max()) or 1.0
    for name, sq in checks.items():
        if name in results and (name.startswith("gradcoh") or not case["separate_peer"]):
            results[name]["rel_diff_vs_gradcoh"] = float((sq - ref).abs().max()) / scale


def time_steps(steps: dict[str, Step], args: argparse.Namespace) -> dict[str, list[float]]:
    """Interleaved repetitions of every method's step."""
    times: dict[str, list[float]] = {n: [] for n in steps}
    budget = args.slow_reps if args.slow_reps else args.reps
    for rep in range(args.reps):
        for name, step in steps.items():
            if name in SLOW and rep >= budget:
                continue
            times[name].append(timed(step, args.device))
            if isinstance(step, GradcohMethod):
                # Let the background writer finish outside the timed region, so that its compression does not
                # land in the next method's step (the writer's own cost is measured by --writer).
                step.glog.flush()
    return times


def add_ratios(names: list[str], results: dict[str, dict]) -> None:
    """Time and memory ratios against the plain step (peers against their own plain model where needed)."""
    ref = {n: results.get("plain_peer" if n in PEER_METHODS and "plain_peer" in results else "plain") for n in names}
    for name in names:
        r, base = results[name], ref[name]
        if r["status"] == "ok" and base and base.get("status") == "ok":
            r["ratio"] = r["median_s"] / base["median_s"]
            r["min_ratio"] = r["min_s"] / base["min_s"]  # robust to preemption on a shared machine
            if len(r.get("times_s", ())) == len(base.get("times_s", ())) > 0:  # each rep against its own plain step
                # (the same round of the interleaving): robust to the machine's speed drifting between rounds
                r["paired_ratio"] = statistics.median(t / b for t, b in zip(r["times_s"], base["times_s"], strict=True))
            if r["peak_extra_mb"] is not None and base["peak_extra_mb"]:
                r["mem_ratio"] = r["peak_extra_mb"] / base["peak_extra_mb"]


PEER_METHODS = {"opacus_hooks", "opacus_ghost", "backpack_l2", "backpack_grad", "vmap", "naive_loop", "plain_peer"}


# --- writer throughput ------------------------------------------------------------------------------------
def bench_writer(args: argparse.Namespace, tmp: Path) -> dict:
    """Batch 256 × 20 Linear layers × k=256 float16 sketches every step: real writer vs dropping the records."""
    torch.manual_seed(0)
    width, depth = args.writer_width, 20
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).to(args.device)
    x = torch.randn(args.writer_batch, width, device=args.device)
    y = torch.randint(0, 10, (args.writer_batch,), device=args.device)
    case = xy_case({"default": model, "peer": model}, x, y)
    methods = {
        "plain": plain_step(model, case),
        "gradcoh_k256_write": GradcohMethod(model, case, tmp / "writer_on.zarr", {"sketch_dim": 256}),
        "gradcoh_k256_drop": GradcohMethod(model, case, tmp / "writer_drop.zarr", {"sketch_dim": 256},
                                           drop_writes=True),
    }
    captured = {}
    on = methods["gradcoh_k256_write"]
    real_put = on.glog._output._writer.put

    def put(stream: str, record: object) -> None:
        captured.setdefault("record", record)
        real_put(stream, record)

    on.glog._output._writer.put = put
    for fn in methods.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(args.writer_steps):
        for name, fn in methods.items():
            times[name].append(timed(fn, args.device))
    t0 = time.perf_counter()
    on.glog.flush()
    drain_s = time.perf_counter() - t0
    for m in methods.values():
        if isinstance(m, GradcohMethod):
            m.close()
    rec = captured["record"]
    rec_bytes = sum(v.nbytes for v in vars(rec).values() if hasattr(v, "nbytes"))
    qsize = on.glog.config.queue_size
    med = {n: statistics.median(t) for n, t in times.items()}
    total_write_s = sum(times["gradcoh_k256_write"]) + drain_s
    return {
        "batch": args.writer_batch, "layers": depth, "width": width, "sketch_dim": 256, "steps": args.writer_steps,
        "median_s": med,
        "added_pct_vs_drop": 100 * (med["gradcoh_k256_write"] / med["gradcoh_k256_drop"] - 1),
        "ratio_write_to_plain": med["gradcoh_k256_write"] / med["plain"],
        "ratio_drop_to_plain": med["gradcoh_k256_drop"] / med["plain"],
        "final_flush_s": drain_s,
        "record_mb": rec_bytes / 2**20, "sketch_mb": rec.sketch.nbytes / 2**20, "queue_size": qsize,
        "queue_max_mb": qsize * rec_bytes / 2**20,
        "writer_mb_per_s": args.writer_steps * rec_bytes / 2**20 / total_write_s,
    }


# --- probe: exact m-coherence on m examples -----------------------------------------------------------------
def bench_probe(args: argparse.Namespace, tmp: Path) -> dict:
    from torch.func import functional_call, grad, vmap

    m, chunk = args.probe_m, 256
    torch.manual_seed(0)
    model = SmallCNN().to(args.device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, 3, 32, 32, generator=g).to(args.device)
    y = torch.randint(0, 10, (m,), generator=g).to(args.device)

    # gradcoh
    t0 = time.perf_counter()
    glog = GradientLogger(model, tmp / "probe.zarr", every=1, sketch_dim=0, loss_reduction="sum", mode="overwrite")
    captured = {}
    real_put = glog._output._writer.put

    def put(stream: str, record: object) -> None:
        captured[stream] = record
        real_put(stream, record)

    glog._output._writer.put = put
    if hasattr(glog, "probe"):
        api = "glog.probe"
        glog.probe(0, x, y, lambda out, t: F.cross_entropy(out, t, reduction="none"), batch_size=chunk, mode="eval")
    else:
        api = "emulated: glog.record(step, stream='probe') over micro-batches of 256, sum-reduced loss"
        with glog.record(0, index=torch.arange(m), labels=y, stream="probe"):
            for i in range(0, m, chunk):
                F.cross_entropy(model(x[i : i + chunk]), y[i : i + chunk], reduction="sum").backward()
    glog.close()
    t_gradcoh = time.perf_counter() - t0
    rec = captured.get("probe") or next(iter(captured.values()))
    coh_gradcoh = float(rec.sum_sq_norm.sum() / rec.sq_norm.sum())
    model.zero_grad(set_to_none=True)

    # vmap streaming reference
    t0 = time.perf_counter()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    S = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in params.items()}
    Q = torch.zeros((), dtype=torch.float64, device=args.device)
    for i in range(0, m, chunk):
        gs = per_sample(params, x[i : i + chunk], y[i : i + chunk])
        for k, gk in gs.items():
            gk = gk.to(torch.float64)
            S[k] += gk.sum(0)
            Q += gk.pow(2).sum()
    coh_ref = float(sum(s.pow(2).sum() for s in S.values()) / Q)
    _sync(args.device)
    t_ref = time.perf_counter() - t0
    return {"m": m, "chunk": chunk, "api": api, "gradcoh_s": t_gradcoh, "vmap_s": t_ref,
            "speedup": t_ref / t_gradcoh, "m_coherence_gradcoh": coh_gradcoh, "m_coherence_vmap": coh_ref,
            "rel_diff": abs(coh_gradcoh - coh_ref) / abs(coh_ref)}


# --- output ------------------------------------------------------------------------------------------------
def markdown(report: dict, summary: bool = True) -> str:
    lines = []
    for res in report.get("overhead", []):
        lines += overhead_table(res)
    if summary and len(report.get("overhead", [])) > 1:
        lines += summary_table(report["overhead"])
    if "writer" in report:
        lines += writer_lines(report["writer"])
    if "probe" in report:
        p = report["probe"]
        lines += ["### Probe: exact m-coherence", "",
                  f"m = {p['m']} examples of the small CNN, chunks of {p['chunk']}; gradcoh via {p['api']}.", "",
                  "| Method | Wall (s) | m-coherence |", "|---|---:|---:|",
                  f"| gradcoh | {p['gradcoh_s']:.2f} | {p['m_coherence_gradcoh']:.6f} |",
                  f"| vmap streaming (float64 S, Q) | {p['vmap_s']:.2f} | {p['m_coherence_vmap']:.6f} |", "",
                  f"gradcoh is {p['speedup']:.2f}× faster; relative difference {p['rel_diff']:.1e}.", ""]
    return "\n".join(lines)


def overhead_table(res: dict) -> list[str]:
    """One model's table: a row per method (failures with their reason)."""
    size = f", {res['size']}" if res.get("size") else ""
    lines = [f"### {res['model']} (batch {res['batch']}, {res['params']:,} params{size})", ""]
    if res["note"]:
        lines += [f"Note: {res['note']}.", ""]
    lines += ["| Method | Median step (ms) | × plain | × plain (fastest) | × plain (paired) | Peak extra memory (MB) "
              "| Memory × plain | Reps | Δ vs gradcoh_exact |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["methods"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status'][:110]} | | | | | | | |")
            continue
        mem = "n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
        diff = f"{r['rel_diff_vs_gradcoh']:.1e}" if "rel_diff_vs_gradcoh" in r else ""
        lines.append(f"| {name} | {1e3 * r['median_s']:.1f} | {r.get('ratio', float('nan')):.2f} | "
                     f"{r.get('min_ratio', float('nan')):.2f} | {r.get('paired_ratio', float('nan')):.2f} | {mem} | "
                     f"{r.get('mem_ratio', float('nan')):.2f} | {r['reps']} | {diff} |"
                     + (f" {r['note']} |" if r.get("note") else ""))
    return [*lines, ""]


def _cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if r["status"] != "ok":
        return "failed"
    mem = f"{r['mem_ratio']:.2f}×" if "mem_ratio" in r else "n/a"
    flags = ("*" if "covers" in r.get("note", "") else "") + ("†" if r.get("rel_diff_vs_gradcoh", 0) > 1e-3 else "")
    return f"{r.get('ratio', float('nan')):.2f}× / {mem}{flags}"


def summary_table(results: list[dict]) -> list[str]:
    """Rows = models, columns = methods, cells "time× / mem×" against the plain step; failures listed below."""
    methods = list(dict.fromkeys(m for res in results for m in res["methods"] if m not in ("plain", "plain_peer")))
    lines = ["### Summary: step time × plain / peak extra memory × plain", "",
             "| model | batch | plain (ms) | " + " | ".join(methods) + " |",
             "|---|---:|---:|" + "---:|" * len(methods)]
    failures = []
    for res in results:
        plain = res["methods"].get("plain", {})
        ms = f"{1e3 * plain['median_s']:.1f}" if plain.get("status") == "ok" else "–"
        lines.append(f"| {res['model']} | {res['batch']} | {ms} | "
                     + " | ".join(_cell(res["methods"].get(m)) for m in methods) + " |")
        failures += [f"- {res['model']} / {m}: {r['status']}" for m, r in res["methods"].items() if r["status"] != "ok"]
    lines += ["", "\\* covers part of the parameters (see the model's table); † per-example squared norms differ "
              "from gradcoh_exact's by more than 1e-3 of the largest (same model; on CUDA, TF32 convolutions alone "
              "can do that)."]
    return [*lines, "", *(["Failures:", "", *failures, ""] if failures else [])]


def writer_lines(w: dict) -> list[str]:
    lines = ["### Writer throughput", "",
             f"Batch {w['batch']} × {w['layers']} Linear({w['width']}) layers × k={w['sketch_dim']} float16 "
             f"sketches every step, {w['steps']} steps.", "",
             "| Variant | Median step (ms) |", "|---|---:|"]
    lines += [f"| {n} | {1e3 * t:.1f} |" for n, t in w["median_s"].items()]
    return [*lines, "", f"- added by the writer vs dropping the records: {w['added_pct_vs_drop']:+.1f}%",
            f"- k=256 with writer / plain: {w['ratio_write_to_plain']:.2f}×; dropping / plain: "
            f"{w['ratio_drop_to_plain']:.2f}×",
            f"- record {w['record_mb']:.2f} MB/step (sketches {w['sketch_mb']:.2f} MB); queue_size "
            f"{w['queue_size']} → at most {w['queue_max_mb']:.1f} MB queued",
            f"- writer sustained ≥ {w['writer_mb_per_s']:.1f} MB/s (steps + final flush "
            f"{w['final_flush_s']:.2f} s)", ""]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", default=None,
                    help=f"comma list of {', '.join(BUILTIN + ZOO)} or 'zoo' (all zoo models); default "
                         "cnn,resnet18,transformer (--tiny: cnn)")
    ap.add_argument("--zoo", action="store_true", help="add every zoo model to --models (alone: the zoo only)")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--batch", type=int, default=0,
                    help="batch for every model (default: cnn 64, resnet18/transformer 32; zoo: LMs and BERT 8, "
                         "ViTs 16, CNNs 32)")
    ap.add_argument("--seq", type=int, default=0,
                    help=f"sequence length (default: transformer 64, zoo text models {LM_SEQ}; --tiny {TINY_SEQ})")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--slow-reps", type=int, default=0, help="reps for the slow materialising methods (0: --reps)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--json", type=Path, default=None, help="JSON report (rewritten after every model)")
    ap.add_argument("--markdown", type=Path, default=None, help="markdown tables (rewritten after every model)")
    ap.add_argument("--overhead", action="store_true", help="run the overhead table (default if no mode is given)")
    ap.add_argument("--writer", action="store_true", help="writer throughput mode")
    ap.add_argument("--writer-batch", type=int, default=256)
    ap.add_argument("--writer-width", type=int, default=64)
    ap.add_argument("--writer-steps", type=int, default=30)
    ap.add_argument("--probe", action="store_true", help="probe-mode m-coherence comparison")
    ap.add_argument("--probe-m", type=int, default=4096)
    ap.add_argument("--isolate", action="store_true",
                    help="each model in its own Python process, as a training job holds one model: the allocator "
                         "state left by earlier models does not enter later models' steps (same methods, reps and "
                         "interleaving inside each process)")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke run: batch 4, one rep; cnn unless --models/--zoo (zoo models at a tiny size: 2 "
                         f"layers, d 32, T {TINY_SEQ})")
    args = ap.parse_args(argv)
    args.models = resolve_models(args.models, args.zoo, args.tiny, ap)
    if args.tiny:
        args.batch, args.reps, args.warmup, args.slow_reps = 4, 1, 1, 1
        args.writer_batch, args.writer_steps, args.probe_m = 8, 2, 64
    if not (args.writer or args.probe):
        args.overhead = True
    return args


BUILTIN = ("cnn", "resnet18", "transformer")


def resolve_models(models: str | None, zoo: bool, tiny: bool, ap: argparse.ArgumentParser) -> list[str]:
    """The model names to run, in order ('zoo' expands to every zoo model); unknown names are a usage error."""
    if models is None:
        models = "" if zoo else ("cnn" if tiny else ",".join(BUILTIN))
    names = [m.strip() for m in models.split(",") if m.strip()] + (["zoo"] if zoo else [])
    out: list[str] = []
    for name in names:
        for m in ZOO if name == "zoo" else (name,):
            if m not in BUILTIN + ZOO:
                ap.error(f"unknown model {m!r} (known: {', '.join(BUILTIN + ZOO)}, zoo)")
            if m not in out:
                out.append(m)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    methods = [m for m in args.methods.split(",") if m]
    if args.tiny:
        have = {"opacus_hooks": "opacus", "opacus_ghost": "opacus", "backpack_l2": "backpack",
                "backpack_grad": "backpack"}
        methods = [m for m in methods if m not in have or _importable(have[m])]
    report: dict = {
        "argv": sys.argv, "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": os.getloadavg(), "git": _git_state(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "versions": _versions(),
        # TF32 (cuDNN convolutions use it by default) moves per-example norms by ~1e-3 between methods on CUDA
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    with tempfile.TemporaryDirectory(prefix="gradcoh-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if args.overhead:
            bench_zoo(report, methods, args, argv, tmp)
        if args.writer:
            report["writer"] = bench_writer(args, tmp)
            print(markdown({"writer": report["writer"]}), flush=True)
        if args.probe:
            report["probe"] = bench_probe(args, tmp)
            print(markdown({"probe": report["probe"]}), flush=True)
    report["loadavg_end"] = os.getloadavg()
    write_outputs(report, args)
    return report


def bench_zoo(report: dict, methods: list[str], args: argparse.Namespace, argv: list[str] | None,
              tmp: Path) -> None:
    """Every model of ``args.models``, each in this process or (``--isolate``) its own; fills ``report``."""
    report["overhead"] = []
    report["isolated"] = bool(args.isolate and len(args.models) > 1)
    for model_name in args.models:
        t0 = time.perf_counter()
        if report["isolated"]:
            res = bench_model_isolated(model_name, argv if argv is not None else sys.argv[1:], tmp)
        else:  # several models in one process: memory after every model's timing (see bench_model)
            res = bench_model(model_name, methods, args, tmp, memory=len(args.models) == 1)
        res["wall_s"] = time.perf_counter() - t0
        report["overhead"].append(res)
        print(markdown({"overhead": [res]}), flush=True)
        write_outputs(report, args)  # a run cut short (timeout) keeps the models done so far
    if not report["isolated"] and len(args.models) > 1:
        for res in report["overhead"]:
            add_memory(res, methods, args, tmp)
        write_outputs(report, args)
    if len(report["overhead"]) > 1:
        print("\n".join(summary_table(report["overhead"])), flush=True)


def bench_model_isolated(model_name: str, argv: list[str], tmp: Path) -> dict:
    """:func:`bench_model` of one model in a fresh interpreter running this script with the same options."""
    import subprocess

    drop = {"--zoo", "--isolate", "--writer", "--probe"}
    valued = {"--models", "--json", "--markdown"}
    rest: list[str] = []
    skip = False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif name in valued:
            skip = "=" not in arg
        elif name not in drop:
            rest.append(arg)
    out = tmp / f"{model_name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--models", model_name, "--overhead",
           "--json", str(out)]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"bench of {model_name} in its own process failed (exit {done.returncode}): {cmd}")
    return json.loads(out.read_text())["overhead"][0]


def write_outputs(report: dict, args: argparse.Namespace) -> None:
    """The JSON report and the markdown tables, where asked for."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(report))


def _versions() -> dict[str, str]:
    """Versions of the packages the methods and zoo models come from (those installed)."""
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "torchvision", "transformers", "timm", "opacus", "backpack-for-pytorch", "zarr"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def _git_state() -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "logger"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (logger/ has uncommitted changes)" if dirty else "")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
