"""SIGTERM and SIGINT as one exception, raised where it is safe to stop.

Cloud TPU VMs and spot GPU machines are preempted with SIGTERM, a user stops with Ctrl-C. Both
become `Interrupted` (a KeyboardInterrupt, so `except Exception` handlers let it through and
every run is closed by its `finally`). Inside `deferred()` (the train loop) the signal is only
noted: the loop calls `check()` between steps, so it can checkpoint a state whose buffers are
whole, since a step donates its input state. A second signal while deferred stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by `signum`; exit with 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_pending: Optional[int] = None
_deferring = 0


def _handler(signum: int, frame) -> None:
    global _pending
    if _deferring and _pending is None:
        _pending = signum
        return
    _pending = None
    raise Interrupted(signum)


def install() -> None:
    """Route SIGTERM and SIGINT to `Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handler)


def requested() -> Optional[int]:
    """The signal noted while deferred, if any."""
    return _pending


def check() -> None:
    """Raise the noted signal, if one came while deferred."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Note signals instead of raising them; the caller polls `requested()` / `check()`."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def exit_code(error: BaseException) -> int:
    """128 + the signal for an Interrupted, 130 for a plain KeyboardInterrupt."""
    return error.exit_code if isinstance(error, Interrupted) else 128 + signal.SIGINT


__all__ = ["Interrupted", "check", "deferred", "exit_code", "install", "requested"]
