"""1-D Winograd F(m, r) for 1 x r / r x 1 convolutions (exec/winograd1d_cpu.py) against the
float64 numpy reference executor: the Toom-Cook transforms are exact in float64, the patch
(CHWB read-in) and dense (CNHW) routes in both filter directions, output lengths that are not
a multiple of m (partial last tiles), padding on and off the filter axis, batches past one
vector, several column chunks, fused activations, and the switch back to the direct conv."""

import numpy as np
import pytest
from conftest import assert_switch_gives_direct, rel_err

from krypton_db.exec import conv_cpu
from krypton_db.planner import algorithms
from krypton_db.exec import cpu as C
from krypton_db.exec import reference
from krypton_db.exec import winograd1d_cpu as W1
from krypton_db.graph import Graph, Node, Op


def _conv_graph(cin, cout, hw, k, pads, rng, act=None):
    kh, kw = k
    w = (rng.normal(size=(cout, cin, kh, kw)) / np.sqrt(kh * kw * cin)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    x_node = Node("x", Op.INPUT, (), {}, {}, (cin,) + hw)
    t, l, bt, r = pads
    out_hw = (hw[0] + t + bt - kh + 1, hw[1] + l + r - kw + 1)
    nodes = [x_node, Node("c", Op.CONV, ("x",), dict(kernel=k, stride=(1, 1), pads=pads, dilation=(1, 1),
                                                      groups=1), {"W": w, "B": b}, (cout,) + out_hw)]
    if act is not None:
        op, params = act
        nodes.append(Node("a", op, ("c",), params, {}, (cout,) + out_hw))
    return Graph(nodes, nodes[-1].name)


def _spy(monkeypatch):
    calls = []
    real = W1.conv
    monkeypatch.setattr(W1, "conv", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    return calls


@pytest.mark.parametrize("r", sorted(W1.POINTS))
def test_transforms_compute_the_correlation_exactly(r):
    """Y = A^T [(G g) * (B^T d)] equals sum_i g_i d_{j+i} for every basis g, d (float64)."""
    m, pts = W1.POINTS[r]
    at, g, bt = W1.transforms(m, r, pts)
    a = m + r - 1
    assert at.shape == (m, a) and g.shape == (a, r) and bt.shape == (a, a)
    rng = np.random.default_rng(r)
    for _ in range(5):
        d, f = rng.normal(size=a), rng.normal(size=r)
        want = np.array([f @ d[j : j + r] for j in range(m)])
        np.testing.assert_allclose(at @ ((g @ f) * (bt @ d)), want, rtol=1e-10, atol=1e-10)


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="distinct finite points"):
        W1.transforms(4, 3, (0.0, 1.0, 1.0, 2.0, -2.0))
    with pytest.raises(ValueError, match="distinct finite points"):
        W1.transforms(4, 7, (0.0, 1.0))


@pytest.mark.parametrize("k,hw,n", [
    ((7, 1), (19, 5), 3),     # 13 rows out: partial last tile (m = 4), small batch
    ((1, 7), (6, 23), 17),    # the transposed route, batch past one vector
    ((3, 1), (10, 8), 5),     # 8 rows: two whole F(4, 3) tiles
    ((1, 3), (7, 9), 2),      # 7 columns out: partial last tile
])
def test_chwb_patch_route(k, hw, n, monkeypatch):
    """The incremental executor's patch conv (padding 0 on gathered read-in contexts)."""
    from krypton_db.exec import patch_cpu as P

    rng = np.random.default_rng(sum(hw) + n)
    g = _conv_graph(24, 20, hw, k, (0, 0, 0, 0), rng)
    node = g["c"]
    x = np.maximum(rng.normal(size=(n, 24) + hw), 0).astype(np.float32)
    buf = np.ascontiguousarray(x.transpose(1, 2, 3, 0))  # [C, h, w, B]
    monkeypatch.setattr(W1, "CHUNK_FLOATS", 1 << 13)  # several column chunks, tiles split across them
    calls = _spy(monkeypatch)
    got = P.conv_chwb(buf, node, conv_cpu.ConvWeights.of(node), (0, np.float32(0), np.float32(0)), node.shape[1:])
    assert calls, "the 1-D Winograd route was not taken"
    want = reference.run(g, x)["c"].transpose(1, 2, 3, 0)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("op,params", [(Op.RELU, {}), (Op.CLIP, {"lo": 0.0, "hi": 6.0}), (Op.SIGMOID, {})])
@pytest.mark.parametrize("k,hw,pads", [
    ((1, 7), (17, 17), (0, 3, 0, 3)),   # Inception3's Mixed_6 1x7
    ((7, 1), (17, 17), (3, 0, 3, 0)),   # and 7x1
    ((1, 3), (8, 8), (0, 1, 0, 1)),     # Mixed_7 1x3
    ((3, 1), (9, 5), (1, 2, 1, 0)),     # padding off the filter axis too, uneven
])
def test_dense_route_with_fused_activation(op, params, k, hw, pads, monkeypatch):
    """Whole-map convs of a CNHW batch (naive re-inference, stitched global steps)."""
    rng = np.random.default_rng(11)
    g = _conv_graph(32, 24, hw, k, pads, rng, act=(op, params))
    x = rng.normal(size=(19, 32) + hw).astype(np.float32)
    calls = _spy(monkeypatch)
    got = C.CpuExecutor(g).predict(x)
    assert calls, "the 1-D Winograd route was not taken"
    want = reference.run(g, x)[g.output]
    assert rel_err(got, want) <= 1e-5


def test_float32_error_stays_near_the_direct_convs():
    """F(4, 7)'s rounding error on post-ReLU inputs with 192 channels (Inception3's Mixed_6e)
    stays below 1e-5 of the largest output and within 50x the direct conv's (whose float32
    sums are unusually exact here: 1.6e-7), both against float64. Measured: 32x with +-3/4 as
    the last pair of points; +-4 gave 118x and 1.9e-5, F(2, 7) 7x."""
    rng = np.random.default_rng(5)
    g = _conv_graph(192, 64, (17, 17), (7, 1), (3, 0, 3, 0), rng)
    x = np.maximum(rng.normal(size=(8, 192, 17, 17)), 0).astype(np.float32)
    want = reference.run(g, x)[g.output]
    got_w = C.CpuExecutor(g).predict(x)
    try:
        algorithms.WINOGRAD1D = False
        got_d = C.CpuExecutor(g).predict(x)
    finally:
        algorithms.WINOGRAD1D = True
    e_w, e_d = rel_err(got_w, want), rel_err(got_d, want)
    assert e_w <= 1e-5 and e_w <= 50 * e_d, (e_w, e_d)


def test_switch_off_gives_the_direct_convolution(monkeypatch):
    rng = np.random.default_rng(3)
    g = _conv_graph(32, 32, (12, 12), (1, 7), (0, 3, 0, 3), rng, act=(Op.RELU, {}))
    x = rng.normal(size=(4, 32, 12, 12)).astype(np.float32)
    assert_switch_gives_direct(monkeypatch, W1, g, x)


def test_eligible_shapes(monkeypatch):
    p = dict(kernel=(1, 7), stride=(1, 1), dilation=(1, 1))
    assert W1.eligible(p, 160, 1, (17, 17)) and W1.eligible(dict(p, kernel=(7, 1)), 160, 1, (17, 17))
    assert W1.eligible(dict(p, kernel=(3, 1)), 384, 1, (8, 8))
    assert not W1.eligible(p, 8, 1, (17, 17))  # too few channels
    assert not W1.eligible(p, 64, 2, (17, 17))  # grouped
    assert not W1.eligible(dict(p, stride=(1, 2)), 64, 1, (17, 17))
    assert not W1.eligible(dict(p, dilation=(1, 2)), 64, 1, (17, 17))
    assert not W1.eligible(dict(p, kernel=(1, 5)), 64, 1, (17, 17))  # no transforms for r = 5
    assert not W1.eligible(dict(p, kernel=(3, 3)), 64, 1, (17, 17))  # 2-D: winograd_cpu's
    assert not W1.eligible(p, 64, 1, (17, 5))  # 5 columns in 8 (two 4-wide tiles): 1.6x the work
    assert W1.eligible(p, 64, 1, (17, 7))  # 7 in 8: 1.14x
    monkeypatch.setattr(algorithms, "WINOGRAD1D", False)
    assert not W1.eligible(p, 160, 1, (17, 17))


def test_other_points_run_the_generic_transforms(monkeypatch):
    """With points other than the baked-in ones (here F(2, 7)), the transforms loop over the
    coefficient arrays instead of the vector bodies; same results."""
    monkeypatch.setitem(W1.POINTS, 7, (2, (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)))
    rng = np.random.default_rng(12)
    g = _conv_graph(24, 16, (11, 9), (7, 1), (3, 0, 3, 0), rng, act=(Op.RELU, {}))
    x = rng.normal(size=(5, 24, 11, 9)).astype(np.float32)
    calls = _spy(monkeypatch)
    got = C.CpuExecutor(g).predict(x)
    assert calls
    assert rel_err(got, reference.run(g, x)[g.output]) <= 1e-5
