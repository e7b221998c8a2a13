"""Materialized views that outlive one query: per model, the views (every step's output for an
unoccluded input) of recently explained inputs, least recently used first out, bounded in
bytes.

Invariants:
- A key is (the plan's value names, the input's shape, a digest of its bytes): the views of
  one graph on one input. Patch size, positions, stride, tau and colour do not change them.
- Cached arrays are private copies (never the executor's reusable buffers) and read-only by
  contract: the incremental executor gathers and stitches out of them, never into them (the
  writeable flag stays set: numba would compile every kernel again for read-only arrays).
- ``budget`` 0 turns the cache off; entries larger than the budget are not kept.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np

DEFAULT_BUDGET = 512 << 20  # bytes per model
_paused = 0  # > 0 inside ``paused()``: every cache of the process misses and keeps nothing


@contextmanager
def paused():
    """A scope in which every view cache misses and keeps nothing (e.g. a warm-up run that must
    not turn the next, measured query into a cache hit)."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def input_key(names: tuple[str, ...], x: np.ndarray) -> tuple:
    xc = np.ascontiguousarray(x, np.float32)
    return names, xc.shape, hashlib.blake2b(xc.tobytes(), digest_size=20).digest()


class ViewCache:
    def __init__(self, budget: int = DEFAULT_BUDGET):
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, tuple[dict, np.ndarray, int]] = OrderedDict()
        self.budget = int(budget)
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple):
        """(views, output) of ``key``, or None; a hit becomes the most recently used."""
        with self._lock:
            hit = None if _paused else self._entries.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return hit[0], hit[1]

    def put(self, key: tuple, views: dict, output: np.ndarray) -> tuple[dict, np.ndarray]:
        """Keep private read-only copies of ``views`` and ``output`` (when they fit the budget);
        returns the arrays the caller should use from now on."""
        size = sum(v.nbytes for v in views.values()) + output.nbytes
        if size > self.budget or _paused:
            return views, output
        kept = {k: np.array(v, copy=True) for k, v in views.items()}
        out = np.array(output, copy=True)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            self._entries[key] = (kept, out, size)
            self.bytes += size
            self._evict()
        return kept, out

    def set_budget(self, budget: int) -> None:
        with self._lock:
            self.budget = int(budget)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return dict(entries=len(self._entries), bytes=self.bytes, budget=self.budget,
                        hits=self.hits, misses=self.misses)

    def _evict(self) -> None:
        while self._entries and self.bytes > self.budget:
            _, (_, _, size) = self._entries.popitem(last=False)
            self.bytes -= size
