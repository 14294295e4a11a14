"""``validate``: check the logger on a user's own model against an independent float64 per-example loop.

Run it once on a new architecture. It logs one step of a few examples, recomputes every example's gradient alone
in float64 with plain autograd (a deep copy of the model; no gradcoh code), and reports per layer the rule used,
the largest relative error of the per-example squared norms and a verdict. A model the logger cannot handle is
reported there too, with the error that names the module and the fix.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from . import schema

TOLERANCE = 1e-4
"""Largest relative error (float32 model against the float64 loop) that counts as exact."""


@dataclass
class LayerCheck:
    """One row of the validation table."""

    layer: str
    rule: str
    params: int
    max_rel_error: float
    verdict: str


@dataclass
class Validation:
    """The result of :func:`validate`: one :class:`LayerCheck` per layer, or the error that stopped logging.

    Attributes:
        rows: Per-layer checks.
        error: The logger's error message when the model could not be logged at all, else None.
        m_coherence: ``(logged, oracle)`` whole-model m-coherence of the examples.
    """

    rows: list[LayerCheck] = field(default_factory=list)
    error: str | None = None
    m_coherence: tuple[float, float] | None = None

    @property
    def ok(self) -> bool:
        """True when every layer is exact."""
        return self.error is None and all(r.verdict == "exact" for r in self.rows)

    def __str__(self) -> str:
        if self.error is not None:
            return f"gradcoh cannot log this model: {self.error}"
        width = max([len(r.layer) for r in self.rows] + [5])
        rule_width = max([len(r.rule) for r in self.rows] + [4])
        lines = [f"{'layer':<{width}}  {'rule':<{rule_width}}  {'params':>9}  {'max rel. error':>14}  verdict"]
        lines += [f"{r.layer:<{width}}  {r.rule:<{rule_width}}  {r.params:>9}  {r.max_rel_error:>14.1e}  {r.verdict}"
                  for r in self.rows]
        if self.m_coherence is not None:
            lines.append(f"m-coherence of the {len(self.rows) and 'examples'}: logged {self.m_coherence[0]:.6g}, "
                         f"float64 loop {self.m_coherence[1]:.6g}")
        bad = [r.layer for r in self.rows if r.verdict != "exact"]
        lines.append("all layers exact" if not bad else f"NOT exact: {', '.join(bad)} (exclude with layers=...)")
        return "\n".join(lines)


def _take(batch: Any, stop: int, start: int = 0) -> Any:
    if isinstance(batch, dict):
        return {k: _take(v, stop, start) for k, v in batch.items()}
    if torch.is_tensor(batch) and batch.dim():
        return batch[start:stop]
    return batch


def _double(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {k: _double(v) for k, v in batch.items()}
    return batch.double() if torch.is_tensor(batch) and batch.is_floating_point() else batch


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def oracle_grads(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable, n: int) -> dict[str, np.ndarray]:
    """``{parameter name: [n, numel]}``: each example's gradient alone, in float64, by plain autograd."""
    m = copy.deepcopy(model).double()
    out: dict[str, list] = {k: [] for k, p in m.named_parameters() if p.requires_grad}
    for i in range(n):
        m.zero_grad()
        loss_fn(_call(m, _double(_take(inputs, i + 1, i))), _double(_take(targets, i + 1, i))).sum().backward()
        for k, p in m.named_parameters():
            if p.requires_grad:
                out[k].append((torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).cpu().numpy())
    return {k: np.stack(v) for k, v in out.items()}


def validate(model: nn.Module, inputs: Any, targets: Any, loss_fn: Callable, examples: int = 4,
             **logger_options: Any) -> Validation:
    """Compare the logger's per-layer, per-example values with a float64 per-example loop on ``model``.

    The model is put in eval mode for the check (dropout would make the examples' own gradients random) and
    restored afterwards; its parameters and ``.grad`` are left as they were.

    Args:
        model: The user's model.
        inputs: A batch: a tensor ``[n, ...]`` or a dict of keyword arguments (Hugging Face style) with the batch
            on dimension 0.
        targets: What ``loss_fn`` compares the outputs with (a tensor or dict, batch on dimension 0).
        loss_fn: ``loss_fn(outputs, targets) -> [n]`` per-example losses.
        examples: How many examples of the batch to check.
        **logger_options: Further :class:`~gradcoh.logger.GradientLogger` options (``layers``, ``rules``, ...).

    Returns:
        A :class:`Validation` (print it for the table; ``.ok`` is True when every layer is exact).

    Example:
        >>> report = validate(model, batch, labels, lambda out, y: F.cross_entropy(out, y, reduction="none"))
        ... # doctest: +SKIP
        >>> print(report)  # doctest: +SKIP
    """
    from .hook import GradientLogger

    inputs, targets = _take(inputs, examples), _take(targets, examples)
    modes = [(m, m.training) for m in model.modules()]
    saved = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    model.eval()
    result = Validation()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/validate.zarr"
            try:
                with GradientLogger(model, path, loss_reduction="sum", on_mismatch="flag", handle_sigterm=False,
                                    **logger_options) as glog:
                    for p in model.parameters():
                        p.grad = None
                    with glog.record(0):
                        losses = loss_fn(_call(model, inputs), targets)
                        losses.sum().backward()
            except (ValueError, RuntimeError) as err:
                result.error = str(err)
                return result
            n = int(losses.shape[0])
            root = zarr.open_group(path, mode="r", use_consolidated=False)
            stream = root[schema.STREAM_BATCH]
            sq = np.asarray(stream[schema.SQ_NORM][0])[:n]
            sums = np.asarray(stream[schema.SUM_SQ_NORM][0])
            reconciled = np.asarray(stream[schema.RECONCILED][0])
            layers = root.attrs[schema.LAYERS_KEY]
        grads = oracle_grads(model, inputs, targets, loss_fn, n)
        exact_sq, exact_sums = [], []
        for i, layer in enumerate(layers):
            g = np.concatenate([grads[p] for p in layer["params"]], 1)
            want = (g**2).sum(1)
            exact_sq.append(want)
            exact_sums.append(float((g.sum(0) ** 2).sum()))
            err = float(np.max(np.abs(sq[:, i] - want) / np.maximum(np.abs(want), 1e-12 * max(want.max(), 1e-30))))
            verdict = "exact" if err <= TOLERANCE and reconciled[i] else (
                "NOT reconciled" if not reconciled[i] else "MISMATCH")
            result.rows.append(LayerCheck(layer["name"], layer["rule"], int(layer["size"]), err, verdict))
        result.m_coherence = (float(sums.sum() / sq.sum()), float(np.sum(exact_sums) / np.sum(exact_sq)))
        return result
    finally:
        for m, training in modes:
            m.training = training
        for p, g in saved:
            p.grad = g
