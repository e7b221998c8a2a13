"""Channels-last (NHWC) kernels and the steps the plan runs channels-last.

Oracles: torch's conv2d in float64 (kernels), the CNHW executor with channels-last switched
off and ONNX Runtime (whole models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_on_avx2

from krypton_db.exec import nhwc_cpu as nh
from krypton_db.graph import ACT_CLIP, ACT_HSWISH, ACT_NONE, ACT_RELU, ACT_SIGMOID

ACTS = {ACT_NONE: lambda v: v, ACT_RELU: F.relu, ACT_HSWISH: F.hardswish,
        ACT_CLIP: lambda v: v.clamp(0.0, 6.0), ACT_SIGMOID: torch.sigmoid}
ACT_ARGS = {ACT_CLIP: (0.0, 6.0)}


def _act(code):
    a0, a1 = ACT_ARGS.get(code, (0.0, 0.0))
    return code, np.float32(a0), np.float32(a1)


def _torch_conv(x_nhwc, w, b, stride, pads, groups, code):
    """float64 reference: torch conv2d on the NCHW view, padding (top, left, bottom, right)."""
    t, l, bo, r = pads
    xt = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).double()
    xt = F.pad(xt, (l, r, t, bo))
    y = F.conv2d(xt, torch.from_numpy(w).double(), torch.from_numpy(b).double(), stride=stride, groups=groups)
    return ACTS[code](y).numpy().transpose(0, 2, 3, 1)


def _out_hw(h, w, k, s, pads):
    t, l, b, r = pads
    return (h + t + b - k) // s + 1, (w + l + r - k) // s + 1


@pytest.mark.parametrize("n,h,w,c,o", [(2, 7, 9, 16, 32), (1, 5, 5, 24, 48), (3, 4, 7, 64, 80),
                                        (1, 3, 3, 256, 16), (2, 13, 11, 27, 128), (1, 1, 1, 512, 1280),
                                        (2, 9, 7, 96, 24), (1, 6, 5, 144, 40), (2, 3, 5, 16, 3)])
@pytest.mark.parametrize("code", [ACT_NONE, ACT_HSWISH, ACT_SIGMOID])
def test_pointwise_matches_torch(n, h, w, c, o, code):
    """1x1 conv: every tile shape (1..4 vectors of output channels), output channels that end
    in a part of a vector (24, 40, 3: stored through the staging tile), pixel counts that
    leave a partial tile, activations fused in registers (hard swish) and applied after
    (sigmoid)."""
    rng = np.random.default_rng(n * 1000 + c + o)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = (rng.standard_normal((o, c, 1, 1)) / np.sqrt(c)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    out = np.full((n, h, w, o), np.nan, np.float32)
    nh.pointwise_nhwc(x, nh.PointwiseWeights(wt, b), _act(code), out)
    ref = _torch_conv(x, wt, b, 1, (0, 0, 0, 0), 1, code)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)


_DW_CASES = [(k, s, pads, h, w)
             for k, s, pads in [(3, 1, (1, 1, 1, 1)), (3, 2, (1, 1, 1, 1)), (5, 1, (2, 2, 2, 2)),
                                (5, 2, (2, 2, 2, 2)), (3, 2, (0, 0, 1, 1)), (3, 1, (0, 0, 0, 0)),
                                (5, 2, (1, 2, 2, 1))]
             for h, w in [(14, 14), (7, 9), (23, 5), (2, 3)]
             if min(_out_hw(h, w, k, s, pads)) >= 1]  # maps too small for the window have no output


@pytest.mark.parametrize("k,s,pads,h,w", _DW_CASES)
def test_depthwise_matches_torch(k, s, pads, h, w):
    """Depthwise conv: borders at every side (symmetric, TF-style 'SAME' (0, 0, 1, 1) and
    lopsided padding), maps narrower than one 8-pixel block and ones leaving a partial block."""
    n, c = 2, 48
    rng = np.random.default_rng(k * 100 + s * 10 + h)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    out = np.full((n,) + _out_hw(h, w, k, s, pads) + (c,), np.nan, np.float32)
    nh.depthwise_nhwc(x, nh.DepthwiseWeights.of(wt, b), (s, s), pads, _act(ACT_HSWISH), out)
    np.testing.assert_allclose(out, _torch_conv(x, wt, b, s, pads, c, ACT_HSWISH), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("c,k,s", [(24, 3, 1), (16, 7, 2), (8, 3, 3)])
def test_depthwise_general_path_matches_torch(c, k, s):
    """Windows, strides and channel counts without a micro-kernel take the per-pixel loop."""
    rng = np.random.default_rng(c + k)
    n, h, w, p = 2, 11, 10, k // 2
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    pads = (p, p, p, p)
    out = np.full((n,) + _out_hw(h, w, k, s, pads) + (c,), np.nan, np.float32)
    nh.depthwise_nhwc(x, nh.DepthwiseWeights.of(wt, b), (s, s), pads, _act(ACT_SIGMOID), out)
    np.testing.assert_allclose(out, _torch_conv(x, wt, b, s, pads, c, ACT_SIGMOID), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("n,h,w,c,o,k,s,pads", [
    (2, 33, 31, 3, 16, 3, 2, (1, 1, 1, 1)),   # RGB stem (PP-LCNet, EfficientNet)
    (2, 15, 15, 16, 32, 3, 1, (1, 1, 1, 1)),
    (3, 20, 21, 8, 16, 5, 2, (2, 2, 2, 2)),
    (2, 30, 30, 3, 64, 7, 2, (3, 3, 3, 3)),
    (1, 9, 9, 4, 48, 3, 1, (0, 0, 0, 0)),
    (2, 6, 6, 3, 16, 3, 2, (0, 0, 1, 1)),
    (1, 4, 4, 3, 32, 3, 1, (2, 2, 2, 2)),     # every pixel a border pixel
    (2, 19, 23, 3, 24, 3, 2, (1, 1, 1, 1)),   # output channels ending in part of a vector
])
def test_direct_conv_matches_torch(n, h, w, c, o, k, s, pads):
    rng = np.random.default_rng(h * 7 + o)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    wt = rng.standard_normal((o, c, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    out = np.full((n,) + _out_hw(h, w, k, s, pads) + (o,), np.nan, np.float32)
    params = dict(kernel=(k, k), stride=(s, s), pads=pads)
    nh.conv_direct_nhwc(x, nh.DirectConvWeights(wt, b), params, _act(ACT_HSWISH), out)
    np.testing.assert_allclose(out, _torch_conv(x, wt, b, s, pads, 1, ACT_HSWISH), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("k,s,pads,h,w", [(3, 1, (1, 1, 1, 1), 13, 11), (3, 2, (1, 1, 1, 1), 12, 9),
                                           (5, 2, (2, 2, 2, 2), 9, 14), (3, 2, (0, 0, 1, 1), 10, 10),
                                           (5, 1, (2, 2, 2, 2), 3, 4)])
def test_pointwise_depthwise_fused_equals_the_two_convs(k, s, pads, h, w):
    """The fused pair (1x1 rows in a ring, each computed once per thread) gives the two convs'
    values bit for bit, across image borders, thread boundaries and maps shorter than the
    window."""
    rng = np.random.default_rng(k * 10 + h)
    n, c, e = 3, 24, 48
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    pw = nh.PointwiseWeights((rng.standard_normal((e, c, 1, 1)) / 5).astype(np.float32),
                             rng.standard_normal(e).astype(np.float32))
    dw = nh.DepthwiseWeights.of(rng.standard_normal((e, 1, k, k)).astype(np.float32),
                                rng.standard_normal(e).astype(np.float32))
    mid = nh.pointwise_nhwc(x, pw, _act(ACT_HSWISH), np.empty((n, h, w, e), np.float32))
    ho, wo = _out_hw(h, w, k, s, pads)
    want = nh.depthwise_nhwc(mid, dw, (s, s), pads, _act(ACT_SIGMOID), np.empty((n, ho, wo, e), np.float32))
    got = nh.pointwise_depthwise_nhwc(x, pw, _act(ACT_HSWISH), dw, (s, s), pads, _act(ACT_SIGMOID),
                                      np.full((n, ho, wo, e), np.nan, np.float32))
    np.testing.assert_array_equal(got, want)


def test_layout_transposes_round_trip():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((19, 3, 5, 7)).astype(np.float32)  # CNHW
    y = nh.cnhw_to_nhwc(x, np.empty((3, 5, 7, 19), np.float32))
    np.testing.assert_array_equal(y, x.transpose(1, 2, 3, 0))
    back = nh.nhwc_to_cnhw(y, np.empty_like(x))
    np.testing.assert_array_equal(back, x)
    b = rng.standard_normal((3, 19, 5, 7)).astype(np.float32)  # NCHW
    np.testing.assert_array_equal(nh.nchw_to_nhwc(b, np.empty((3, 5, 7, 19), np.float32)), b.transpose(0, 2, 3, 1))


def test_kernels_on_avx2(tmp_path):
    """The AVX2 build (8-float vectors, 16 registers: other tile shapes) in a subprocess with
    its own numba cache: the kernels still match torch, and no AVX-512 register is used."""
    code = (
        "import numpy as np\n"
        "import test_nhwc as t\n"
        "from krypton_db.exec import nhwc_cpu as nh\n"
        "assert nh.VL == 8 and nh.NV_MAX == 2\n"
        "for args in [(2, 7, 9, 16, 32), (3, 4, 7, 64, 80), (1, 3, 3, 256, 16)]:\n"
        "    t.test_pointwise_matches_torch(*args, 6)\n"
        "for k, s, p in [(3, 1, (1, 1, 1, 1)), (5, 2, (2, 2, 2, 2)), (3, 2, (0, 0, 1, 1))]:\n"
        "    t.test_depthwise_matches_torch(k, s, p, 14, 14)\n"
        "    t.test_depthwise_matches_torch(k, s, p, 7, 9)\n"
        "t.test_direct_conv_matches_torch(2, 33, 31, 3, 16, 3, 2, (1, 1, 1, 1))\n"
        "t.test_pointwise_depthwise_fused_equals_the_two_convs(5, 2, (2, 2, 2, 2), 9, 14)\n"
        "asm = ''.join(nh.depthwise_nhwc_cpu.inspect_asm().values())\n"
        "asm += ''.join(nh.pointwise_nhwc_cpu.inspect_asm().values())\n"
        "assert 'zmm' not in asm and 'ymm' in asm, 'not an AVX2 build'\n"
        "print('ok')\n")
    run_on_avx2(code, tmp_path)


# -- the plan's channels-last steps and the executor running them ------------------------------


def _separable_net(shape=(3, 3, 37, 35)):
    """A small depthwise-separable net with every op a channels-last group admits: an RGB stem
    (3x3 s2), depthwise 3x3 / 5x5 at stride 1 and 2, 1x1 convs, a squeeze-excite gate (global
    pool, 1x1 convs, ReLU, hard sigmoid, broadcast Mul), a residual Add, a BatchNorm after a
    ReLU (an AFFINE step); then a Concat (CNHW: its inputs' slices) and a head."""
    from onnx_builders import Net

    net = Net(shape, seed=3)
    a = net.op("HardSwish", [net.conv("input", 3, 16, stride=(2, 2))])
    a = net.op("HardSwish", [net.conv(a, 16, 16, group=16)])
    b = net.op("HardSwish", [net.conv(a, 16, 32, k=(1, 1), pads=(0, 0, 0, 0))])
    b = net.op("HardSwish", [net.conv(b, 32, 32, k=(5, 5), stride=(2, 2), pads=(2, 2, 2, 2), group=32)])
    gate = net.conv(net.op("Relu", [net.conv(net.op("GlobalAveragePool", [b]), 32, 16, k=(1, 1),
                                             pads=(0, 0, 0, 0))]), 16, 32, k=(1, 1), pads=(0, 0, 0, 0))
    b = net.op("Mul", [b, net.op("HardSigmoid", [gate])])
    c = net.conv(b, 32, 32, k=(1, 1), pads=(0, 0, 0, 0))
    r = net.op("Add", [c, b])
    r = net.bn(net.op("Relu", [r]), 32)
    d = net.op("Relu", [net.conv(r, 32, 32, stride=(2, 2), group=32)])
    e = net.conv(d, 32, 16, k=(1, 1), pads=(0, 0, 0, 0))  # read by the concat: stays CNHW
    cat = net.op("Concat", [d, e], axis=1)
    out = net.op("Flatten", [net.op("GlobalAveragePool", [cat])], axis=1)
    return net.model(out)


def _import(model, tmp_path):
    import onnx

    from krypton_db.onnx_import import import_onnx

    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return import_onnx(path)[0]


def test_plan_runs_the_separable_body_channels_last(tmp_path, monkeypatch):
    from krypton_db.graph import Op
    from krypton_db.planner import algorithms
    from krypton_db.planner.physical import PhysicalPlan

    g = _import(_separable_net(), tmp_path)
    plan = PhysicalPlan.lower(g)
    last = plan.channels_last
    by_op = {}
    for s in plan.steps:
        by_op.setdefault(s.node.op, []).append(s.node.name in last)
    assert all(by_op[Op.CONV][:-1]) and not by_op[Op.CONV][-1]  # the concat's input stays CNHW
    assert all(by_op[Op.MUL]) and all(by_op[Op.ADD]) and all(by_op[Op.AFFINE])
    assert by_op[Op.GLOBAL_AVGPOOL] == [True, False]  # the head's pool reads the concat
    assert not any(by_op[Op.CONCAT]) and not any(by_op[Op.RESHAPE])
    # a net without depthwise convs keeps CNHW everywhere, and the switch turns it all off
    from onnx_builders import Net

    net = Net((2, 3, 16, 16))
    y = net.op("Relu", [net.conv(net.op("Relu", [net.conv("input", 3, 16)]), 16, 32, k=(1, 1), pads=(0, 0, 0, 0))])
    assert PhysicalPlan.lower(_import(net.model(net.op("Flatten", [y], axis=1)), tmp_path)).channels_last == frozenset()
    # EXPLAIN's footer names them (exact mode's view materialization runs no pair fused)
    from krypton_db.planner.explain import channels_last_line

    n_last = len(PhysicalPlan.lower(g).channels_last)
    assert channels_last_line(g, "exact") == (f"MaterializeViews and Full steps: {n_last} of {len(plan.steps)} "
                                              "steps channels-last (NHWC)")
    monkeypatch.setattr(algorithms, "POINTWISE_DEPTHWISE_MIN_BYTES", 0)
    assert channels_last_line(g, "naive").endswith("channels-last (NHWC), fused 1x1 + depthwise pairs 1")
    monkeypatch.setattr(algorithms, "CHANNELS_LAST", False)
    assert PhysicalPlan.lower(g).channels_last == frozenset()
    assert channels_last_line(g, "naive") is None


def test_executor_channels_last_matches_ort_and_cnhw(tmp_path, monkeypatch):
    """The whole net against ONNX Runtime, and every intermediate value (returned batch-first
    whatever its internal layout) against the all-CNHW executor; the fused 1x1 + depthwise
    pair gives the unfused values bit for bit."""
    from onnx_builders import ort_run

    from krypton_db.exec.cpu import CpuExecutor
    from krypton_db.graph import Op
    from krypton_db.planner import algorithms

    model = _separable_net()
    g = _import(model, tmp_path)
    x = np.random.default_rng(0).standard_normal((3, 3, 37, 35)).astype(np.float32)
    # every 1x1 + depthwise pair fused, whatever its size (this net's maps are small)
    monkeypatch.setattr(algorithms, "POINTWISE_DEPTHWISE_MIN_BYTES", 0)
    ex = CpuExecutor(g)
    assert len(ex.plan.channels_last) > 10
    assert [(g[a].op, g[b].params["groups"]) for a, b in ex.plan.pointwise_depthwise.items()] == [(Op.CONV, 32)]
    got = ex.predict(x)
    want = ort_run(model, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    names = [ex.plan.out_name(s) for s in ex.plan.steps]
    mine = ex.run(x, outputs=names)  # asks for the 1x1's output: the pair runs unfused
    np.testing.assert_array_equal(mine[g.output], got)
    monkeypatch.setattr(algorithms, "CHANNELS_LAST", False)
    cnhw = CpuExecutor(g)
    assert cnhw.plan.channels_last == frozenset()
    theirs = cnhw.run(x, outputs=names)
    for n in names:
        assert mine[n].shape == theirs[n].shape, n
        np.testing.assert_allclose(mine[n], theirs[n], rtol=1e-5, atol=1e-5, err_msg=n)
    # a second run reuses the arena's buffers: the same values
    np.testing.assert_array_equal(ex.predict(x), got)


def test_ivm_full_steps_run_channels_last_and_equal_naive(tmp_path, monkeypatch):
    """Exact occlusion (IVM) on the separable net: the steps whose patch has grown to the whole
    map (FULL routes: the late layers) run channels-last as the dense plan does, switching
    layout once, and the map equals naive re-inference to 1e-5 -- also with every step CNHW."""
    import onnx

    import krypton_db as kdb
    from krypton_db.exec import incremental
    from krypton_db.planner import algorithms

    p = tmp_path / "sep.onnx"
    onnx.save(_separable_net((1, 3, 37, 35)), p)
    img = np.random.default_rng(7).random((37, 35, 3)).astype(np.float32)
    ran = []
    real = incremental.IncrementalExecutor._step

    def spy(self, op, ins, b):
        y = real(self, op, ins, b)
        ran.append((op.delta.node.name, op.route.value, op.delta.out_name in self._nhwc))
        return y

    monkeypatch.setattr(incremental.IncrementalExecutor, "_step", spy)
    maps = {}
    for last in (True, False):
        monkeypatch.setattr(algorithms, "CHANNELS_LAST", last)
        m = kdb.load_model(p)
        ran.clear()
        a = kdb.occlude(m, img, patch=5, stride=3, mode="naive", all_classes=True)
        b = kdb.occlude(m, img, patch=5, stride=3, mode="exact", all_classes=True, batch_size=7)
        assert np.abs(a.all_probs - b.all_probs).max() <= 1e-5
        assert a.probs.std() > 1e-5
        full_nhwc = {n for n, route, nhwc in ran if route == "full" and nhwc}
        # channels-last FULL steps exactly where the dense plan runs the step channels-last
        want = {n for n, route, _ in ran if route == "full" and n in m.executor.plan.channels_last
                and len(m.graph[n].shape) == 3}
        assert full_nhwc == want and (bool(want) == last)
        maps[last] = b.all_probs
    np.testing.assert_allclose(maps[True], maps[False], atol=1e-5)
