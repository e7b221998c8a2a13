"""Handing freed heap back to the OS between the phases of a run.

glibc keeps freed heap pages resident, and later large arrays get fresh mmaps, so memory one
phase freed (the parsed ONNX protobuf after import; LLVM's temporaries after the numba
kernels are compiled or loaded) would still count in the next phase's peak RSS: a ResNet18
explanation peaked ~40 MB higher without the trim after import; the trim after warm-up hands
back ~45 MB of the resident set before the first run. No-op where glibc is not the allocator.

``pin_mmap_threshold``: glibc serves a request from mmap (returned to the OS on free) only above
a threshold it *raises* each time such a block is freed, up to 32 MiB; a batch's buffers of a
few MB then land on the heap, whose freed holes stay resident, and the peak RSS of the same
run varied 520-650 MB (ResNet18 exact). A fixed 4 MiB threshold (``mallopt``) keeps blocks
above it in mmap: peak 483-551 MB (median 499) over seven runs, same time (the executors'
arenas reuse their big buffers, so few fresh mmaps are faulted in per batch). The CPU
executor pins it once; ``KRYPTON_MMAP_THRESHOLD`` (bytes; 0 leaves glibc's dynamic
threshold) overrides."""

from __future__ import annotations

import ctypes
import gc
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 4 << 20
_pinned = False


def return_freed_heap(collect: bool = True) -> None:
    """``gc.collect()`` (unless ``collect`` is False: a full collection costs tens of ms in a
    process holding a model's objects), then glibc ``malloc_trim(0)``."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pin_mmap_threshold() -> None:
    """Fix glibc's mmap threshold (once per process; see the module doc)."""
    global _pinned
    if _pinned:
        return
    _pinned = True
    value = int(os.environ.get("KRYPTON_MMAP_THRESHOLD", MMAP_THRESHOLD))
    if value <= 0:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, value)
    except (OSError, AttributeError):
        pass
