import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _zoo_cache(tmp_path_factory):
    """Zoo models are generated once per machine into the user cache (outside the repo);
    KRYPTON_CACHE redirects it when set by the caller."""
    yield


def run_on_avx2(code: str, cache_dir) -> None:
    """Run ``code`` (which prints 'ok' last) in a subprocess whose numba targets an AVX2-only
    CPU (haswell: 8-float vectors, 16 registers; the GEMM tile shapes follow
    ``KRYPTON_GEMM_VL=8``) with a numba cache of its own (the cache key does not hold the
    override), the tests directory importable."""
    import os

    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(cache_dir), KRYPTON_GEMM_VL="8",
               NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+sse4.2,+popcnt,+bmi,+bmi2,+f16c",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# each CPU algorithm module's switch in ``planner.algorithms``
SWITCHES = {"winograd_cpu": "WINOGRAD", "winograd4_cpu": "WINOGRAD4", "winograd1d_cpu": "WINOGRAD1D"}


def assert_switch_gives_direct(monkeypatch, module, g, x) -> None:
    """A Winograd module (``winograd_cpu`` / ``winograd1d_cpu``) switched off via its flag in
    ``planner.algorithms`` is not called, and both routes equal the float64 reference."""
    from krypton_db.exec import cpu as C
    from krypton_db.exec import reference
    from krypton_db.planner import algorithms

    got_w = C.CpuExecutor(g).predict(x)
    monkeypatch.setattr(algorithms, SWITCHES[module.__name__.rsplit(".", 1)[-1]], False)
    calls = []
    real = module.conv
    monkeypatch.setattr(module, "conv", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    got_d = C.CpuExecutor(g).predict(x)
    assert not calls
    want = reference.run(g, x)[g.output]
    assert rel_err(got_w, want) <= 1e-5 and rel_err(got_d, want) <= 1e-5


@pytest.fixture(scope="session")
def tiny_nets(tmp_path_factory):
    """name -> (model, image [H, W, 3] in [0, 1]) for the small VGG-, ResNet- and
    Inception-like nets of test_occlusion (ONNX files in a temp dir)."""
    import onnx
    from test_occlusion import NETS

    import krypton_db as kdb

    d = tmp_path_factory.mktemp("tiny_nets")
    out = {}
    for name, fn in NETS.items():
        m, (h, w) = fn()
        onnx.save(m, d / f"{name}.onnx")
        out[name] = (kdb.load_model(d / f"{name}.onnx"),
                     np.random.default_rng(3).random((h, w, 3)).astype(np.float32))
    return out


@contextmanager
def held_by_another_process(path):
    """A DuckDB connection to the file ``path`` held open in another process for the block
    (what a busy catalog looks like to a reader)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('held', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
