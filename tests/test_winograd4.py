"""Winograd F(4x4, 3x3) (exec/winograd4_cpu.py) against the float64 numpy reference executor:
its filter transform, the patch (CHWB) and dense (CNHW, banded) routes, outputs that are not
a multiple of 4 (edge tiles), batches that are not a multiple of the vector width, every
activation code (and none), the routing between it and F(2x2, 3x3), and its accuracy bound."""

import numpy as np
import pytest
from conftest import rel_err
from test_winograd import _conv_graph

from krypton_db.exec import conv_cpu, dense_cpu
from krypton_db.planner import algorithms
from krypton_db.exec import cpu as C
from krypton_db.exec import gemm_cpu as G
from krypton_db.exec import reference
from krypton_db.exec import winograd4_cpu as W4
from krypton_db.exec import winograd_cpu as W
from krypton_db.graph import Op

# F(4x4, 3x3)'s float32 error relative to the largest output (the module's docstring: 1.5-2.8e-6
# measured on random 64-128 channel convs; F(2x2, 3x3) is held to 1e-5 as well)
TOL = 1e-5


def _spy(monkeypatch, module):
    calls = []
    real = module.conv
    monkeypatch.setattr(module, "conv", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    return calls


def test_filter_transform_is_G_g_Gt():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    packed = W4.transform_filters(w)
    assert len(packed) == 36
    _, g, _ = W4._AT, W4._G, W4._BT
    for k in (0, 7, 20, 35):
        u = np.empty((5, 3), np.float32)
        G.tap_gemm(packed[k], 5, np.eye(3, dtype=np.float32), np.zeros(1, np.int64), 0, 3, u)
        want = np.einsum("i,ocij,j->oc", g[k // 6], w.astype(np.float64), g[k % 6])
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-6)


def test_transforms_compute_the_correlation():
    """Y = A^T [(G g G^T) * (B^T d B)] A is the 4x4 valid correlation of a 6x6 tile with a
    3x3 filter (float64)."""
    rng = np.random.default_rng(1)
    d, g = rng.normal(size=(6, 6)), rng.normal(size=(3, 3))
    at, gm, bt = W4._AT, W4._G, W4._BT
    y = at @ ((gm @ g @ gm.T) * (bt @ d @ bt.T)) @ at.T
    want = np.array([[(d[i : i + 3, j : j + 3] * g).sum() for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(y, want, atol=1e-10)


@pytest.mark.parametrize("cin,cout,hw,n", [
    (64, 64, (9, 9), 5),       # 7 x 7 output: edge tiles in both directions, one partial vector
    (64, 80, (16, 14), 17),    # 14 x 12: batch past one vector with a remainder
    (96, 64, (6, 6), 48),      # 4 x 4: one tile, three whole vectors
    (128, 64, (15, 16), 3),    # 13 x 14, several column chunks
    (192, 192, (9, 9), 48),    # 7 x 7 at the widest square conv the filter cap admits
])
def test_chwb_patch_route(cin, cout, hw, n, monkeypatch):
    from krypton_db.exec import patch_cpu as P

    rng = np.random.default_rng(cin + n)
    g = _conv_graph(cin, cout, hw, (0, 0, 0, 0), rng)
    node = g["c"]
    x = np.maximum(rng.normal(size=(n, cin) + hw), 0).astype(np.float32)
    buf = np.ascontiguousarray(x.transpose(1, 2, 3, 0))
    monkeypatch.setattr(W4, "CHUNK_FLOATS", 1 << 16)  # many column chunks, partial tiles per chunk
    calls, calls2 = _spy(monkeypatch, W4), _spy(monkeypatch, W)
    got = P.conv_chwb(buf, node, conv_cpu.ConvWeights.of(node), (0, np.float32(0), np.float32(0)), node.shape[1:])
    assert calls and not calls2, "the F(4x4, 3x3) route was not taken"
    want = reference.run(g, x)["c"].transpose(1, 2, 3, 0)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("op,params", [
    (Op.RELU, {}),
    (Op.CLIP, {"lo": 0.0, "hi": 6.0}),
    (Op.LEAKY_RELU, {"alpha": 0.1}),
    (Op.SIGMOID, {}),
    (Op.HARD_SWISH, {}),
    (Op.HARD_SIGMOID, {"alpha": 0.2, "beta": 0.5}),
    (None, None),
])
@pytest.mark.parametrize("pads,hw,band", [((1, 1, 1, 1), (11, 13), 1 << 21), ((1, 1, 1, 1), (21, 10), 1 << 14),
                                          ((0, 2, 1, 0), (9, 9), 1 << 14)])
def test_dense_route_with_fused_activation(op, params, pads, hw, band, monkeypatch):
    """Whole-map convs through CHWB bands (multiples of 4 rows); small bands force several
    bands and a partial last one, and then also column chunks of one micro-tile strip (the
    dense route's own ``DENSE_CHUNK_FLOATS``)."""
    rng = np.random.default_rng(7)
    g = _conv_graph(64, 64, hw, pads, rng, act=None if op is None else (op, params))
    x = rng.normal(size=(6, 64) + hw).astype(np.float32)
    monkeypatch.setattr(dense_cpu, "WINO_BAND_FLOATS", band)
    if band < 1 << 20:
        monkeypatch.setattr(W4, "DENSE_CHUNK_FLOATS", 1 << 12)
    calls = _spy(monkeypatch, W4)
    got = C.CpuExecutor(g).predict(x)
    assert calls, "the F(4x4, 3x3) route was not taken"
    if band < 1 << 20:
        assert len(calls) > 1, "expected several bands"
    want = reference.run(g, x)[g.output]
    assert rel_err(got, want) <= TOL


def test_routing(monkeypatch):
    """F(4x4) takes 3x3 stride-1 convs of >= 64 channels in and out where its padded tiles
    still save more than its transforms cost and its filters fit the per-conv cap; the others
    stay F(2x2) (or direct); switched off, F(2x2) takes them all."""
    p = dict(kernel=(3, 3), stride=(1, 1), dilation=(1, 1))
    assert W4.eligible(p, 64, 64, 1, (14, 14)) and W4.eligible(p, 192, 192, 1, (7, 7))
    # 256 x 256 / 512 x 512: 36 transformed matrices take 9.4 / 37.7 MB (``MAX_FILTER_BYTES``)
    assert not W4.eligible(p, 256, 256, 1, (7, 7)) and not W4.eligible(p, 512, 512, 1, (7, 7))
    assert W4.eligible(p, 128, 384, 1, (8, 8)) and not W4.eligible(p, 448, 384, 1, (8, 8))
    assert W4.eligible(p, 64, 64, 1, (56, 56)) and W4.eligible(p, 128, 256, 1, (13, 11))
    assert W4.eligible(p, 64, 64, 1, (13, 13)) and W4.eligible(p, 64, 64, 1, (11, 11))
    assert not W4.eligible(p, 32, 64, 1, (14, 14)) and not W4.eligible(p, 64, 32, 1, (14, 14))
    assert not W4.eligible(p, 64, 64, 1, (5, 5))  # 8x8 for 5x5
    assert not W4.eligible(p, 64, 64, 1, (9, 9))  # 12x12 for 9x9 (F(2x2): 10x10)
    assert not W4.eligible(p, 64, 64, 1, (10, 10))
    assert not W4.eligible(dict(p, stride=(2, 2)), 64, 64, 1, (14, 14))
    assert not W4.eligible(p, 64, 64, 2, (14, 14))
    monkeypatch.setattr(algorithms, "WINOGRAD4", False)
    assert not W4.eligible(p, 64, 64, 1, (14, 14))


def test_switch_off_gives_f2x2(monkeypatch):
    rng = np.random.default_rng(3)
    g = _conv_graph(64, 64, (12, 12), (1, 1, 1, 1), rng, act=(Op.RELU, {}))
    x = rng.normal(size=(4, 64, 12, 12)).astype(np.float32)
    calls4 = _spy(monkeypatch, W4)
    got4 = C.CpuExecutor(g).predict(x)
    monkeypatch.setattr(algorithms, "WINOGRAD4", False)
    calls2 = _spy(monkeypatch, W)
    got2 = C.CpuExecutor(g).predict(x)
    assert len(calls4) == 1 and len(calls2) == 1
    want = reference.run(g, x)[g.output]
    assert rel_err(got4, want) <= TOL and rel_err(got2, want) <= 1e-6
