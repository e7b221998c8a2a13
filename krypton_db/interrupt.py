"""Ctrl-C that always cancels a running statement.

Inside :func:`cancellable`, SIGINT raises ``KeyboardInterrupt`` as usual and also sets a flag
that long loops poll with :func:`check_cancelled` (the occlusion driver, after every batch).
The flag is what makes cancelling reliable: an interrupt that lands inside a library which
catches it (numba's compiler does, while it compiles a kernel) would otherwise be lost and the
statement would run to its end.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_REQUESTED = threading.Event()


def _handler(signum, frame):
    _REQUESTED.set()
    raise KeyboardInterrupt


@contextmanager
def cancellable():
    """SIGINT during the block cancels it (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _REQUESTED.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _REQUESTED.clear()


def check_cancelled() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed inside :func:`cancellable`."""
    if _REQUESTED.is_set():
        raise KeyboardInterrupt
