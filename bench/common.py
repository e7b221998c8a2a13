"""Shared benchmark helpers: machine line, medians, ORT sessions, peak RSS, the oracle check."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time


# a benchmark whose output differs from its oracle by more than this reports no time
ORACLE_TOL = 1e-4


def cpu_isa() -> str:
    """The widest vector ISA the kernels can use here: AVX-512 (avx512f) or AVX2."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")


def check_oracle(what: str, got, want, tol: float = ORACLE_TOL) -> float:
    """Max abs difference of ``got`` from the oracle's ``want``; exits the benchmark (no time
    is reported) when it exceeds ``tol`` or the shapes differ."""
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise SystemExit(f"ORACLE CHECK FAILED: {what}: shape {got.shape} vs the oracle's {want.shape}")
    err = float(np.abs(got - want).max()) if got.size else 0.0
    if not err <= tol:  # also catches NaN
        raise SystemExit(f"ORACLE CHECK FAILED: {what}: max |diff| {err:.3g} > {tol:g}; no time reported")
    return err


def machine_line() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba
    import numpy as np
    import onnxruntime as ort

    try:
        from threadpoolctl import threadpool_info

        blas = ",".join(f"{i['internal_api']}:{i.get('architecture')}x{i['num_threads']}"
                        for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        blas = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = "?"
    return (f"{cpu} ({cpu_isa()}), {os.cpu_count()} cores, Python {platform.python_version()}, numpy "
            f"{np.__version__} (BLAS {blas}), numba {numba.__version__}, onnxruntime "
            f"{ort.__version__}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, "
            f"conv GEMM {os.environ.get('KRYPTON_GEMM', 'own')}, commit {commit}")


def median_time(fn, repeat: int = 3) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ort_session(path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def occluded_batch(m, image, positions, patch: int):
    """The model inputs of ``image`` with a black ``patch`` at each (y, x) of ``positions``
    (the model's layout, one row per position): what ORT-naive re-inference runs."""
    import numpy as np

    from krypton_db.images import color_to_input

    x = m.preprocess(image)
    col = color_to_input(0.0, m.spec)
    b = np.repeat(x[None], len(positions), axis=0)
    for k, (y, xx) in enumerate(positions):
        if m.layout == "NHWC":
            b[k, y : y + patch, xx : xx + patch, :] = col
        else:
            b[k, :, y : y + patch, xx : xx + patch] = col[:, None, None]
    return b


def ort_target_probs(m, sess, batches, target: int):
    """ONNX Runtime on each input batch of ``batches``: (the target class's probability per
    row, softmax applied when the model ends in logits; seconds inside ``sess.run`` only)."""
    import numpy as np

    name = sess.get_inputs()[0].name
    out, secs = [], 0.0
    for b in batches:
        t = time.perf_counter()
        y = sess.run(None, {name: b})[0]
        secs += time.perf_counter() - t
        if not m.ends_in_softmax:
            y = np.exp(y - y.max(1, keepdims=True))
            y /= y.sum(1, keepdims=True)
        out.append(y[:, target])
    return np.concatenate(out), secs
