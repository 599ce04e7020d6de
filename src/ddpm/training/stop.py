"""Graceful stop: SIGINT (Ctrl-C) or SIGTERM (cluster pre-emption) end training after the step in
flight, with a checkpoint of that step.

While :class:`StopSignals` is active, the first SIGINT/SIGTERM only records the signal; the
trainer polls :attr:`StopSignals.signum` after every step. Work that may be dropped (the EMA
sample grid) runs inside :meth:`StopSignals.interruptible`, where the first signal raises
:class:`Interrupted` at once so that the stop is not delayed by a long sampling chain. A second
signal while a stop is pending raises :class:`Aborted` (a ``KeyboardInterrupt``) wherever the
program is: an atomic write in progress then removes its temporary file and the previous
checkpoint stays valid. Outside the main thread (where Python cannot install handlers) this
is a no-op and signals keep their default behaviour.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Raised inside :meth:`StopSignals.interruptible` by the first stop signal."""


class Aborted(KeyboardInterrupt):
    """A second stop signal: give up now. ``signum`` gives the exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a stop request (see module doc)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._interruptible = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        if self._interruptible:
            self._interruptible = False
            raise Interrupted(signal.Signals(signum).name)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block the first stop signal may cut short (raising :class:`Interrupted`)."""
        if self.signum is not None:
            raise Interrupted(signal.Signals(self.signum).name)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
