"""``GradcohCallback`` for the Hugging Face ``Trainer``: one optimizer step = one logged step, exact per example.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GradcohCallback("runs/ft.zarr", every=10, sketch_dim=256)])

How it fits the Trainer (whose callbacks see neither the batch nor the forward pass):

* at ``on_init_end`` it finds the Trainer that is calling it, keeps the dataset's ``index_column`` (and
  ``group_column``) through ``remove_unused_columns``, and puts itself first among the callbacks;
* a forward pre-hook on the model takes those columns out of the model's keyword arguments and hands each
  micro-batch's dataset indices, class labels and groups to the step being recorded;
* the record block spans the whole optimizer step: it opens at ``on_step_begin`` and closes at
  ``on_pre_optimizer_step`` (after gradient clipping; the batch sums come from the gradient hooks, not from
  ``.grad``), so every gradient-accumulation micro-batch is included;
* the stored per-example values are those of each example's contribution to the loss the Trainer optimises
  (``loss_reduction="sum"`` over whatever normalisation the Trainer applies: token means over
  ``num_items_in_batch`` or division by the accumulation steps), so m-coherence is exact for the step;
* a forward hook stores each example's loss for the standard heads (classification, causal and masked language
  models, token classification: :mod:`~gradcoh.logger.integrations.losses`), recomputed from the logits and labels;
* the verifier (:mod:`~gradcoh.logger.verify`, ``verify_every``) runs as with ``rec.loss`` in a plain loop: on a due
  step the forward hook recomputes each example's term of the model's ``loss`` attached to the graph (checked to add
  up to that loss; the model's loss is the one the Trainer backpropagates), the weight the loss carries in the
  backward pass (gradient accumulation, a loss scale) is read from the gradient reaching it, and one random example's
  contribution is recomputed by one extra autograd pass and compared with what is stored. It does not run when the
  Trainer does not backpropagate the model's own loss (``label_smoothing_factor``, ``compute_loss_func``, a
  ``compute_loss`` override that ignores ``outputs.loss``) or for heads without standard losses;
* a training dataset without the index column warns once, naming the column and the fix (indices are then −1);
* after the step it calls ``Trainer.log`` with ``gradcoh/m_coherence`` (and ``gradcoh/m_coherence/<group>``), so
  ``report_to`` TensorBoard, W&B, MLflow or CSV shows them live.

Steps are numbered like the Trainer's logs: ``global_step`` after the optimizer step (1 for the first).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..hook import GradientLogger
from .losses import loss_terms
from .window import StepWindow

log = logging.getLogger(__name__)


class GradcohCallback(TrainerCallback):
    """Logs exact per-example gradient statistics of a ``transformers.Trainer`` run.

    Args:
        store: Path (or fsspec URL) of the Zarr store.
        index_column: Dataset column with each example's index (GLUE-style datasets have ``idx``); kept through
            ``remove_unused_columns``. A training dataset without it warns (indices are then stored as −1); pass
            ``index_column=None`` to store no index without a warning.
        label_column: Model input holding the labels; stored when it has one value per example (class labels),
            not for token-level labels.
        group_column: Dataset column with each example's group position (with ``groups=...``), or None.
        **options: :class:`~gradcoh.logger.GradientLogger` keyword arguments (``every``, ``sketch_dim``, ``seed``,
            ``groups``, ``layers``, ``mode``, ``on_mismatch``, ...). ``loss_reduction`` is set by the callback.
    """

    def __init__(self, store: str | Path, *, index_column: str = "idx", label_column: str = "labels",
                 group_column: str | None = None, **options: Any) -> None:
        if "loss_reduction" in options:
            raise ValueError("GradcohCallback sets loss_reduction itself (each example's contribution to the "
                             "Trainer's loss); remove the argument")
        self.store = str(store)
        self.index_column = index_column
        self.label_column = label_column
        self.group_column = group_column
        self.options = options
        self.logger: GradientLogger | None = None
        self._trainer: Trainer | None = None
        self._hook: Any = None
        self._loss_hook: Any = None
        self._labels: Any = None
        self._unverified = False
        self._window: StepWindow | None = None

    # --- set-up ------------------------------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Find the Trainer; keep the index and group columns; run first among the callbacks."""
        trainer = _calling_trainer()
        self._trainer = trainer
        trainer._set_signature_columns_if_needed()
        for column in (self.index_column, self.group_column):
            if column and column not in trainer._signature_columns:
                trainer._signature_columns.append(column)
        callbacks = trainer.callback_handler.callbacks
        callbacks.remove(self)
        callbacks.insert(0, self)
        _check_index_column(trainer.train_dataset, self.index_column)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       **kwargs: Any) -> None:
        """Open the logger on the model being trained (resume: ``mode="append"`` continues the store)."""
        if self._trainer is None:
            raise RuntimeError("GradcohCallback must be passed to Trainer(callbacks=[...]) (it was added later)")
        if args.gradient_checkpointing:
            raise ValueError(
                "GradcohCallback does not support gradient_checkpointing=True: the recomputed forward passes inside "
                "the backward would be taken for new micro-batches. Turn gradient checkpointing off for the run "
                "you log (or log a shorter run without it)"
            )
        if self.logger is None:
            self.logger = GradientLogger(self._trainer.model, self.store, loss_reduction="sum", **self.options)
            self.logger.reduction_checks = False  # contributions, whatever the loss's reduction
            self.logger.batch_sums_from_grad = False  # the Trainer clips .grad before our next callback runs
            self._window = StepWindow(self.logger)
            self._hook = self._trainer.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
            self._loss_hook = self._trainer.model.register_forward_hook(self._after_forward)

    # --- one optimizer step ------------------------------------------------------------------------------
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the record block for the step's micro-batches when the step is logged."""
        if self._window is not None:
            self._window.start(state.global_step + 1)

    def _before_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        index = kwargs.pop(self.index_column, None) if self.index_column else None
        group = kwargs.pop(self.group_column, None) if self.group_column else None
        rec = None if self._window is None else self._window.rec
        if rec is not None and rec.active and module.training:
            labels = kwargs.get(self.label_column)
            n = _batch_size(args, kwargs)
            class_labels = labels if torch.is_tensor(labels) and labels.dim() == 1 and labels.shape[0] == n else None
            rec.examples(index=index if index is not None else torch.full((n,), -1), labels=class_labels,
                         group=group)
            self._labels = (labels, n, kwargs.get("num_items_in_batch"))
        return args, kwargs

    def _after_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        pending, self._labels = self._labels, None
        rec = None if self._window is None else self._window.rec
        if rec is None or pending is None or not rec.active:
            return
        labels, n, num_items = pending
        with torch.set_grad_enabled(rec.wants_terms):  # terms attached only for a step the verifier checks
            found = loss_terms(module, output, labels, num_items)
        losses, terms = found if found is not None else (None, None)
        rec.loss(losses if losses is not None else torch.full((n,), float("nan")))  # one value per example
        if terms is not None and terms.requires_grad:
            loss = output["loss"] if isinstance(output, dict) else output.loss
            rec.terms(terms, loss)
        elif rec.wants_terms and not self._unverified:
            self._unverified = True
            log.info("GradcohCallback: the verifier does not run: the model's loss is not the standard head's loss "
                     "of its logits and labels (or there is none), so per-example terms are unknown")

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close the step's record block (all micro-batches done, gradients clipped, optimizer not yet stepped)."""
        if self._window is None or not self._window.open:
            return
        scaler = getattr(self._trainer.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():  # fp16: the loss was scaled
            self._window.rec.unscale(float(scaler.get_scale()))
        self._window.close()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Hand the step's m-coherence to the Trainer's logs (TensorBoard, W&B, MLflow, CSV, log history)."""
        if self._window is None:
            return
        self._window.close()  # (if the optimizer step was skipped)
        values = self._window.take()
        if values:
            self._trainer.log(values)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Commit everything and remove the hooks."""
        self._shutdown(abort=False)

    def close(self) -> None:
        """Drop a step left open by an exception in training, remove the hooks and close the logger.

        Call it (or restart the process) after ``train()`` raised: the Trainer does not tell callbacks.
        """
        self._shutdown(abort=True)

    def _shutdown(self, abort: bool) -> None:
        for hook in (self._hook, self._loss_hook):
            if hook is not None:
                hook.remove()
        self._hook = self._loss_hook = None
        if self._window is not None:
            self._window.shutdown(abort)
        self._window = self.logger = None


def _calling_trainer() -> Trainer:
    """The ``Trainer`` whose ``__init__`` is running the callbacks' ``on_init_end`` (found on the call stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    raise RuntimeError("GradcohCallback must be passed to transformers.Trainer(callbacks=[...])")


def _check_index_column(dataset: Any, column: str | None) -> None:
    """Warn when the training dataset has named columns and ``column`` is not among them."""
    names = getattr(dataset, "column_names", None)
    if not column or not isinstance(names, list) or column in names:
        return
    similar = [c for c in names if c.lower() in ("idx", "id", "index", "ids", "example_id", "guid")]
    hint = f"index_column={similar[0]!r}" if similar else f"ds = ds.add_column({column!r}, range(len(ds)))"
    warnings.warn(
        f"GradcohCallback: the training dataset has no index column {column!r} (columns: {', '.join(names)}), so "
        f"every example's index is stored as -1 and examples cannot be followed across steps. Fix: {hint} (or "
        "index_column=None to log without indices and without this warning)",
        UserWarning, stacklevel=4,
    )


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.dim():
            return value.shape[0]
    return 0
