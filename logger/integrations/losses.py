"""Per-example losses of standard Hugging Face heads, computed from a forward's logits and labels.

The Trainer optimises the model's own (batch-reduced) loss, so callbacks never see per-example values. For the
standard heads they are recomputed here from the outputs, detached (no effect on training):

* sequence classification (labels ``[n]``): cross-entropy of ``logits [n, C]``; mean squared error when
  ``num_labels == 1`` (regression);
* causal language models (``*ForCausalLM``, ``*LMHeadModel``; labels ``[n, T]``): token cross-entropy of
  ``logits[:, :-1]`` against ``labels[:, 1:]`` (the shift the models apply), averaged over each example's tokens
  that are not ``-100``;
* every other token-level head (masked LM, token classification, seq2seq decoders): the same without the shift.

Anything else (no ``logits``, other label shapes) gives None: the losses stay NaN, as without a callback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "per_example_loss"]

IGNORE_INDEX = -100
"""Label value Hugging Face losses skip (padding, prompt tokens)."""

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _logits(output: Any) -> torch.Tensor | None:
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        logits = output[0]
    return logits if torch.is_tensor(logits) else None


def _token_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    tok = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none",
                          ignore_index=IGNORE_INDEX).view(labels.shape)
    kept = (labels != IGNORE_INDEX).sum(1)
    return tok.sum(1) / kept.clamp(min=1)


def per_example_loss(model: torch.nn.Module, output: Any, labels: Any) -> torch.Tensor | None:
    """Per-example losses ``[n]`` (float32, detached) of a standard head, or None when the head is not standard.

    Args:
        model: The model (its class name says whether it is a causal LM; its config whether it regresses).
        output: The forward's output (a ``ModelOutput``, dict or tuple whose first entry is the logits).
        labels: The ``labels`` the forward received.

    """
    logits = _logits(output)
    if logits is None or not torch.is_tensor(labels) or labels.shape[0] != logits.shape[0]:
        return None
    with torch.no_grad():
        logits = logits.detach()
        if labels.dim() == 1 and logits.dim() == 2:
            if logits.shape[1] == 1 and labels.is_floating_point():  # regression (num_labels == 1)
                return (logits[:, 0].float() - labels.float()) ** 2
            return F.cross_entropy(logits.float(), labels.long(), reduction="none")
        if labels.dim() == 2 and logits.dim() == 3 and labels.shape[1] == logits.shape[1]:
            if type(model).__name__.endswith(_CAUSAL_SUFFIXES):
                return _token_mean(logits[:, :-1], labels[:, 1:])
            return _token_mean(logits, labels)
    return None
