"""Turn a polite kill into a clean exit while a logger is open, so that ``with`` blocks close it and commit."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from typing import Any


class SigtermExit:
    """Installs a SIGTERM handler raising ``SystemExit(143)`` in the main thread; ``restore`` puts the old one back.

    Only from the main thread, and only over the default action: a handler the program installed itself (a
    launcher's, a framework's) is left alone.
    """

    def __init__(self) -> None:
        self._installed: tuple[Callable, Any] | None = None

    def install(self) -> None:
        """Install the handler (no-op outside the main thread or over a program's own handler)."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
            return
        try:
            previous = signal.getsignal(signal.SIGTERM)
            if previous is not signal.SIG_DFL:
                return

            def on_sigterm(signum: int, frame: Any) -> None:
                raise SystemExit(128 + signum)  # unwinds the training loop; the logger's close commits

            signal.signal(signal.SIGTERM, on_sigterm)
        except (ValueError, OSError):  # not allowed here (embedded interpreters)
            return
        self._installed = (on_sigterm, previous)

    def restore(self) -> None:
        """Put the previous handler back, if ours is still the one installed."""
        if self._installed is None:
            return
        handler, previous = self._installed
        if threading.current_thread() is not threading.main_thread():
            return  # (closed from another thread, e.g. at exit: the process is ending anyway)
        self._installed = None
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is handler:
                signal.signal(signal.SIGTERM, previous)
