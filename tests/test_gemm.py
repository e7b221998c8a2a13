"""Our tap GEMM (exec/gemm_cpu.py) against numpy in float64: every edge of the blocking (rows
past a multiple of MR, columns past NR and NC, K past KC), tap offsets, accumulation into a
strided output view, and the OpenBLAS lowering it replaced."""

import numpy as np
import pytest

from krypton_db.exec import conv_cpu
from krypton_db.exec import gemm_cpu as G


def _ref(w, src, offs, col0, ncols):
    """sum_{c, t} W[:, c*T + t] * src[c, col0 + offs[t] : ... + ncols] in float64."""
    t = len(offs)
    rows = np.stack([src[c, col0 + o : col0 + o + ncols] for c in range(src.shape[0]) for o in offs])
    assert rows.shape[0] == w.shape[1] == src.shape[0] * t
    return w.astype(np.float64) @ rows.astype(np.float64)


@pytest.mark.parametrize("m", [1, G.MR - 1, G.MR, G.MR + 1, 3 * G.MR + 5])
@pytest.mark.parametrize("ncols", [1, G.NR - 1, G.NR, G.NR + 1, G.NC + G.NR + 3])
def test_plain_gemm_edges(m, ncols):
    rng = np.random.default_rng(m * 1000 + ncols)
    k = G.KC + 7  # two K blocks, the second partial
    w = rng.standard_normal((m, k)).astype(np.float32)
    src = rng.standard_normal((k, ncols + 5)).astype(np.float32)
    out = np.full((m, ncols), np.nan, np.float32)
    G.tap_gemm(G.pack_weights(w), m, src, np.zeros(1, np.int64), 2, ncols, out)
    np.testing.assert_allclose(out, _ref(w, src, [0], 2, ncols), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c,taps", [(1, 9), (5, 9), (40, 9), (3, 1), (29, 3)])
def test_tap_offsets_and_accumulate(c, taps):
    rng = np.random.default_rng(c * 10 + taps)
    m, ncols = 13, 101
    offs = np.sort(rng.choice(40, taps, replace=False)).astype(np.int64)
    w = rng.standard_normal((m, c * taps)).astype(np.float32)
    src = rng.standard_normal((c, 160)).astype(np.float32)
    base = rng.standard_normal((m, 128)).astype(np.float32)
    out = base.copy()
    view = out[:, 7 : 7 + ncols]  # a strided view: row stride 128, not ncols
    G.tap_gemm(G.pack_weights(w), m, src, offs, 3, ncols, view, accumulate=True)
    want = base.astype(np.float64)
    want[:, 7 : 7 + ncols] += _ref(w, src, offs, 3, ncols)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    # columns outside the view are untouched
    np.testing.assert_array_equal(out[:, :7], base[:, :7])
    np.testing.assert_array_equal(out[:, 7 + ncols :], base[:, 7 + ncols :])


_ACTS = {  # kernels_cpu codes -> (a0, a1, float64 reference)
    0: (0.0, 0.0, lambda v: v),
    1: (0.0, 0.0, lambda v: np.maximum(v, 0.0)),
    2: (-0.5, 0.75, lambda v: np.clip(v, -0.5, 0.75)),
    3: (0.1, 0.0, lambda v: np.where(v >= 0, v, 0.1 * v)),
    4: (0.0, 0.0, lambda v: 1.0 / (1.0 + np.exp(-v))),
    5: (0.2, 0.5, lambda v: np.clip(0.2 * v + 0.5, 0.0, 1.0)),
    6: (0.0, 0.0, lambda v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0)),
}


@pytest.mark.parametrize("code", sorted(_ACTS))
@pytest.mark.parametrize("m,ncols,accumulate", [(G.MR, G.NR, False), (2 * G.MR + 3, G.NC + G.NR + 3, False),
                                                (G.MR + 1, 2 * G.NR - 5, True)])
def test_fused_bias_activation(code, m, ncols, accumulate):
    """The epilogue act(out + bias) applied in the tiles' last K block equals the plain GEMM
    followed by the activation, at full and edge tiles, over two K blocks, accumulating into
    a strided view; columns outside the view untouched."""
    rng = np.random.default_rng(code * 100 + m)
    k = G.KC + 9
    a0, a1, f = _ACTS[code]
    w = rng.standard_normal((m, k)).astype(np.float32) / 8
    src = rng.standard_normal((k, ncols + 4)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    base = rng.standard_normal((m, ncols + 6)).astype(np.float32)
    out = base.copy()
    view = out[:, 3 : 3 + ncols]
    G.tap_gemm(G.pack_weights(w), m, src, np.zeros(1, np.int64), 1, ncols, view, accumulate=accumulate,
               bias=bias, act=(code, np.float32(a0), np.float32(a1)))
    pre = _ref(w, src, [0], 1, ncols) + bias[:, None]
    if accumulate:
        pre += base[:, 3 : 3 + ncols]
    np.testing.assert_allclose(view, f(pre), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out[:, :3], base[:, :3])
    np.testing.assert_array_equal(out[:, 3 + ncols :], base[:, 3 + ncols :])


@pytest.mark.parametrize("code", range(8))
def test_in_register_epilogue_equals_the_separate_pass(code):
    """Full micro-tiles apply bias + activation in the micro-kernel's registers (exp-based
    codes and edge tiles in a pass over the tile): bit for bit what the plain GEMM followed by
    ``kernels_cpu``'s row pass gives, so the fused and unfused routes of a model agree
    exactly."""
    from krypton_db.exec import kernels_cpu

    rng = np.random.default_rng(code)
    a0, a1 = {2: (-0.3, 0.4), 3: (0.1, 0.0), 5: (0.2, 0.5), 7: (0.7, 0.0)}.get(code, (0.0, 0.0))
    act = (code, np.float32(a0), np.float32(a1))
    for m, k, ncols, accumulate in [(2 * G.MR, 27, 5 * G.NR, False), (2 * G.MR + 3, 40, 3 * G.NR + 7, True)]:
        wp = G.pack_weights(rng.standard_normal((m, k)).astype(np.float32))
        src = rng.standard_normal((k, ncols)).astype(np.float32)
        bias = rng.standard_normal(m).astype(np.float32)
        start = rng.standard_normal((m, ncols)).astype(np.float32)
        fused, ref = start.copy(), start.copy()
        G.tap_gemm(wp, m, src, np.zeros(1, np.int64), 0, ncols, fused, accumulate, bias=bias, act=act)
        G.tap_gemm(wp, m, src, np.zeros(1, np.int64), 0, ncols, ref, accumulate)
        kernels_cpu.bias_act_rows_cpu(ref, bias, *act)
        np.testing.assert_array_equal(fused, ref)


def test_reads_past_the_source_are_refused():
    w = np.ones((8, 4), np.float32)
    src = np.ones((4, 50), np.float32)
    out = np.empty((8, 48), np.float32)
    with pytest.raises(ValueError, match="reads past src"):
        G.tap_gemm(G.pack_weights(w), 8, src, np.array([5], np.int64), 0, 48, out)


def test_own_gemm_matches_the_openblas_lowering(monkeypatch):
    """conv_gemm through our kernel and through one OpenBLAS sgemm per tap agree."""
    rng = np.random.default_rng(3)
    node_w = rng.standard_normal((24, 10, 3, 3)).astype(np.float32)
    cw = conv_cpu.ConvWeights([np.ascontiguousarray(node_w.reshape(24, -1))], np.zeros(24, np.float32), node_w)
    src = rng.standard_normal((10, 300)).astype(np.float32)
    offs = np.array([i * 20 + j for i in range(3) for j in range(3)], np.int64)
    outs = {}
    for mode in ("own", "openblas"):
        monkeypatch.setattr(conv_cpu, "GEMM", mode)
        outs[mode] = np.empty((24, 200), np.float32)
        conv_cpu.conv_gemm(cw, 0, src, offs, 4, 200, outs[mode])
    np.testing.assert_allclose(outs["own"], outs["openblas"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(outs["own"], _ref(cw.mats[0], src, offs, 4, 200), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_avx2_tile_shape_in_a_subprocess(tmp_path):
    """The 6 x 16 AVX2 micro-tile (chosen on hosts without AVX-512) gives the same results;
    forced here in a child process with its own numba cache."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from krypton_db.exec import gemm_cpu as G\n"
        "assert (G.VL, G.MR, G.NR) == (8, 6, 16), (G.VL, G.MR, G.NR)\n"
        "rng = np.random.default_rng(0)\n"
        "w = rng.standard_normal((13, 7 * 9)).astype(np.float32)\n"
        "src = rng.standard_normal((7, 300)).astype(np.float32)\n"
        "offs = np.array([i * 20 + j for i in range(3) for j in range(3)], np.int64)\n"
        "out = np.empty((13, 201), np.float32)\n"
        "G.tap_gemm(G.pack_weights(w), 13, src, offs, 5, 201, out)\n"
        "rows = np.stack([src[c, 5 + o : 5 + o + 201] for c in range(7) for o in offs])\n"
        "err = np.abs(out - w.astype(np.float64) @ rows).max()\n"
        "assert err < 1e-4, err\n"
        "b = rng.standard_normal(13).astype(np.float32)\n"  # epilogue in the 6 x 16 registers
        "G.tap_gemm(G.pack_weights(w), 13, src, offs, 5, 201, out, bias=b, act=(6, np.float32(0), np.float32(0)))\n"
        "v = w.astype(np.float64) @ rows + b[:, None]\n"
        "err = np.abs(out - v * np.clip(v / 6 + 0.5, 0, 1)).max()\n"
        "assert err < 1e-4, err\n"
        "print('ok', err)\n"
    )
    env = dict(os.environ, KRYPTON_GEMM_VL="8", NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]
    # without a cache of its own the override is refused, naming what is allowed
    env.pop("NUMBA_CACHE_DIR")
    r = subprocess.run([sys.executable, "-c", "import krypton_db.exec.gemm_cpu"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "allowed 8 or 16" in r.stderr
