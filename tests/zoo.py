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
    train: bool = False  # also checked in train mode (dropout) against the oracle through the same batch forward


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


def _seq2seq_tokens(n: int) -> dict:
    b = _tokens(n, "lm")
    b["decoder_input_ids"] = torch.cat([torch.ones(n, 1, dtype=torch.long), b["target"][:, :-1]], 1)
    return b


def token_loss(model: nn.Module, b: dict) -> torch.Tensor:
    """Tagging / seq2seq with a plain torch model: each example's mean token cross-entropy over its positions."""
    inputs = {k: v for k, v in b.items() if k != "target"}
    logits = model(**inputs)
    logits = getattr(logits, "logits", logits)
    tok = F.cross_entropy(logits.transpose(1, 2), b["target"], reduction="none")
    mask = b["attention_mask"].to(tok.dtype) if "decoder_input_ids" not in b else torch.ones_like(tok)
    return (tok * mask).sum(1) / mask.sum(1)


class LSTMTagger(nn.Module):
    """A sequence tagger over packed sequences: embedding → 2-layer bidirectional LSTM → per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16, padding_idx=0)
        self.lstm = nn.LSTM(16, 12, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        lengths = attention_mask.sum(1).cpu()
        packed = pack_padded_sequence(self.emb(input_ids), lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=input_ids.shape[1])
        return self.head(out)


class GRUSeq2Seq(nn.Module):
    """A GRU encoder-decoder, sequence-first as in PyTorch's tutorials; the decoder starts from the encoder's state."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.encoder = nn.GRU(16, 12, bidirectional=True)
        self.bridge = nn.Linear(24, 12)
        self.decoder = nn.GRU(16, 12)
        self.head = nn.Linear(12, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        _, h = self.encoder(self.emb(input_ids).transpose(0, 1))
        h0 = torch.tanh(self.bridge(torch.cat([h[0], h[1]], -1))).unsqueeze(0)
        out, _ = self.decoder(self.emb(decoder_input_ids).transpose(0, 1), h0)
        return self.head(out).transpose(0, 1)


class TorchTransformer(nn.Module):
    """``nn.Transformer`` with PyTorch's defaults (sequence first, dropout 0.1, ReLU, post-norm) as a seq2seq model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.pos = nn.Parameter(torch.randn(16, 1, 16) * 0.02)
        self.transformer = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                                          dim_feedforward=32)
        self.head = nn.Linear(16, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        src = self.emb(input_ids).transpose(0, 1) * 4.0 + self.pos[: input_ids.shape[1]]
        tgt = self.emb(decoder_input_ids).transpose(0, 1) * 4.0 + self.pos[: decoder_input_ids.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[0])
        pad = attention_mask == 0
        out = self.transformer(src, tgt, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad,
                               tgt_is_causal=True)
        return self.head(out).transpose(0, 1)


class TorchEncoderLM(nn.Module):
    """``nn.TransformerEncoder`` as the PyTorch tutorials build it (sequence first, dropout 0.1), causal LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2)
        self.head = nn.Linear(16, V)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        out = self.encoder(self.emb(input_ids).transpose(0, 1), mask=causal, is_causal=True)
        return self.head(out).transpose(0, 1)


def _tv_swin_v2() -> nn.Module:
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    return SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                           num_classes=3, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)


def _audio(n: int) -> dict:
    g = torch.Generator().manual_seed(n)
    return {"input_values": torch.randn(n, 400, generator=g), "target": torch.randint(0, 3, (n,), generator=g)}


def hf_audio_classifier(model: nn.Module, b: dict) -> torch.Tensor:
    """Audio classification from the raw waveform."""
    return _cls_loss(model(input_values=b["input_values"]).logits, b["target"])


def _mel(n: int) -> dict:
    g = torch.Generator().manual_seed(n)
    b = _seq2seq_tokens(n)
    b["input_features"] = torch.randn(n, 8, 20, generator=g)
    del b["input_ids"], b["attention_mask"]
    return b


def hf_speech_seq2seq(model: nn.Module, b: dict) -> torch.Tensor:
    """Whisper: decoder fed the shifted transcript; each example's mean token cross-entropy."""
    logits = model(input_features=b["input_features"], decoder_input_ids=b["decoder_input_ids"]).logits
    return F.cross_entropy(logits.transpose(1, 2), b["target"], reduction="none").mean(1)


def hf_bart(model: nn.Module, b: dict) -> torch.Tensor:
    """BART: encoder on the tokens, decoder on the shifted targets."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   decoder_input_ids=b["decoder_input_ids"]).logits
    return F.cross_entropy(logits.transpose(1, 2), b["target"], reduction="none").mean(1)


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
    Case("tv-swin-v2", _tv_swin_v2, _images, image, "torchvision", train=True),
    Case("torch-lstm-tagger", LSTMTagger, lambda n: _tokens(n, "lm"), token_loss, "recurrent", train=True),
    Case("torch-gru-seq2seq", GRUSeq2Seq, _seq2seq_tokens, token_loss, "recurrent", train=True),
    Case("torch-transformer", TorchTransformer, _seq2seq_tokens, token_loss, "torch", train=True),
    Case("torch-encoder-lm", TorchEncoderLM, lambda n: _tokens(n, "lm"), token_loss, "torch", train=True),
    Case("hf-deberta-v2", _hf("DebertaV2Config", "DebertaV2ForSequenceClassification", num_labels=3,
                              relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=4,
                              max_relative_positions=8, **_SMALL), _tokens, hf_classifier, "transformers", train=True),
    Case("hf-bart", _hf("BartConfig", "BartForConditionalGeneration", vocab_size=V, d_model=16, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_position_embeddings=16),
         _seq2seq_tokens, hf_bart, "transformers", train=True),
    Case("hf-wav2vec2", _hf("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", vocab_size=V, hidden_size=16,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
                            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                            num_conv_pos_embedding_groups=2, num_labels=3, mask_time_prob=0.0),
         _audio, hf_audio_classifier, "transformers", train=True),
    Case("hf-whisper", _hf("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=V, num_mel_bins=8,
                           encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                           d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=10,
                           max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                           decoder_start_token_id=1),
         _mel, hf_speech_seq2seq, "transformers", train=True),
]}
