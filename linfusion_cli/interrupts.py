"""Ctrl-C, SIGTERM and SIGHUP end a run the same way: cleanly, with finished files kept.

The CLI installs `handle` for the three signals; library code marks the few steps that must not be
cut in half (publishing a file, removing a temp file) with `critical()`, and a signal arriving there
is raised right after the step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                            getattr(signal, "SIGHUP", None)) if s is not None)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; exit code 128 + signum (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = threading.local()
received: list[int] = []  # every signal taken, in order (the CLI reports the first)


def _depth() -> int:
    return getattr(_state, "depth", 0)


def handle(signum: int, frame=None) -> None:
    """Signal handler: raise Interrupted now, or right after the critical step in progress."""
    received.append(signum)
    if _depth() > 0:
        _state.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A step a signal must not cut in half; a signal that arrives meanwhile is raised after it."""
    _state.depth = _depth() + 1
    try:
        yield
    finally:
        _state.depth -= 1
        pending = getattr(_state, "pending", None)
        if _depth() == 0 and pending is not None:
            _state.pending = None
            raise Interrupted(pending)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """`handle` for SIGINT/SIGTERM/SIGHUP while the block runs (main thread only), then the old ones."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    received.clear()
    for s in SIGNALS:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
