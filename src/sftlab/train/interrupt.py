"""Stop cleanly on SIGTERM / SIGINT: finish the step, save a checkpoint, exit 0.

Clusters preempt jobs with SIGTERM and people press Ctrl-C; either way the step in flight is
finished, a checkpoint is written and `sftlab train --resume` continues exactly there. A second
Ctrl-C stops at once (KeyboardInterrupt), falling back to the last checkpoint.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """A flag the signal handlers raise; restored to the previous handlers on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal is not None
