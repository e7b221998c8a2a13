"""The OpenBLAS that numpy loaded, bound through ctypes: ``gemm`` (sgemm on float32 views)
and ``single_threaded_blas`` (BLAS stays single-threaded inside our own thread pool, so no
second pool spins against it). ``HAVE_BLAS`` is False where numpy's BLAS is not OpenBLAS.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np


def _find_openblas():
    """(sgemm, set_threads, get_threads) of the OpenBLAS numpy loaded, or None."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1]
                if "openblas" in p.lower() and p not in paths:
                    paths.append(p)
    except OSError:
        return None
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for prefix, suffix, i64 in (("scipy_", "64_", True), ("", "64_", True), ("scipy_", "", False), ("", "", False)):
            name = f"{prefix}cblas_sgemm{suffix}"
            if not hasattr(lib, name):
                continue
            it = ctypes.c_int64 if i64 else ctypes.c_int
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, it, it, it, ctypes.c_float,
                           ctypes.c_void_p, it, ctypes.c_void_p, it, ctypes.c_float, ctypes.c_void_p, it]
            setn = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            getn = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            if setn is not None:
                setn.argtypes = [ctypes.c_int]
                setn.restype = None
            if getn is not None:
                getn.argtypes = []
                getn.restype = ctypes.c_int
            return fn, setn, getn
    return None


_BLAS = _find_openblas()
HAVE_BLAS = _BLAS is not None
_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved = 1


class single_threaded_blas:
    """Context: OpenBLAS runs each call on the calling thread only (the executor's own threads
    provide the parallelism). Nestable and thread safe; restores the previous count."""

    def __enter__(self):
        global _blas_depth, _blas_saved
        if _BLAS is None or _BLAS[1] is None or _BLAS[2] is None:
            return self
        with _blas_lock:
            if _blas_depth == 0:
                _blas_saved = _BLAS[2]()
                if _blas_saved != 1:
                    _BLAS[1](1)
            _blas_depth += 1
        return self

    def __exit__(self, *exc):
        global _blas_depth
        if _BLAS is None or _BLAS[1] is None or _BLAS[2] is None:
            return False
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0 and _blas_saved != 1:
                _BLAS[1](_blas_saved)
        return False


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, beta: float = 0.0) -> None:
    """``c = a @ b + beta * c`` on float32 2-D views whose rows are unit-stride (any row
    stride): a [M, K], b [K, N], c [M, N]."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    if _BLAS is not None and a.strides[1] == b.strides[1] == c.strides[1] == 4 and k > 0:
        _BLAS[0](101, 111, 111, m, n, k, 1.0, a.ctypes.data, max(a.strides[0] // 4, k, 1),
                 b.ctypes.data, max(b.strides[0] // 4, n, 1), float(beta), c.ctypes.data,
                 max(c.strides[0] // 4, n, 1))
        return
    if beta == 0.0:
        np.matmul(a, b, out=c)
    else:
        c += a @ b
