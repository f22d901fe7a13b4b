"""SIGINT (Ctrl-C) and SIGTERM as exceptions that never land inside a checkpoint write.

:func:`signals_as_interrupts` turns both signals into exceptions in the main thread (``Terminated``
for SIGTERM, ``KeyboardInterrupt`` for SIGINT). Inside :func:`uninterrupted` (around a checkpoint
write) a signal is held back and raised as soon as the block ends, so the write completes and the
run stops with its newest checkpoint whole.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


_state = {"depth": 0, "pending": None}


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):  # pylint: disable=unused-argument
    if _state["depth"]:
        _state["pending"] = _state["pending"] or signum
        return
    raise _exception(signum)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Handle SIGINT and SIGTERM as described in the module docstring (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends (then raise the first one that came)."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        pending: Optional[int] = _state["pending"]
        if not _state["depth"] and pending is not None:
            _state["pending"] = None
            raise _exception(pending)


__all__ = ["Terminated", "signals_as_interrupts", "uninterrupted"]
