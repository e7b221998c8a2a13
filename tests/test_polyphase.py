"""Strided convolutions as tap GEMMs over the input's phase planes (patch_cpu.polyphase_taps)
against the float64 numpy reference: the dense routes (the shifted-window phase grid and the
CHWB planes) and the patch (CHWB) route, kernels larger and smaller than the stride,
asymmetric strides and padding, and the im2col lowering they replace (KRYPTON_POLYPHASE=0); and
the stride-1 shifted-window route whose grid frame the phase grid shares."""

import numpy as np
import pytest
from conftest import rel_err

from krypton_db.exec import conv_cpu, dense_cpu
from krypton_db.planner import algorithms
from krypton_db.exec import cpu as C
from krypton_db.exec import patch_cpu as P
from krypton_db.exec import reference
from krypton_db.graph import Graph, Node, Op

CASES = [  # cin, cout, hw, kernel, stride, pads
    (16, 24, (14, 15), (3, 3), (2, 2), (1, 1, 1, 1)),   # ResNet stage entry
    (16, 8, (23, 20), (7, 7), (2, 2), (3, 3, 3, 3)),    # 7x7 kernel, odd size
    (16, 12, (9, 9), (1, 1), (2, 2), (0, 0, 0, 0)),     # downsample: one phase used
    (16, 8, (13, 11), (3, 5), (2, 1), (1, 2, 0, 1)),    # asymmetric stride and padding
    (16, 6, (17, 17), (3, 3), (3, 3), (0, 0, 0, 0)),    # stride 3 (Inception reductions: 2)
]


def _graph(cin, cout, hw, k, s, pads, rng):
    w = (rng.normal(size=(cout, cin) + k) / np.sqrt(cin * k[0] * k[1])).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    t, l, bt, r = pads
    out_hw = ((hw[0] + t + bt - k[0]) // s[0] + 1, (hw[1] + l + r - k[1]) // s[1] + 1)
    x_node = Node("x", Op.INPUT, (), {}, {}, (cin,) + hw)
    conv = Node("c", Op.CONV, ("x",), dict(kernel=k, stride=s, pads=pads, dilation=(1, 1), groups=1),
                {"W": w, "B": b}, (cout,) + out_hw)
    relu = Node("r", Op.RELU, ("c",), {}, {}, (cout,) + out_hw)
    return Graph([x_node, conv, relu], "r")


@pytest.mark.parametrize("route", ["grid", "planes"])
@pytest.mark.parametrize("cin,cout,hw,k,s,pads", CASES)
def test_dense_route(cin, cout, hw, k, s, pads, route, monkeypatch):
    """Both dense phase-plane routes -- the shifted-window phase grid (``_conv_phase_grid``,
    forced here past its waste bound) and the CHWB planes (``_conv_polyphase``) -- against the
    float64 reference and the im2col lowering."""
    rng = np.random.default_rng(cin * 100 + k[0])
    g = _graph(cin, cout, hw, k, s, pads, rng)
    x = rng.normal(size=(5, cin) + hw).astype(np.float32)
    calls = []
    name = "_conv_phase_grid" if route == "grid" else "_conv_polyphase"
    real = getattr(dense_cpu, name)
    monkeypatch.setattr(dense_cpu, name, lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    monkeypatch.setattr(conv_cpu, "PHASE_GRID", route == "grid")
    monkeypatch.setattr(conv_cpu, "PHASE_GRID_MAX_WASTE", float("inf"))
    monkeypatch.setattr(conv_cpu, "PHASE_GRID_MIN_O", 1)
    got = C.CpuExecutor(g).predict(x)
    # an unpadded 1x1 conv reads one phase: its subsampled input is a plain GEMM instead
    one_phase = k == (1, 1) and pads == (0, 0, 0, 0)
    assert bool(calls) != one_phase, f"route: {name} expected" if not one_phase else "route: subsample expected"
    assert rel_err(got, reference.run(g, x)["r"]) <= 1e-5
    monkeypatch.setattr(algorithms, "POLYPHASE", False)  # the im2col lowering agrees
    assert rel_err(C.CpuExecutor(g).predict(x), got) <= 1e-5


@pytest.mark.parametrize("cin,groups", [(3, 1), (1, 1), (8, 2)])
@pytest.mark.parametrize("k,s,pads", [((7, 7), (2, 2), (3, 3, 3, 3)), ((3, 3), (2, 2), (0, 0, 0, 0)),
                                      ((3, 3), (2, 2), (1, 1, 1, 1))])
def test_phase_grid_few_channels_and_groups(cin, groups, k, s, pads, monkeypatch):
    """RGB / grey stems (ResNet's 7x7/2, Inception's and PP-LCNet's 3x3/2) and grouped convs on
    the phase grid, several column chunks per image (the chunks' planes hang over image
    borders and past the last image), against the float64 reference."""
    rng = np.random.default_rng(cin + k[0])
    hw = (37, 41)
    cout = 6 * groups
    w = (rng.normal(size=(cout, cin // groups) + k) / np.sqrt(cin * k[0] * k[1])).astype(np.float32)
    t, l, bt, r = pads
    out_hw = ((hw[0] + t + bt - k[0]) // s[0] + 1, (hw[1] + l + r - k[1]) // s[1] + 1)
    g = Graph([Node("x", Op.INPUT, (), {}, {}, (cin,) + hw),
               Node("c", Op.CONV, ("x",), dict(kernel=k, stride=s, pads=pads, dilation=(1, 1), groups=groups),
                    {"W": w, "B": rng.normal(size=cout).astype(np.float32)}, (cout,) + out_hw)], "c")
    x = rng.normal(size=(3, cin) + hw).astype(np.float32)
    calls = []
    real = dense_cpu._conv_phase_grid
    monkeypatch.setattr(dense_cpu, "_conv_phase_grid", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    monkeypatch.setattr(conv_cpu, "PHASE_GRID_MAX_WASTE", float("inf"))
    monkeypatch.setattr(conv_cpu, "PHASE_GRID_MIN_O", 1)
    monkeypatch.setattr(dense_cpu, "SHIFT_BUDGET", 4096)  # small chunks
    got = C.CpuExecutor(g).predict(x)
    assert calls
    assert rel_err(got, reference.run(g, x)["c"]) <= 1e-5


# the dense executor builds phase planes for these (an unpadded 1x1 conv is subsampled instead)
PLANE_CASES = [c for c in CASES if not (c[3] == (1, 1) and c[5] == (0, 0, 0, 0))]


@pytest.mark.parametrize("cin,cout,hw,k,s,pads", PLANE_CASES)
def test_dense_route_in_bands(cin, cout, hw, k, s, pads, monkeypatch):
    """A band budget of a few rows: the planes are built and convolved band by band (rows
    overlapping by the kernel's reach), and agree with the one-band result."""
    rng = np.random.default_rng(cin * 7 + k[0])
    g = _graph(cin, cout, hw, k, s, pads, rng)
    x = rng.normal(size=(3, cin) + hw).astype(np.float32)
    whole = C.CpuExecutor(g).predict(x)
    bands = []
    real = algorithms.polyphase_taps
    monkeypatch.setattr(algorithms, "polyphase_taps", lambda *a: (bands.append(a[4]), real(*a))[1])
    ho, wo = g["c"].shape[1:]
    phases, _, hp, wp = real(k[0], k[1], s[0], s[1], ho, wo, 3)
    monkeypatch.setattr(dense_cpu, "WINO_BAND_FLOATS", cin * len(phases) * wp * 3 * (hp - ho + 2))  # 2 rows
    got = C.CpuExecutor(g).predict(x)
    assert len(bands) >= 2 and sum(bands) == g["c"].shape[1], bands  # bands cover every row once
    assert rel_err(got, reference.run(g, x)["r"]) <= 1e-5
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cin,cout,hw,k,s,pads", CASES)
def test_patch_route(cin, cout, hw, k, s, pads):
    """Read-in contexts (padding 0) in the CHWB layout, batch innermost."""
    rng = np.random.default_rng(cin * 10 + k[1])
    g = _graph(cin, cout, hw, k, s, (0, 0, 0, 0), rng)
    node = g["c"]
    x = rng.normal(size=(19, cin) + hw).astype(np.float32)
    buf = np.ascontiguousarray(x.transpose(1, 2, 3, 0))
    got = P.conv_chwb(buf, node, conv_cpu.ConvWeights.of(node), (1, np.float32(0), np.float32(0)), node.shape[1:])
    want = reference.run(g, x)["r"].transpose(1, 2, 3, 0)
    assert rel_err(got, want) <= 1e-5


def test_rgb_first_layer_keeps_im2col(monkeypatch):
    """Dense convs with fewer than POLYPHASE_MIN_C input channels stay on im2col (the strided
    CNHW read that builds the phase planes costs more there)."""
    rng = np.random.default_rng(5)
    g = _graph(3, 8, (23, 20), (7, 7), (2, 2), (3, 3, 3, 3), rng)
    x = rng.normal(size=(4, 3, 23, 20)).astype(np.float32)
    calls = []
    real = dense_cpu._conv_polyphase
    monkeypatch.setattr(dense_cpu, "_conv_polyphase", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    got = C.CpuExecutor(g).predict(x)
    assert not calls
    assert rel_err(got, reference.run(g, x)["r"]) <= 1e-5


def test_phase_taps():
    phases, offs, hp, wp = algorithms.polyphase_taps(3, 3, 2, 2, 7, 7, 1)
    assert phases.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] and (hp, wp) == (8, 8)
    # tap (2, 2) reads phase (0, 0) one row and one column on
    assert offs[8] == 0 * 64 + 1 * 8 + 1
    phases, offs, hp, wp = algorithms.polyphase_taps(1, 1, 2, 2, 7, 7, 4)
    assert phases.tolist() == [[0, 0]] and offs.tolist() == [0]


@pytest.mark.parametrize("k,pads,dil,groups", [((5, 5), (2, 2, 2, 2), (1, 1), 1), ((3, 3), (1, 0, 2, 1), (1, 1), 2),
                                               ((3, 3), (2, 2, 2, 2), (2, 2), 1)])
def test_shifted_window_route(k, pads, dil, groups, monkeypatch):
    """Stride-1 convs on the shifted-window grid (``_conv_shifted``, the frame it shares with
    the phase grid), small chunks so chunks straddle rows and images, against the float64
    reference."""
    rng = np.random.default_rng(k[0] + groups)
    cin, cout, hw = 32 * groups, 8 * groups, (19, 23)
    w = (rng.normal(size=(cout, cin // groups) + k) / np.sqrt(cin * k[0] * k[1])).astype(np.float32)
    t, l, bt, r = pads
    out_hw = (hw[0] + t + bt - dil[0] * (k[0] - 1), hw[1] + l + r - dil[1] * (k[1] - 1))
    g = Graph([Node("x", Op.INPUT, (), {}, {}, (cin,) + hw),
               Node("c", Op.CONV, ("x",), dict(kernel=k, stride=(1, 1), pads=pads, dilation=dil, groups=groups),
                    {"W": w, "B": rng.normal(size=cout).astype(np.float32)}, (cout,) + out_hw)], "c")
    x = rng.normal(size=(3, cin) + hw).astype(np.float32)
    calls = []
    real = dense_cpu._conv_shifted
    monkeypatch.setattr(dense_cpu, "_conv_shifted", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    monkeypatch.setattr(dense_cpu, "SHIFT_BUDGET", 8192)
    monkeypatch.setattr(algorithms, "WINOGRAD", False)
    monkeypatch.setattr(dense_cpu, "CHWB_MIN_WASTE", float("inf"))
    got = C.CpuExecutor(g).predict(x)
    assert calls, "the shifted-window route was not taken"
    assert rel_err(got, reference.run(g, x)["c"]) <= 1e-5
