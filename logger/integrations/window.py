"""A record block spanning one optimizer step of a trainer, opened and closed from two callback events."""

from __future__ import annotations

from typing import Any

from ..hook import GradientLogger
from ..recorder import Recording


class StepWindow:
    """Opens ``logger.record(step)`` at the step's first micro-batch and closes it once all are backpropagated.

    Args:
        logger: The logger.
    """

    def __init__(self, logger: GradientLogger) -> None:
        self.logger = logger
        self._block: Any = None
        self.rec: Recording | None = None
        self.pending: dict[str, float] | None = None

    @property
    def open(self) -> bool:
        """Whether a logged step is being recorded."""
        return self._block is not None

    def start(self, step: int) -> None:
        """Open the block if ``step`` is logged (and none is open)."""
        if self._block is None and self.logger.should_log(step):
            self._block = self.logger.record(step)
            self.rec = self._block.__enter__()

    def close(self) -> None:
        """Close the block; its scalars (``gradcoh/m_coherence`` and per group) wait in :attr:`pending`."""
        if self._block is None:
            return
        block, rec, self._block, self.rec = self._block, self.rec, None, None
        block.__exit__(None, None, None)
        summary = rec.summary()
        if summary:
            self.pending = {f"gradcoh/{k}": v for k, v in summary.items() if k != "n"}

    def abort(self) -> None:
        """Drop an open step without storing it: removes its hooks (after training raised inside the step)."""
        if self._block is None:
            return
        block, self._block, self.rec = self._block, None, None
        error = RuntimeError("training stopped inside a logged step")
        try:
            block.__exit__(RuntimeError, error, None)
        except RuntimeError as raised:
            if raised is not error:
                raise

    def shutdown(self, abort: bool = False) -> None:
        """Close (or, after an exception, drop) the open step, then close the logger: everything is committed."""
        if abort:
            self.abort()
        else:
            self.close()
        self.logger.close()

    def take(self) -> dict[str, float]:
        """The scalars of the last closed step (once), or an empty dict."""
        values, self.pending = self.pending or {}, None
        return values
