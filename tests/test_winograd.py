"""Winograd F(2x2, 3x3) convolution (exec/winograd_cpu.py) against the float64 numpy
reference executor: patch (CHWB) and dense (CNHW, banded) routes, odd output sizes (edge
tiles), batch sizes that are not a multiple of the vector width, every activation code, and the
direct convolution it replaces (KRYPTON_WINOGRAD=0)."""

import numpy as np
import pytest
from conftest import assert_switch_gives_direct, rel_err

from krypton_db.exec import conv_cpu, dense_cpu
from krypton_db.planner import algorithms
from krypton_db.exec import cpu as C
from krypton_db.exec import runtime
from krypton_db.exec import reference
from krypton_db.exec import winograd_cpu as W
from krypton_db.graph import Graph, Node, Op


@pytest.fixture(autouse=True)
def _f2x2_only(monkeypatch):
    """These tests pin F(2x2, 3x3); F(4x4, 3x3), which takes wide convs, has its own
    (tests/test_winograd4.py)."""

    monkeypatch.setattr(algorithms, "WINOGRAD4", False)


def _conv_graph(cin, cout, hw, pads, rng, act=None):
    w = (rng.normal(size=(cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    x_node = Node("x", Op.INPUT, (), {}, {}, (cin,) + hw)
    t, l, bt, r = pads
    out_hw = (hw[0] + t + bt - 2, hw[1] + l + r - 2)
    nodes = [x_node, Node("c", Op.CONV, ("x",), dict(kernel=(3, 3), stride=(1, 1), pads=pads, dilation=(1, 1),
                                                      groups=1), {"W": w, "B": b}, (cout,) + out_hw)]
    if act is not None:
        op, params = act
        nodes.append(Node("a", op, ("c",), params, {}, (cout,) + out_hw))
    return Graph(nodes, nodes[-1].name)


@pytest.mark.parametrize("o,c", [(5, 3), (13, 300), (9, 513)])  # panels past MR, K past KC
@pytest.mark.parametrize("f4", [False, True])
def test_filter_transform_is_G_g_Gt(o, c, f4):
    from krypton_db.exec import gemm_cpu as G
    from krypton_db.exec import winograd4_cpu as W4

    rng = np.random.default_rng(o * c)
    w = rng.normal(size=(o, c, 3, 3)).astype(np.float32)
    g = W4._G if f4 else np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    a = g.shape[0]
    packed = W4.transform_filters(w) if f4 else W.transform_filters(w)
    assert len(packed) == a * a
    # the packed matrices multiply like U[k] [O, C]: recover U[k] by a product with identity
    for k in (0, a + 1, a * a - 1):
        u = np.empty((o, c), np.float32)
        G.tap_gemm(packed[k], o, np.eye(c, dtype=np.float32), np.zeros(1, np.int64), 0, c, u)
        want = np.einsum("i,ocij,j->oc", g[k // a], w.astype(np.float64), g[k % a])
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cin,cout,hw,n", [
    (16, 24, (13, 15), 5),    # odd 11 x 13 output: edge tiles in both directions
    (32, 16, (8, 8), 17),     # batch past one vector (16 lanes) with a remainder
    (24, 16, (9, 9), 37),     # odd 7 x 7 output: edge tiles staged, vector lanes + remainder
    (64, 64, (14, 14), 49),   # VGG16-like patch, several column chunks
])
def test_chwb_patch_route(cin, cout, hw, n, monkeypatch):
    """The incremental executor's patch conv (padding 0 on gathered read-in contexts)."""
    from krypton_db.exec import patch_cpu as P

    rng = np.random.default_rng(cin + n)
    g = _conv_graph(cin, cout, hw, (0, 0, 0, 0), rng)
    node = g["c"]
    x = rng.normal(size=(n, cin) + hw).astype(np.float32)
    buf = np.ascontiguousarray(x.transpose(1, 2, 3, 0))  # [C, h, w, B]
    monkeypatch.setattr(W, "CHUNK_FLOATS", 1 << 14)  # many column chunks, partial tiles per chunk
    calls = []
    real = W.conv
    monkeypatch.setattr(W, "conv", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    cw = conv_cpu.ConvWeights.of(node)
    got = P.conv_chwb(buf, node, cw, (0, np.float32(0), np.float32(0)), node.shape[1:])
    assert calls, "the Winograd route was not taken"
    want = reference.run(g, x)["c"].transpose(1, 2, 3, 0)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("op,params", [
    (Op.RELU, {}),
    (Op.CLIP, {"lo": 0.0, "hi": 6.0}),
    (Op.LEAKY_RELU, {"alpha": 0.1}),
    (Op.SIGMOID, {}),
])
@pytest.mark.parametrize("pads,hw,band", [((1, 1, 1, 1), (11, 13), 1 << 21), ((1, 1, 1, 1), (21, 10), 1 << 10),
                                          ((0, 2, 1, 0), (9, 9), 1 << 10)])
def test_dense_route_with_fused_activation(op, params, pads, hw, band, monkeypatch):
    """Whole-map convs (naive re-inference, stitched global steps) through CHWB bands; small
    bands force several bands and odd last bands."""
    rng = np.random.default_rng(7)
    g = _conv_graph(16, 24, hw, pads, rng, act=(op, params))
    x = rng.normal(size=(6, 16) + hw).astype(np.float32)
    monkeypatch.setattr(dense_cpu, "WINO_BAND_FLOATS", band)
    calls = []
    real = W.conv
    monkeypatch.setattr(W, "conv", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    got = C.CpuExecutor(g).predict(x)
    assert calls, "the Winograd route was not taken"
    if band < 1 << 20:
        assert len(calls) > 1, "expected several bands"
    want = reference.run(g, x)[g.output]
    assert rel_err(got, want) <= 1e-5


def test_switch_off_gives_the_direct_convolution(monkeypatch):
    rng = np.random.default_rng(3)
    g = _conv_graph(32, 32, (12, 12), (1, 1, 1, 1), rng, act=(Op.RELU, {}))
    x = rng.normal(size=(4, 32, 12, 12)).astype(np.float32)
    assert_switch_gives_direct(monkeypatch, W, g, x)


def test_not_eligible_shapes(monkeypatch):
    p = dict(kernel=(3, 3), stride=(1, 1), dilation=(1, 1))
    assert W.eligible(p, 64, 1, (14, 14)) and W.eligible(p, 64, 1, (13, 11))
    assert not W.eligible(p, 8, 1, (14, 14))  # too few channels
    assert not W.eligible(p, 64, 2, (14, 14))  # grouped
    assert not W.eligible(dict(p, stride=(2, 2)), 64, 1, (14, 14))
    assert not W.eligible(dict(p, dilation=(2, 2)), 64, 1, (14, 14))
    assert not W.eligible(dict(p, kernel=(1, 3)), 64, 1, (14, 14))
    assert W.eligible(p, 64, 1, (7, 7))  # 8x8 tiles for 7x7: 1.31x the work
    assert not W.eligible(p, 64, 1, (5, 5))  # 6x6 tiles: 1.44x
    assert W.eligible(p, 64, 1, (9, 11))  # 1.21x
    monkeypatch.setattr(algorithms, "WINOGRAD", False)
    assert not W.eligible(p, 64, 1, (14, 14))


@pytest.mark.parametrize("n,cap,align", [(1024, 480, 48), (1000, 480, 48), (7, 480, 48), (5000, 97, 16), (1, 10, 1),
                                         (49, 481, 48)])
def test_balanced_chunks_cover_and_keep_threads_busy(n, cap, align, monkeypatch):
    """Chunks cover [0, n) exactly once, at most about ``cap`` wide, and their count is a
    multiple of the thread count whenever there are enough aligned units for that (ResNet18's
    7x7 layer4: 1024 Winograd columns were 3 chunks on 2 threads, one thread doing two)."""
    monkeypatch.setattr(runtime, "num_threads", lambda: 2)
    per, nch = runtime.balanced_chunks(n, cap, align)
    assert per * (nch - 1) < n <= per * nch
    assert per <= 1.5 * max(cap, align) + align or nch == 1
    if n // align >= 2 and n > cap:
        assert nch % 2 == 0
    if per > align:
        assert per % align == 0
    if n < 2 * align:  # too few aligned units to split: one chunk, not align + a sliver
        assert nch == 1
