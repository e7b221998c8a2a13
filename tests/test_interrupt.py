"""Ctrl-C inside cancellable(): raised at once, except where raising would leave the process
stuck (holding numba's compiler lock, or between the thread pool handing out a kernel's parts
and collecting them); there it is deferred to check_cancelled. A hang of `krypton sql` on
Ctrl-C during the JIT came from exactly these two places."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from numba.core.compiler_lock import global_compiler_lock

from krypton_db.exec import runtime
from krypton_db.interrupt import cancellable, check_cancelled, uninterrupted


def test_ctrl_c_raises_at_once_in_ordinary_code():
    with cancellable(), pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    check_cancelled()  # the flag ends with the block


def test_ctrl_c_holding_the_compiler_lock_is_deferred():
    with cancellable():
        with global_compiler_lock:
            signal.raise_signal(signal.SIGINT)  # no exception here: the lock would leak
        assert not global_compiler_lock.is_locked()
        with pytest.raises(KeyboardInterrupt):
            check_cancelled()


def test_ctrl_c_during_a_pool_run_stops_after_every_part_reported():
    seen = []

    def part(t):
        if t == 0:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the workers hold their parts
        seen.append(t)

    with cancellable():
        with pytest.raises(KeyboardInterrupt):
            runtime._POOL.run(part, 2)
        assert sorted(seen) == [0, 1]
    out = np.zeros(4)  # the pool is free and has no stale report: the next run waits for all

    def fill(t):
        out[2 * t:2 * t + 2] = t + 1

    runtime._POOL.run(fill, 2)
    assert out.tolist() == [1, 1, 2, 2]


def test_uninterrupted_defers_only_inside_cancellable():
    with cancellable():
        with uninterrupted():
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            check_cancelled()
    with pytest.raises(KeyboardInterrupt), uninterrupted():
        signal.raise_signal(signal.SIGINT)  # Python's own handler outside cancellable
