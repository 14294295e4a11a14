"""Per-example losses of standard Hugging Face heads, computed from a forward's logits and labels.

The Trainer optimises the model's own (batch-reduced) loss, so callbacks never see per-example values. For the
standard heads they are recomputed here from the outputs (no effect on training):

* sequence classification (labels ``[n]``): cross-entropy of ``logits [n, C]``; squared error when
  ``num_labels == 1`` (regression);
* causal language models (``*ForCausalLM``, ``*LMHeadModel``; labels ``[n, T]``): token cross-entropy of
  ``logits[:, :-1]`` against ``labels[:, 1:]`` (the shift the models apply), averaged over each example's tokens
  that are not ``-100``;
* every other token-level head (masked LM, token classification, seq2seq decoders): the same without the shift.

Anything else (no ``logits``, other label shapes) gives None: the losses stay NaN, as without a callback.

:func:`loss_terms` also gives each example's **term of the model's loss**, attached to the graph, for the verifier:
the models' losses (``transformers.loss.loss_utils``) divide the sum of the token (or example) losses that are not
``-100`` by one count, ``num_items_in_batch`` when the Trainer passes it and the model uses it, else the number of
those tokens (a mean), and
the regression head averages squared errors over the examples; so example ``i``'s term is the sum of its own token
losses divided by that count, checked against the loss the model returned.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "loss_terms", "per_example_loss"]

IGNORE_INDEX = -100
"""Label value Hugging Face losses skip (padding, prompt tokens)."""

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_U = 2.0**-24  # float32 unit roundoff


def _logits(output: Any) -> torch.Tensor | None:
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple) and output and torch.is_tensor(output[0]):
        logits = output[0]
    return logits if torch.is_tensor(logits) else None


def _token_losses(model: torch.nn.Module, logits: torch.Tensor, labels: Any) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   bool] | None:
    """``(losses [n, K], kept [n, K], regression)``: each example's K token (or one example) losses, or None."""
    if not torch.is_tensor(labels) or labels.shape[0] != logits.shape[0]:
        return None
    if labels.dim() == 1 and logits.dim() == 2:
        if logits.shape[1] == 1 and labels.is_floating_point():  # regression (num_labels == 1)
            return ((logits[:, 0].float() - labels.float()) ** 2)[:, None], torch.ones_like(labels)[:, None], True
        tok = F.cross_entropy(logits.float(), labels.long(), reduction="none", ignore_index=IGNORE_INDEX)
        return tok[:, None], (labels != IGNORE_INDEX)[:, None], False
    if labels.dim() == 2 and logits.dim() == 3 and labels.shape[1] == logits.shape[1]:
        if type(model).__name__.endswith(_CAUSAL_SUFFIXES):
            logits, labels = logits[:, :-1], labels[:, 1:]
        tok = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="none",
                              ignore_index=IGNORE_INDEX).view(labels.shape)
        return tok, labels != IGNORE_INDEX, False
    return None


def per_example_loss(model: torch.nn.Module, output: Any, labels: Any) -> torch.Tensor | None:
    """Per-example losses ``[n]`` (float32, detached) of a standard head, or None when the head is not standard.

    Args:
        model: The model (its class name says whether it is a causal LM; its config whether it regresses).
        output: The forward's output (a ``ModelOutput``, dict or tuple whose first entry is the logits).
        labels: The ``labels`` the forward received.

    """
    logits = _logits(output)
    if logits is None:
        return None
    with torch.no_grad():
        found = _token_losses(model, logits.detach(), labels)
    if found is None:
        return None
    tok, kept, _ = found
    return tok.sum(1) / kept.sum(1).clamp(min=1)


def loss_terms(model: torch.nn.Module, output: Any, labels: Any,
               num_items: Any = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(losses, terms)``, or None when the head is not standard.

    ``losses`` are the per-example losses (as :func:`per_example_loss`), ``terms`` each example's term ``[n]`` of the
    model's loss, attached to the graph (see the module docstring). ``terms`` is None when they do not add up to the
    loss the model returned (label smoothing, a custom loss in the model, no loss): both are float32 sums of the same
    ``K`` nonnegative token losses in different orders, so they differ by at most ``2·K·u`` times the sum
    (u = 2⁻²⁴); another loss differs by far more.

    Args:
        model: The model.
        output: The forward's output (its ``loss`` is the one the Trainer backpropagates).
        labels: The ``labels`` the forward received.
        num_items: The ``num_items_in_batch`` the forward received (the Trainer's count over the accumulation
            window), or None.
    """
    logits = _logits(output)
    found = None if logits is None else _token_losses(model, logits, labels)
    if found is None:
        return None
    tok, kept, regression = found
    sums = tok.sum(1)
    losses = sums.detach() / kept.sum(1).clamp(min=1)
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if not torch.is_tensor(loss) or not loss.requires_grad or loss.numel() != 1:
        return losses, None
    counts = [tok.shape[0]] if regression else [c for c in (num_items, kept.sum()) if c is not None]
    got = loss.detach().double().reshape(())
    for count in counts:  # models that ignore num_items_in_batch take the mean over the labelled tokens
        terms = sums / torch.as_tensor(count, device=sums.device, dtype=sums.dtype)
        total = terms.detach().double().sum()
        if bool((total - got).abs() <= 2 * max(tok.numel(), 2) * _U * terms.detach().double().abs().sum()):
            return losses, terms
    return losses, None
