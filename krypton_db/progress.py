"""A progress bar on stderr for long statements (``SET progress = true``, ``--progress``)."""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    """A progress bar with ETA on stderr (positions done / total), or a spinner with elapsed
    time while the total is unknown or nothing has been reported yet. ``update`` fits
    :attr:`krypton_db.hooks.OcclusionHooks.on_batch`."""

    FRAMES = "|/-\\"

    def __init__(self, label: str, stream=None, interval: float = 0.2):
        self.label = label
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.done, self.total = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._k = 0
        self._thread.start()

    def update(self, done: int, total: int | None) -> None:
        self.done, self.total = done, total

    def _line(self) -> str:
        el = time.perf_counter() - self.t0
        if self.total and self.done:
            frac = min(self.done / self.total, 1.0)
            eta = el / frac - el
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            return (f"{self.label} [{bar}] {100 * frac:5.1f}% {self.done}/{self.total} "
                    f"positions  {el:.1f}s  ETA {eta:.1f}s")
        self._k += 1
        return f"{self.label} {self.FRAMES[self._k % 4]} {el:.1f}s"

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.stream.write("\r" + self._line()[:120] + "\033[K")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if time.perf_counter() - self.t0 >= 0.2:
            self.stream.write("\r\033[K")
            self.stream.flush()
