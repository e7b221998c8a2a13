"""Ctrl-C that always cancels a running statement.

Inside :func:`cancellable`, SIGINT raises ``KeyboardInterrupt`` as usual and also sets a flag
that long loops poll with :func:`check_cancelled` (the occlusion driver, after every batch).
The flag is what makes cancelling reliable: an interrupt that lands inside a library which
catches it (numba's compiler does, while it compiles a kernel) would otherwise be lost and the
statement would run to its end.

While this (main) thread holds numba's compiler lock (compiling, or loading a cached kernel),
the handler only sets the flag: a ``KeyboardInterrupt`` raised between the lock's acquire and
its ``with`` block taking hold would leak the lock, and the kernels' worker threads, which
compile too, would then wait for it forever (a hang seen when Ctrl-C landed during the JIT).
The run stops at its next ``check_cancelled`` instead. Likewise inside :func:`uninterrupted`
(the thread pool's hand-out and collection of one kernel's parts: an exception between a
worker's report leaving the queue and the count that it arrived would lose the report and
leave the caller waiting forever).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

_REQUESTED = threading.Event()
_critical = 0  # depth of uninterrupted() blocks on the main thread


def _handler(signum, frame):
    _REQUESTED.set()
    if _critical or _compiling():
        return  # deferred: see the module docstring
    raise KeyboardInterrupt


def _compiling() -> bool:
    """Does this thread hold numba's global compiler lock?"""
    lock_module = sys.modules.get("numba.core.compiler_lock")
    return lock_module is not None and lock_module.global_compiler_lock.is_locked()


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


@contextmanager
def uninterrupted():
    """Ctrl-C inside :func:`cancellable` does not raise during the block (main thread); the
    caller calls :func:`check_cancelled` after it."""
    global _critical
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
