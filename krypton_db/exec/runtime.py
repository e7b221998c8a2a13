"""The CPU runtime every kernel and executor shares: one persistent thread pool and the
per-thread scratch buffers.

Invariant: one pool serves every kernel (BLAS runs single-threaded inside it), so no second
thread pool ever spins against it; kernels import this module, never an executor.
"""

from __future__ import annotations

import math
import queue
import threading
from contextlib import contextmanager

import numba
import numpy as np

from ..interrupt import check_cancelled, uninterrupted

class _Pool:
    """Persistent worker threads; ``run(fn, t)`` calls fn(0) here and fn(1..t-1) on workers.

    One pool serves every kernel (see ``kernels_cpu``: BLAS runs single-threaded inside it), so
    no second thread pool ever spins against it. A call made while the pool is busy (another
    caller thread, or nested use) runs its parts serially on the calling thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queues: list[queue.SimpleQueue] = []
        self._done: queue.SimpleQueue = queue.SimpleQueue()

    def _worker(self, q: queue.SimpleQueue) -> None:
        while True:
            fn, tid = q.get()
            try:
                fn(tid)
                self._done.put(None)
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller
                self._done.put(e)

    def run(self, fn, nthreads: int) -> None:
        if nthreads <= 1 or not self._lock.acquire(blocking=False):
            for t in range(max(nthreads, 1)):
                fn(t)
            return
        try:
            with uninterrupted():  # every part handed out is collected (see interrupt.py)
                err = self._run_parts(fn, nthreads)
            if err is not None:
                raise err
            check_cancelled()  # a Ctrl-C deferred during the parts
        finally:
            self._lock.release()

    def _run_parts(self, fn, nthreads: int) -> BaseException | None:
        while len(self._queues) < nthreads - 1:
            q: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._worker, args=(q,), daemon=True,
                             name=f"krypton-cpu-{len(self._queues) + 1}").start()
            self._queues.append(q)
        for t in range(1, nthreads):
            self._queues[t - 1].put((fn, t))
        err = None
        try:
            fn(0)
        except BaseException as e:  # noqa: BLE001 - re-raised by run, once all parts reported
            err = e
        # Every worker must report before the pool is released: a report left in the queue
        # would end the next call's wait early. (Outside cancellable() a Ctrl-C still raises
        # here; it is caught and the wait goes on.)
        pending = nthreads - 1
        while pending:
            try:
                r = self._done.get()
            except KeyboardInterrupt as e:
                err = err or e
                continue
            pending -= 1
            if err is None and r is not None:
                err = r
        return err

_POOL = _Pool()
_TLS = threading.local()


def num_threads() -> int:
    return max(1, numba.get_num_threads())


def run_parts(fn, nparts: int) -> None:
    """fn(i) for i in range(nparts), one part per pool thread (serially on the calling
    thread when the pool is busy: nested use)."""
    _POOL.run(fn, nparts)


def parallel_chunks(nchunks: int, fn) -> None:
    """fn(i) for i in range(nchunks), spread dynamically over the pool's threads."""
    it = iter(range(nchunks))  # next() on a range iterator is atomic under the GIL

    def work(_tid):
        for i in it:
            fn(i)

    _POOL.run(work, min(num_threads(), nchunks))


def balanced_chunks(n: int, cap: int, align: int = 1) -> tuple[int, int]:
    """(units per chunk, chunk count) splitting n units into chunks of about ``cap`` units
    (up to 1.5x where aligned widths need it; a multiple of ``align`` where possible) with a
    chunk count that is a multiple of the thread count, so no core idles through a last
    partial round: 1024 Winograd columns at a cap of 480, aligned to 48, are 4 chunks of 288
    on 2 threads, not 3 of 384 (one thread doing two of them)."""
    if n <= 0:
        return max(align, 1), 0
    def ceil(x, y):
        return -(-x // y)

    t = num_threads()
    a = max(align, 1)
    nch = min(ceil(ceil(n, max(cap, 1)), t) * t, max(n // a, 1))
    per0 = ceil(ceil(n, nch), a) * a if ceil(n, nch) > a else ceil(n, nch)
    if nch < t:  # fewer aligned units than threads: one chunk (49 columns are not 48 + 1)
        return per0, ceil(n, per0)
    # aligned widths can leave a chunk count off the thread multiple: look for the nearest
    # aligned width (narrower first, then up to 1.5x wider) that lands on one
    for per in [*range(per0, max(a, per0 // 2) - 1, -a), *range(per0 + a, per0 * 3 // 2 + 1, a)]:
        if ceil(n, per) % t == 0:
            return per, ceil(n, per)
    return per0, ceil(n, per0)


def parallel_ranges(n: int, fn, min_size: int = 1) -> None:
    """fn(lo, hi) over an even split of range(n) into one contiguous part per thread."""
    t = max(1, min(num_threads(), n // max(min_size, 1)))
    if t <= 1:
        if n > 0:
            fn(0, n)
        return
    bounds = [n * i // t for i in range(t + 1)]
    _POOL.run(lambda i: fn(bounds[i], bounds[i + 1]), t)


def scratch(key: str, size: int) -> np.ndarray:
    """A per-thread float32 work buffer of at least ``size`` values (kept between calls, so
    the pages are faulted in once).

    Keys are roles, not call sites, so buffers that are never live at once share memory:
    ``dense_in`` / ``dense_out`` (the calling thread's whole-batch transposes of one dense conv:
    CHWB read-in, Winograd band, phase planes, and their outputs; inside ``step_scratch``
    they come from the incremental batch arena instead), ``work`` (one parallel chunk's
    im2col columns, shifted-GEMM accumulator or Winograd V/M slots), ``acc`` (beside ``work``
    in the shifted-window conv), ``wino4_tmp`` (F(4x4, 3x3)'s per-tile staging),
    ``gemm_bp`` / ``gemm_tile`` (inside the tap GEMM, which any of the others may call) and
    ``gather_blk`` / ``gather_patch`` (the gather's 16-query blocks). Keeping one buffer per call site held ResNet18's
    exact run ~14 MB more for buffers never live together."""
    d = getattr(_TLS, "bufs", None)
    if d is None:
        d = _TLS.bufs = {}
    b = d.get(key)
    if b is None or b.size < size:
        b = d[key] = np.empty(max(size, 1), np.float32)
    return b[:size]


def scratch_as(key: str, shape) -> np.ndarray:
    """``scratch`` shaped as ``shape`` (C-contiguous); inside ``step_scratch`` the
    whole-batch keys (``dense_in`` / ``dense_out``) come from that step's allocator."""
    step = getattr(_TLS, "step", None)
    if step is not None and key in _STEP_KEYS:
        return step.get(key, shape)
    return scratch(key, math.prod(shape)).reshape(shape)


_STEP_KEYS = ("dense_in", "dense_out")


class _StepScratch:
    """One step's ``dense_in`` / ``dense_out`` buffers from an allocator (a band loop reuses
    the first band's buffer)."""

    def __init__(self, alloc):
        self.alloc = alloc
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, key: str, shape) -> np.ndarray:
        n = math.prod(shape)
        b = self.bufs.get(key)
        if b is None or b.size < n:
            b = self.bufs[key] = self.alloc((n,))
        return b[:n].reshape(shape)


@contextmanager
def step_scratch(alloc):
    """Within this scope the calling thread's dense convs and pools take their whole-batch
    transpose buffers from ``alloc`` instead of the thread's persistent scratch: the
    incremental executor passes its batch arena's allocator, so those buffers share the
    planned slab with the batch's other dead buffers (ResNet18's layer4 held 12 MB of
    persistent ``dense_in`` / ``dense_out`` beside the slab)."""
    prev = getattr(_TLS, "step", None)
    _TLS.step = _StepScratch(alloc)
    try:
        yield
    finally:
        _TLS.step = prev
