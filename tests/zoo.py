"""The conformance zoo: tiny random-init configurations of the models people train (no downloads).

Each entry builds a model from its package's config class, a batch, and the per-example loss ``[n]``. Used by
tests/logger/test_zoo.py (exactness against a float64 per-example loop) and scripts/zoo_table.py (docs/models.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Case:
    """One zoo model: how to build it, a batch, and per-example losses."""

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], dict]  # n -> model inputs (keyword arguments) plus "target"
    loss: Callable[[nn.Module, dict], torch.Tensor]  # per-example losses [n]
    family: str


def _hf(config: str, model: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.logging.set_verbosity_error()
            cfg = getattr(transformers, config)(**kw)
            return getattr(transformers, model)(cfg)

    return build


V, T = 40, 6


def _tokens(n: int, labels: str = "class") -> dict:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(2, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, -2:] = 0  # one padded example
    target = torch.randint(0, 3, (n,), generator=g) if labels == "class" else torch.randint(2, V, (n, T), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "target": target}


def _images(n: int, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(n)
    return {"pixels": torch.randn(n, 3, size, size, generator=g), "target": torch.randint(0, 3, (n,), generator=g)}


def _cls_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target, reduction="none")


def hf_classifier(model: nn.Module, b: dict) -> torch.Tensor:
    """Sequence classification: cross-entropy of the logits."""
    return _cls_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["target"])


def hf_causal_lm(model: nn.Module, b: dict) -> torch.Tensor:
    """Next-token prediction: each example's mean token cross-entropy over its unpadded positions."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    tok = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten(), reduction="none")
    mask = b["attention_mask"][:, 1:].to(tok.dtype)
    return (tok.view_as(mask) * mask).sum(1) / mask.sum(1)


def hf_masked_lm(model: nn.Module, b: dict) -> torch.Tensor:
    """Masked LM: each example's mean token cross-entropy against random targets."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(logits.transpose(1, 2), b["target"], reduction="none").mean(1)


def hf_seq2seq(model: nn.Module, b: dict) -> torch.Tensor:
    """T5: decoder fed the shifted targets; each example's mean token cross-entropy."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["target"]).logits
    return F.cross_entropy(logits.transpose(1, 2), b["target"], reduction="none").mean(1)


def hf_image(model: nn.Module, b: dict) -> torch.Tensor:
    """HF image classification."""
    return _cls_loss(model(pixel_values=b["pixels"]).logits, b["target"])


def image(model: nn.Module, b: dict) -> torch.Tensor:
    """timm / torchvision image classification."""
    return _cls_loss(model(b["pixels"]), b["target"])


_SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=V,
              max_position_embeddings=16)


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=3, **kw)

    return build


def _tv_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, width_per_group=64)


def _tv_mobilenet() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v3_small(num_classes=3, width_mult=0.25)


def _tv_effnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    cfg = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(4, 3, 2, 8, 16, 1)]
    return EfficientNet(cfg, dropout=0.0, num_classes=3, last_channel=32)


def _tv_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=3)


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3)


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                           num_classes=3)


CASES: dict[str, Case] = {c.name: c for c in [
    Case("hf-gpt2", _hf("GPT2Config", "GPT2LMHeadModel", n_embd=16, n_layer=2, n_head=2, vocab_size=V,
                        n_positions=16, bos_token_id=0, eos_token_id=0),
         lambda n: _tokens(n, "lm"), hf_causal_lm, "transformers"),
    Case("hf-bert", _hf("BertConfig", "BertForSequenceClassification", num_labels=3, **_SMALL), _tokens,
         hf_classifier, "transformers"),
    Case("hf-bert-mlm", _hf("BertConfig", "BertForMaskedLM", **_SMALL), lambda n: _tokens(n, "lm"), hf_masked_lm,
         "transformers"),
    Case("hf-distilbert", _hf("DistilBertConfig", "DistilBertForSequenceClassification", num_labels=3, dim=16,
                              n_layers=2, n_heads=2, hidden_dim=32, vocab_size=V, max_position_embeddings=16),
         _tokens, hf_classifier, "transformers"),
    Case("hf-roberta", _hf("RobertaConfig", "RobertaForSequenceClassification", num_labels=3, pad_token_id=1,
                           **_SMALL | {"max_position_embeddings": 20}), _tokens, hf_classifier, "transformers"),
    Case("hf-t5", _hf("T5Config", "T5ForConditionalGeneration", d_model=16, d_kv=8, d_ff=32, num_layers=2,
                      num_heads=2, vocab_size=V, relative_attention_num_buckets=8, decoder_start_token_id=0),
         lambda n: _tokens(n, "lm"), hf_seq2seq, "transformers"),
    Case("hf-llama", _hf("LlamaConfig", "LlamaForCausalLM", hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, vocab_size=V,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=0),
         lambda n: _tokens(n, "lm"), hf_causal_lm, "transformers"),
    Case("hf-vit", _hf("ViTConfig", "ViTForImageClassification", hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8, num_labels=3),
         _images, hf_image, "transformers"),
    Case("timm-vit", _timm("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                           init_values=1e-2, reg_tokens=1),
         _images, image, "timm"),
    Case("timm-deit", _timm("deit_tiny_distilled_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=2,
                            num_heads=2), _images, image, "timm"),
    Case("timm-convnext", _timm("convnext_atto", dims=(8, 16, 16, 16), depths=(1, 1, 1, 1)),
         lambda n: _images(n, 32), image, "timm"),
    Case("timm-swin", _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, embed_dim=8,
                            depths=(1, 1), num_heads=(1, 2)), lambda n: _images(n, 32), image, "timm"),
    Case("timm-resnet", _timm("resnet10t"), lambda n: _images(n, 32), image, "timm"),
    Case("timm-efficientnet", _timm("efficientnet_b0"),
         lambda n: _images(n, 32), image, "timm"),
    Case("tv-resnet", _tv_resnet, lambda n: _images(n, 32), image, "torchvision"),
    Case("tv-mobilenet", _tv_mobilenet, lambda n: _images(n, 32), image, "torchvision"),
    Case("tv-efficientnet", _tv_effnet, lambda n: _images(n, 32), image, "torchvision"),
    Case("tv-vit", _tv_vit, _images, image, "torchvision"),
    Case("tv-convnext", _tv_convnext, lambda n: _images(n, 32), image, "torchvision"),
    Case("tv-swin", _tv_swin, _images, image, "torchvision"),
]}
