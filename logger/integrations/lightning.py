"""``GradcohCallback`` for Lightning: one optimizer step = one logged step, exact per example.

    cb = GradcohCallback("runs/x.zarr", every=10, index=lambda batch: batch[2], labels=lambda batch: batch[1])
    L.Trainer(callbacks=[cb], accumulate_grad_batches=2).fit(module, loader)

The record block opens at the first micro-batch of an accumulation window (``on_train_batch_start``, which sees
the batch, so ``index``/``labels``/``group`` are read there) and closes at ``on_before_optimizer_step``, after every
micro-batch's backward pass. Stored per-example values are each example's contribution to the loss Lightning
optimises (``loss_reduction="sum"`` over its normalisation, e.g. the division by ``accumulate_grad_batches``), so
m-coherence is exact for the step. ``gradcoh/m_coherence`` (and per group) go through ``pl_module.log`` to the
Trainer's loggers. Steps are numbered by ``trainer.global_step`` when the window starts (0 for the first).

Per-example losses are stored when ``training_step`` returns them: a dict with the optimised ``"loss"`` and
``"losses"`` (``[n]``, one per example of the micro-batch; the key is ``losses_key``), e.g.
``return {"loss": per.mean(), "losses": per}``. Otherwise they stay NaN.

When those losses are attached to the graph and the optimised loss is computed from them (as above), the verifier
(:mod:`~gradcoh.logger.verify`, ``verify_every``) runs as with ``rec.loss`` in a plain loop: the weight each example's
loss carries in the backward loss (``mean``, ``sum``, the division by ``accumulate_grad_batches``, a loss scale) is
read from the gradient reaching it, and one random example's contribution is recomputed by one extra autograd pass
and compared with what is stored. Detached losses (``per.detach()``) are stored without verification.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from ..hook import GradientLogger
from .window import StepWindow

BatchFn = Callable[[Any], Any] | None
log = logging.getLogger(__name__)


class GradcohCallback(L.Callback):
    """Logs exact per-example gradient statistics of a Lightning ``fit``.

    Args:
        store: Path (or fsspec URL) of the Zarr store.
        index: ``batch -> [n]`` dataset indices, or None (stored as −1).
        labels: ``batch -> [n]`` class labels, or None.
        group: ``batch -> [n]`` group positions (with ``groups=...``), or None.
        losses_key: Key of the per-example losses ``[n]`` in the dict ``training_step`` returns (stored when
            present).
        **options: :class:`~gradcoh.logger.GradientLogger` keyword arguments (``every``, ``sketch_dim``, ``seed``,
            ``groups``, ``layers``, ``mode``, ...). ``loss_reduction`` is set by the callback.
    """

    def __init__(self, store: str | Path, *, index: BatchFn = None, labels: BatchFn = None, group: BatchFn = None,
                 losses_key: str = "losses", **options: Any) -> None:
        if "loss_reduction" in options:
            raise ValueError("GradcohCallback sets loss_reduction itself (each example's contribution to the "
                             "optimised loss); remove the argument")
        self.store = str(store)
        self.index, self.labels, self.group = index, labels, group
        self.losses_key = losses_key
        self.options = options
        self.logger: GradientLogger | None = None
        self._window: StepWindow | None = None
        self._module: L.LightningModule | None = None
        self._unverified = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Open the logger on the module (resume: ``mode="append"`` continues the store after its last step)."""
        if self.logger is None:
            self.logger = GradientLogger(pl_module, self.store, loss_reduction="sum", **self.options)
            self.logger.reduction_checks = False  # contributions, whatever the loss's reduction
            self.logger.batch_sums_from_grad = False  # gradients may be clipped/unscaled before the block ends
            self._window = StepWindow(self.logger)
            self._wrap_training_step(pl_module)

    def _wrap_training_step(self, pl_module: L.LightningModule) -> None:
        """Read the per-example losses out of what ``training_step`` returns (nothing else changes)."""
        step = pl_module.training_step

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            out = step(*args, **kwargs)
            rec = None if self._window is None else self._window.rec
            if rec is not None and rec.active and isinstance(out, dict) and self.losses_key in out:
                losses = out[self.losses_key]
                rec.loss(losses.detach())  # stored; contributions are stored whatever their weights
                if losses.requires_grad:
                    rec.terms(losses)  # the verifier: their weights are read from their own gradient
                elif rec.wants_terms and not self._unverified:
                    self._unverified = True
                    log.info("GradcohCallback: training_step returns detached losses, so the verifier does not run; "
                             "return them attached to the graph (the loss computed from them) to verify")
            return out

        pl_module.training_step = training_step  # an instance attribute, removed at the end
        self._module = pl_module

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Open the block at the first micro-batch of a window; hand each micro-batch's metadata to it."""
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._window.start(trainer.global_step)
        if self._window.open:
            self._window.rec.examples(**{key: fn(batch) for key, fn in
                                  (("index", self.index), ("labels", self.labels), ("group", self.group))
                                  if fn is not None})

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """Close the block: every micro-batch of the step has been backpropagated."""
        self._window.close()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Send the step's m-coherence to the Trainer's loggers."""
        for name, value in self._window.take().items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Commit everything (a window cut short by the end of training is a step of its own)."""
        self._shutdown(abort=False)

    def close(self) -> None:
        """Drop a step left open by an exception in training, remove its hooks and close the logger.

        Call it (or restart the process) after ``fit()`` raised: Lightning does not tell callbacks.
        """
        self._shutdown(abort=True)

    def _shutdown(self, abort: bool) -> None:
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)
            self._module = None
        if self._window is not None:
            self._window.shutdown(abort)
        self._window = self.logger = None
