"""GPU executors (numba.cuda) on the numba CUDA simulator: every kernel against the numpy
reference / the CPU kernels on tiny shapes, and exact + approximate occlusion on tiny VGG-,
ResNet- and Inception-like nets against the CPU incremental executor and naive re-inference.

How the simulator is switched on: numba-cuda picks simulator vs driver when ``numba.cuda`` is
first imported, from ``numba.core.config.ENABLE_CUDASIM``, which numba reads from the
environment at ``import numba`` (other test modules import numba first). So this module sets
``NUMBA_ENABLE_CUDASIM=1``, calls ``numba.core.config.reload_config()`` and only then imports
``numba.cuda`` (and the kernels, whose decorators run at import); afterwards the variable is
restored, so the rest of the session and its subprocesses see the environment unchanged.
An explicit ``NUMBA_ENABLE_CUDASIM`` in the environment is respected, and on a machine with
NVIDIA device nodes (``/dev/nvidia0``...) the driver is used: then all of these tests run on the
real GPU, plus the ``gpu``-marked ones. If ``numba.cuda`` ends up in driver mode without a
usable GPU (imported earlier by someone else, or a broken driver), this file re-runs itself in
a subprocess with the simulator (``test_simulator_in_subprocess``).

The simulator runs one Python thread per CUDA thread and polls at every syncthreads, so the
shapes are tiny, the kernels are launched with a handful of threads (grid-stride loops), the
executor's ``conv_algo="auto"`` uses the direct conv kernel there (the tiled GEMM kernels are
tested on their own and end to end on one net), and the GIL switch interval is shortened
while this module runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest


def _gpu_device_nodes() -> bool:
    """An NVIDIA device node exists (Linux): then use the real GPU, not the simulator."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _activate_simulator() -> str:
    """How this process got its numba.cuda: 'in-process' (simulator switched on here),
    'user-env' (NUMBA_ENABLE_CUDASIM given), 'gpu-node' (driver mode: a GPU is there),
    'already-imported', or 'no-numba-cuda'."""
    if "numba.cuda" in sys.modules:
        return "already-imported"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") is not None:
        return "user-env"
    if _gpu_device_nodes():
        return "gpu-node"
    try:
        import numba.core.config as nconfig
    except ImportError:
        return "no-numba-cuda"
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    try:
        nconfig.reload_config()
        try:
            import numba.cuda  # noqa: F401 - picks the simulator now

            import krypton_db.exec.kernels_gpu  # noqa: F401 - kernel decorators run in sim mode
        except ImportError:
            return "no-numba-cuda"
    finally:
        del os.environ["NUMBA_ENABLE_CUDASIM"]
        nconfig.reload_config()
    return "in-process"


_HOW = _activate_simulator()

from krypton_db.exec import gpu as G
from krypton_db.exec.gpu_incremental import GpuIncrementalExecutor

_OK, _WHY = G.gpu_status()
SIM = _OK and _WHY == "simulator"
if not _OK and "cannot be imported" in _WHY:  # a missing test dependency fails, never skips
    raise ImportError(f"numba-cuda is part of the [test] extra and cannot be imported: {_WHY}")
_IN_SUBPROCESS = not _OK and os.environ.get("KRYPTON_GPU_TEST_CHILD") is None
needs_device = pytest.mark.skipif(not _OK, reason=f"no GPU / simulator in this process: {_WHY}")
real_gpu = pytest.mark.skipif(not _OK or SIM, reason="needs a real CUDA GPU (here: "
                              f"{'the simulator' if SIM else _WHY}; with a GPU, /dev/nvidia* "
                              "present or NUMBA_ENABLE_CUDASIM=0, these run)")

if _OK:
    from numba import cuda

    from krypton_db.exec import kernels_gpu as KG

from krypton_db.planner.batching import peak_bytes_per_query
from krypton_db.planner.delta_plan import plan_occlusion

import krypton_db as kdb
from krypton_db.errors import KryptonError
from krypton_db.exec import kernels_cpu as KC
from krypton_db.exec import reference as R
from krypton_db.exec.cpu import CpuExecutor
from krypton_db.exec.incremental import IncrementalExecutor
from krypton_db.graph import Graph, Node, Op, infer_shape, pool_out_size


@pytest.fixture(scope="module", autouse=True)
def _fast_thread_switches():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # simulator threads hand the GIL over at every barrier
    yield
    sys.setswitchinterval(old)


if _IN_SUBPROCESS:  # defined only then: in-process, the tests below run here
    def test_simulator_in_subprocess():
        """numba.cuda was imported in driver mode before this module (no GPU): run this file
        in a fresh interpreter with the simulator and require it to pass."""
        _run_in_simulator_subprocess()


def _run_in_simulator_subprocess():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", KRYPTON_GPU_TEST_CHILD="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


# -- helpers ---------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)
A0 = np.float32(0.0)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a, np.float32))


def launch(kernel, n, *args):
    b, t = KG.launch1(n)
    kernel[b, t](*args)


def cnhw(x):
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(1, 0, 2, 3))


def nchw(x):
    return np.asarray(x).transpose(1, 0, 2, 3)


def conv_node(cin, cout, k=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), groups=1, hw=(7, 6)):
    w = RNG.normal(0, 0.5, (cout, cin // groups) + tuple(k)).astype(np.float32)
    b = RNG.normal(0, 0.1, cout).astype(np.float32)
    p = {"kernel": tuple(k), "stride": tuple(stride), "pads": tuple(pads), "dilation": tuple(dil),
         "groups": groups}
    shape = infer_shape(Op.CONV, p, [(cin,) + tuple(hw)], {"W": w})
    return Node("conv", Op.CONV, ("x",), p, {"W": w, "B": b}, shape)


def tiny_graph(specs, in_shape):
    """Graph from [(op, inputs, params, weights)], node names n1, n2, ...; output = last."""
    nodes = [Node("x", Op.INPUT, (), {}, {}, tuple(in_shape))]
    shapes = {"x": tuple(in_shape)}
    for i, (op, ins, params, weights) in enumerate(specs, 1):
        shp = infer_shape(op, params, [shapes[s] for s in ins], weights)
        nodes.append(Node(f"n{i}", op, tuple(ins), params, weights, shp))
        shapes[f"n{i}"] = shp
    return Graph(nodes, nodes[-1].name, "tiny")


# -- kernels ---------------------------------------------------------------------------------------


@needs_device
@pytest.mark.parametrize("fill", [0.0, -np.inf])
def test_gather_border_and_patch_overlap(fill):
    c, h, w, b, ph, pw = 2, 6, 7, 5, 2, 3
    view = RNG.normal(size=(c, h, w)).astype(np.float32)
    patch = RNG.normal(size=(c, b, ph, pw)).astype(np.float32)
    ploc = np.array([[0, 0], [4, 4], [2, 1], [0, 4], [3, 0]], np.int64)
    # contexts hanging over every border, one covering the whole patch, some half of it
    rloc = np.array([[-2, -1], [3, 4], [1, 2], [-1, 5], [4, -2]], np.int64)
    hr, wr = 4, 5
    out = cuda.device_array((c, b, hr, wr), np.float32)
    launch(KG.gather_patch_gpu, out.size, dev(view), dev(patch), cuda.to_device(ploc),
           cuda.to_device(rloc), np.float32(fill), out)
    want = np.empty((c, b, hr, wr), np.float32)
    for q in range(b):
        full = view.copy()
        full[:, ploc[q, 0] : ploc[q, 0] + ph, ploc[q, 1] : ploc[q, 1] + pw] = patch[:, q]
        padded = np.full((c, h + 8, w + 8), fill, np.float32)
        padded[:, 4 : 4 + h, 4 : 4 + w] = full
        y, x = rloc[q] + 4
        want[:, q] = padded[:, y : y + hr, x : x + wr]
    np.testing.assert_array_equal(out.copy_to_host(), want)


@needs_device
def test_stitch_and_repeat():
    c, h, w, b = 3, 5, 6, 4
    view = RNG.normal(size=(c, h, w)).astype(np.float32)
    patch = RNG.normal(size=(c, b, 2, 3)).astype(np.float32)
    ploc = np.array([[0, 0], [3, 3], [1, 2], [3, 0]], np.int64)
    out = cuda.device_array((c, b, h, w), np.float32)
    launch(KG.stitch_patch_gpu, out.size, dev(view), dev(patch), cuda.to_device(ploc), out)
    want = np.repeat(view[:, None], b, axis=1)
    for q, (y, x) in enumerate(ploc):
        want[:, q, y : y + 2, x : x + 3] = patch[:, q]
    np.testing.assert_array_equal(out.copy_to_host(), want)
    rep = cuda.device_array((c, b, h, w), np.float32)
    launch(KG.repeat_batch_gpu, rep.size, dev(view[:, None]), rep)
    np.testing.assert_array_equal(rep.copy_to_host(), np.repeat(view[:, None], b, axis=1))


CONV_CASES = {
    "plain": {"cin": 3, "cout": 5},
    "stride2_asym": {"cin": 4, "cout": 3, "k": (3, 2), "stride": (2, 2), "pads": (1, 0, 0, 1)},
    "groups": {"cin": 4, "cout": 6, "groups": 2},
    "dilation": {"cin": 2, "cout": 3, "dil": (2, 2), "pads": (2, 2, 2, 2)},
    "depthwise": {"cin": 4, "cout": 4, "groups": 4, "stride": (2, 1)},
    "1x1": {"cin": 5, "cout": 3, "k": (1, 1), "pads": (0, 0, 0, 0)},
}


@needs_device
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_kernels_vs_reference(case):
    node = conv_node(**CONV_CASES[case], hw=(6, 5))
    n = 2
    x = RNG.normal(size=(n,) + (CONV_CASES[case]["cin"], 6, 5)).astype(np.float32)
    want = R.run_node(node, [x])
    p = node.params
    t, l, _, _ = p["pads"]
    w, b = node.weights["W"], node.weights["B"]
    out = cuda.device_array((node.shape[0], n) + node.shape[1:], np.float32)
    launch(KG.conv_direct_gpu, out.size, dev(cnhw(x)), dev(w), dev(b), *p["stride"], *p["dilation"],
           t, l, p["groups"], KC.ACT_NONE, A0, A0, out)
    np.testing.assert_allclose(nchw(out.copy_to_host()), want, rtol=1e-5, atol=1e-5)
    if p["groups"] == 1 or case == "groups":
        out2 = cuda.device_array(out.shape, np.float32)
        tiles = p["groups"] * (-(-node.shape[0] // p["groups"] // KG.TILE)) * (-(-out.size // node.shape[0] // KG.TILE))
        blocks, thr = KG.launch_tiles(tiles)
        KG.conv_gemm_gpu[blocks, thr](dev(cnhw(x)), dev(w.reshape(w.shape[0], -1)), dev(b), *p["kernel"],
                                      *p["stride"], *p["dilation"], t, l, p["groups"], KC.ACT_NONE, A0, A0, out2)
        np.testing.assert_allclose(nchw(out2.copy_to_host()), want, rtol=1e-5, atol=1e-5)


ACTS = {  # code, a0, a1, numpy
    "relu": (KC.ACT_RELU, 0.0, 0.0, lambda v: np.maximum(v, 0)),
    "clip": (KC.ACT_CLIP, -0.3, 0.6, lambda v: np.clip(v, -0.3, 0.6)),
    "leaky": (KC.ACT_LEAKY, 0.1, 0.0, lambda v: np.where(v >= 0, v, 0.1 * v)),
    "sigmoid": (KC.ACT_SIGMOID, 0.0, 0.0, lambda v: 1 / (1 + np.exp(-v))),
    "hsigmoid": (KC.ACT_HSIGMOID, 0.2, 0.5, lambda v: np.clip(0.2 * v + 0.5, 0, 1)),
    "hswish": (KC.ACT_HSWISH, 0.0, 0.0, lambda v: v * np.clip(v / 6 + 0.5, 0, 1)),
    "elu": (KC.ACT_ELU, 0.7, 0.0, lambda v: np.where(v >= 0, v, 0.7 * np.expm1(np.minimum(v, 0)))),
}


@needs_device
@pytest.mark.parametrize("act", list(ACTS))
def test_fused_epilogue_and_pointwise(act):
    code, a0, a1, f = ACTS[act]
    node = conv_node(2, 3, stride=(2, 2), hw=(5, 5))
    x = RNG.normal(size=(1, 2, 5, 5)).astype(np.float32) * 3
    want = f(R.run_node(node, [x]))
    out = cuda.device_array((3, 1) + node.shape[1:], np.float32)
    launch(KG.conv_direct_gpu, out.size, dev(cnhw(x)), dev(node.weights["W"]), dev(node.weights["B"]),
           2, 2, 1, 1, 1, 1, 1, code, np.float32(a0), np.float32(a1), out)
    np.testing.assert_allclose(nchw(out.copy_to_host()), want, rtol=1e-5, atol=1e-6)
    v = (RNG.normal(size=40) * 5).astype(np.float32)
    o = cuda.device_array(40, np.float32)
    launch(KG.act_flat_gpu, 40, dev(v), o, code, np.float32(a0), np.float32(a1))
    np.testing.assert_allclose(o.copy_to_host(), f(v.astype(np.float64)), rtol=1e-5, atol=1e-6)


@needs_device
@pytest.mark.parametrize("rows_bias", [True, False])
def test_matmul_tiled(rows_bias):
    m, k, n = 6, 9, 7  # none a multiple of the tile
    a = RNG.normal(size=(m, k)).astype(np.float32)
    b = RNG.normal(size=(k, n)).astype(np.float32)
    bias = RNG.normal(size=m if rows_bias else n).astype(np.float32)
    out = cuda.device_array((m, n), np.float32)
    blocks, thr = KG.launch_tiles((-(-m // KG.TILE)) * (-(-n // KG.TILE)))
    KG.matmul_tiled_gpu[blocks, thr](dev(a), dev(b), out, dev(bias), rows_bias, KC.ACT_RELU, A0, A0)
    want = a.astype(np.float64) @ b + (bias[:, None] if rows_bias else bias[None, :])
    np.testing.assert_allclose(out.copy_to_host(), np.maximum(want, 0), rtol=1e-5, atol=1e-5)
    y = dev(a @ b)
    launch(KG.bias_act_rows_gpu, m * n, y, dev(bias), rows_bias, KC.ACT_NONE, A0, A0)
    np.testing.assert_allclose(y.copy_to_host(), want, rtol=1e-5, atol=1e-5)


POOLS = {
    "max_ceil": (True, (3, 3), (2, 2), (0, 0, 0, 0), True, False),
    "max_pad": (True, (3, 3), (2, 2), (1, 1, 1, 1), False, False),
    "avg_ceil_incl": (False, (3, 3), (2, 2), (1, 0, 1, 0), True, True),
    "avg_ceil_excl": (False, (2, 3), (2, 2), (0, 1, 0, 1), True, False),
    "avg_s1_incl": (False, (3, 3), (1, 1), (1, 1, 1, 1), False, True),
}


@needs_device
@pytest.mark.parametrize("case", list(POOLS))
def test_pool_vs_reference_and_cpu(case):
    is_max, k, s, pads, ceil, inc = POOLS[case]
    h, w = 7, 8
    x = RNG.normal(size=(2, 3, h, w)).astype(np.float32)
    ho = pool_out_size(h, k[0], s[0], pads[0], pads[2], 1, ceil)
    wo = pool_out_size(w, k[1], s[1], pads[1], pads[3], 1, ceil)
    want = R.maxpool2d(x, k, s, pads, (ho, wo)) if is_max else R.avgpool2d(x, k, s, pads, (ho, wo), inc)
    out = cuda.device_array((3, 2, ho, wo), np.float32)
    launch(KG.pool_cnhw_gpu, out.size, dev(cnhw(x)), *k, *s, *pads, is_max, inc, out)
    got = out.copy_to_host()
    np.testing.assert_allclose(nchw(got), want, rtol=1e-5, atol=1e-6)
    cpu = np.empty_like(got)
    KC.pool_cnhw_cpu(cnhw(x), *k, *s, *pads, is_max, inc, 0, 6, cpu)
    np.testing.assert_allclose(got, cpu, rtol=1e-6, atol=1e-6)


@needs_device
@pytest.mark.parametrize("inc", [True, False])
def test_avgpool_patch_vs_numpy(inc):
    c, b, h, w = 2, 4, 6, 6
    kh = kw = 3
    buf = RNG.normal(size=(c, b, 5, 5)).astype(np.float32)
    rloc = np.array([[-1, -1], [2, 2], [3, -1], [-1, 3]], np.int64)  # some over the borders
    out = cuda.device_array((c, b, 3, 3), np.float32)
    launch(KG.avgpool_patch_gpu, out.size, dev(buf), cuda.to_device(rloc), h, w, kh, kw, 1, 1,
           1, 1, 1, 1, inc, out)
    # numpy: window sums over the read-in buffer; the divisor counts, cell by cell, the
    # window's cells inside the input (or inside its declared 1-cell padding with inc)
    lo, hi_h, hi_w = (-1, h + 1, w + 1) if inc else (0, h, w)
    want = np.empty((c, b, 3, 3), np.float64)
    for q, (ry, rx) in enumerate(rloc):
        for oy in range(3):
            for ox in range(3):
                ys, xs = np.arange(ry + oy, ry + oy + kh), np.arange(rx + ox, rx + ox + kw)
                cnt = ((ys >= lo) & (ys < hi_h)).sum() * ((xs >= lo) & (xs < hi_w)).sum()
                want[:, q, oy, ox] = buf[:, q, oy : oy + kh, ox : ox + kw].sum(axis=(1, 2)) / cnt
    np.testing.assert_allclose(out.copy_to_host(), want, rtol=1e-5, atol=1e-6)


@needs_device
def test_every_op_graph_vs_reference():
    """A graph with every non-conv op (unfused, every node read back) vs the reference."""
    c = 4
    sc = RNG.uniform(0.5, 1.5, c).astype(np.float32)
    sh = RNG.normal(0, 0.1, c).astype(np.float32)
    w1 = RNG.normal(0, 0.5, (c, 3, 1, 1)).astype(np.float32)
    conv1 = {"kernel": (1, 1), "stride": (1, 1), "pads": (0, 0, 0, 0), "dilation": (1, 1), "groups": 1}
    fc = RNG.normal(0, 0.3, (3, 2 * c * 3 * 4)).astype(np.float32)
    specs = [
        (Op.CONV, ["x"], conv1, {"W": w1, "B": np.zeros(c, np.float32)}),  # n1 4x5x6 (1x1 GEMM)
        (Op.AFFINE, ["n1"], {}, {"scale": sc, "shift": sh}),  # n2
        (Op.HARD_SWISH, ["n2"], {}, {}),  # n3
        (Op.GLOBAL_AVGPOOL, ["n3"], {"keepdims": True}, {}),  # n4 4x1x1
        (Op.SIGMOID, ["n4"], {}, {}),  # n5
        (Op.MUL, ["n3", "n5"], {}, {}),  # n6 gate
        (Op.ADD, ["n6", "n2"], {}, {}),  # n7
        (Op.CLIP, ["n7"], {"lo": -0.5, "hi": 0.8}, {}),  # n8
        (Op.PAD, ["n8"], {"pads": (1, 0, 0, 2), "value": 0.25}, {}),  # n9 4x6x8
        (Op.LRN, ["n9"], {"size": 3, "alpha": 0.1, "beta": 0.75, "bias": 1.0}, {}),  # n10
        (Op.MAXPOOL, ["n10"], {"kernel": (2, 2), "stride": (2, 2), "pads": (0, 0, 0, 0), "ceil_mode": True}, {}),
        (Op.LEAKY_RELU, ["n9"], {"alpha": 0.2}, {}),  # n12
        (Op.AVGPOOL, ["n12"], {"kernel": (2, 2), "stride": (2, 2), "pads": (0, 0, 0, 0), "ceil_mode": True,
                               "count_include_pad": False}, {}),  # n13 4x3x4
        (Op.CONCAT, ["n11", "n13"], {}, {}),  # n14 8x3x4
        (Op.TRANSPOSE, ["n14"], {"perm": (1, 2, 0)}, {}),  # n15 3x4x8
        (Op.RESHAPE, ["n15"], {"shape": (2 * c * 3 * 4,)}, {}),  # n16
        (Op.GEMM, ["n16"], {}, {"W": fc, "B": RNG.normal(0, 0.1, 3).astype(np.float32)}),  # n17
        (Op.HARD_SIGMOID, ["n17"], {"alpha": 0.2, "beta": 0.5}, {}),  # n18
        (Op.GLOBAL_AVGPOOL, ["n13"], {"keepdims": False}, {}),  # n19 (4,)
        (Op.AFFINE, ["n19"], {}, {"scale": sc, "shift": sh}),  # n20 vector affine
        (Op.CONCAT, ["n20", "n18"], {}, {}),  # n21 (7,) vector concat
        (Op.SOFTMAX, ["n21"], {}, {}),  # n22
    ]
    g = tiny_graph(specs, (3, 5, 6))
    x = RNG.normal(size=(2, 3, 5, 6)).astype(np.float32)
    names = [n.name for n in g.nodes[1:]]
    want = R.run(g, x, names)
    ex = G.GpuExecutor(g, fuse=False)
    got = ex.run(x, names)
    for k in names:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@needs_device
def test_fused_add_and_gemm_conv_in_executor():
    """The executor's fused steps (conv + act, add + act) with both conv algorithms."""
    w = RNG.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)
    w2 = RNG.normal(0, 0.4, (4, 4, 1, 1)).astype(np.float32)
    cp = {"kernel": (3, 3), "stride": (2, 2), "pads": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1}
    c1 = {"kernel": (1, 1), "stride": (1, 1), "pads": (0, 0, 0, 0), "dilation": (1, 1), "groups": 1}
    specs = [
        (Op.CONV, ["x"], cp, {"W": w, "B": RNG.normal(0, 0.1, 4).astype(np.float32)}),
        (Op.RELU, ["n1"], {}, {}),
        (Op.CONV, ["n2"], c1, {"W": w2, "B": RNG.normal(0, 0.1, 4).astype(np.float32)}),
        (Op.ADD, ["n3", "n2"], {}, {}),
        (Op.LEAKY_RELU, ["n4"], {"alpha": 0.1}, {}),
        (Op.GLOBAL_AVGPOOL, ["n5"], {"keepdims": True}, {}),
    ]
    g = tiny_graph(specs, (3, 6, 5))
    x = RNG.normal(size=(2, 3, 6, 5)).astype(np.float32)
    want = R.run(g, x)["n6"]
    for algo in ("gemm", "direct"):
        ex = G.GpuExecutor(g, conv_algo=algo)
        assert [s.fused is not None for s in ex.plan.steps] == [True, False, True, False]
        np.testing.assert_allclose(ex.predict(x), want, rtol=1e-5, atol=1e-6)


# -- occlusion on tiny nets ----------------------------------------------------------------------


def _nets():
    from onnx_builders import Net

    def head(net, y, c, h, w, k=5):
        f = net.op("Flatten", [y], axis=1)
        return net.model(net.op("Softmax", [net.gemm(f, c * h * w, k)], axis=1))

    def vgg():
        net = Net((1, 3, 12, 12), seed=1)
        y = net.op("Relu", [net.conv("input", 3, 4)])
        y = net.op("MaxPool", [net.op("Relu", [net.conv(y, 4, 6, dil=(2, 2), pads=(2, 2, 2, 2))])],
                   kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)  # 6x6
        y = net.op("LeakyRelu", [net.conv(y, 6, 6, stride=(2, 2), pads=(1, 1, 0, 0))], alpha=0.1)
        return head(net, net.op("LRN", [y], size=3), 6, 3, 3)

    def resnet():
        net = Net((1, 3, 12, 12), seed=2)
        x = net.op("Relu", [net.bn(net.conv("input", 3, 4, stride=(2, 2), bias=False), 4)])  # 6x6
        a = net.op("Relu", [net.conv(x, 4, 4)])
        x = net.op("Relu", [net.op("Add", [net.conv(a, 4, 4), x])])
        d = net.conv(x, 4, 6, k=(1, 1), stride=(2, 2), pads=(0, 0, 0, 0))
        b = net.conv(net.op("Relu", [net.conv(x, 4, 6, stride=(2, 2))]), 6, 6)
        x = net.op("Relu", [net.op("Add", [b, d])])  # 3x3
        return head(net, x, 6, 3, 3)

    def inception():
        net = Net((1, 3, 12, 12), seed=3)
        x = net.op("Relu", [net.conv("input", 3, 4, stride=(2, 2), pads=(0, 0, 0, 0))])  # 5x5
        b1 = net.op("Relu", [net.conv(x, 4, 2, k=(1, 1), pads=(0, 0, 0, 0))])
        b2 = net.op("Relu", [net.conv(net.conv(x, 4, 2, k=(1, 3), pads=(0, 1, 0, 1)), 2, 2, k=(3, 1),
                                      pads=(1, 0, 1, 0))])
        b3 = net.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                    count_include_pad=0)
        b4 = net.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                    count_include_pad=1)
        x = net.op("Concat", [b1, b2, b3, b4], axis=1)  # 12 channels
        dw = net.op("HardSwish", [net.conv(x, 12, 12, group=12)])
        gate = net.op("HardSigmoid", [net.conv(net.op("GlobalAveragePool", [dw]), 12, 12, k=(1, 1),
                                               pads=(0, 0, 0, 0))])
        x = net.op("GlobalAveragePool", [net.op("Mul", [dw, gate])])
        return head(net, x, 12, 1, 1)

    return {"vgg": vgg, "resnet": resnet, "inception": inception}


_MODELS: dict = {}


def tiny_model(name, tmp_path_factory):
    if name not in _MODELS:
        import onnx

        p = tmp_path_factory.mktemp("gpu_nets") / f"{name}.onnx"
        onnx.save(_nets()[name](), p)
        _MODELS[name] = kdb.load_model(p)
    return _MODELS[name]


def occlusion_probs(make_inc, x, patch, stride, bs=4):
    """All grid positions' output [P, classes] from an incremental executor, in batches."""
    c, h, w = x.shape
    ys = np.arange(0, h - patch + 1, stride)
    xs = np.arange(0, w - patch + 1, stride)
    pos = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    pv = np.full((c, patch, patch), 0.3, np.float32)
    inc = make_inc()
    base = inc.materialize(x)
    outs = [inc.run_batch(pos[i : i + bs], pv) for i in range(0, len(pos), bs)]
    return base, np.concatenate(outs), pos, pv


def naive_probs(ex, x, pos, pv):
    batch = np.repeat(x[None], len(pos), axis=0)
    ph, pw = pv.shape[1:]
    for i, (y, xx) in enumerate(pos):
        batch[i, :, y : y + ph, xx : xx + pw] = pv
    return ex.predict(batch)


@needs_device
@pytest.mark.parametrize("name", ["vgg", "resnet", "inception"])
def test_exact_occlusion_equals_cpu_and_naive(name, tmp_path_factory):
    m = tiny_model(name, tmp_path_factory)
    g = m.graph
    x = RNG.random(g.input_shape).astype(np.float32)
    cpu = CpuExecutor(g)
    plan = plan_occlusion(g, (3, 3), cpu.plan)
    gex = G.GpuExecutor(g)
    gbase, gp, pos, pv = occlusion_probs(lambda: GpuIncrementalExecutor(plan, gex), x, 3, 4)
    cbase, cp, _, _ = occlusion_probs(lambda: IncrementalExecutor(plan, cpu), x, 3, 4)
    assert gp.shape == (9, 5)
    np.testing.assert_allclose(gbase, cbase, atol=1e-6)
    assert np.abs(gp - cp).max() <= 1e-5
    assert np.abs(gp - naive_probs(cpu, x, pos, pv)).max() <= 1e-5
    assert gp.std(axis=0).max() > 1e-5  # the position matters
    # both size batches by the same liveness walk over their own physical steps
    assert GpuIncrementalExecutor(plan, gex).bytes_per_query() == peak_bytes_per_query(plan, "gpu")
    assert IncrementalExecutor(plan, cpu).bytes_per_query() == peak_bytes_per_query(plan, "cpu")


@pytest.mark.slow
@needs_device
def test_exact_occlusion_tiled_gemm_convs_and_border_positions(tmp_path_factory):
    """The GPU's own conv lowering (implicit GEMM + tiled 1x1 GEMM) end to end, on the
    positions at the corners/edges (border rule) and the GPU naive path."""
    m = tiny_model("resnet", tmp_path_factory)
    g = m.graph
    x = RNG.random(g.input_shape).astype(np.float32)
    cpu = CpuExecutor(g)
    plan = plan_occlusion(g, (4, 3), cpu.plan)
    gex = G.GpuExecutor(g, conv_algo="gemm")
    pos = np.array([[0, 0], [0, 9], [8, 0], [8, 9], [5, 4]])
    pv = np.full((3, 4, 3), -0.5, np.float32)
    gi = GpuIncrementalExecutor(plan, gex)
    gi.materialize(x)
    ci = IncrementalExecutor(plan, cpu)
    ci.materialize(x)
    gp = gi.run_batch(pos, pv)
    assert np.abs(gp - ci.run_batch(pos, pv)).max() <= 1e-5
    assert np.abs(gp - naive_probs(gex, x, pos, pv)).max() <= 1e-5


@pytest.mark.slow
@needs_device
def test_occlude_api_device_gpu(tmp_path_factory):
    """The public ``occlude(device='gpu')`` (exact, approximate and naive) equals the CPU."""
    from krypton_db.occlusion import occlude

    m = tiny_model("vgg", tmp_path_factory)
    img = RNG.random(m.spec.size + (3,)).astype(np.float32)
    want = occlude(m, img, patch=3, stride=4)
    for kw in (dict(), dict(mode="naive"), dict(mode="approximate", tau=0.5)):
        got = occlude(m, img, patch=3, stride=4, device="gpu", **kw)
        ref = occlude(m, img, patch=3, stride=4, **kw)
        assert got.stats["device"] == "gpu" and np.abs(got.probs - ref.probs).max() <= 1e-5
    assert np.abs(occlude(m, img, patch=3, stride=4, device="gpu").probs - want.probs).max() <= 1e-5


@needs_device
def test_occlude_gpu_hooks(tmp_path_factory):
    """``hooks=`` on the GPU executor: every step timed, progress to the total, the plan
    rewrite (naive_from) applied with the same probabilities."""
    from krypton_db.hooks import OcclusionHooks
    from krypton_db.occlusion import occlude
    from krypton_db.research import naive_from_rewrite

    m = tiny_model("resnet", tmp_path_factory)
    img = RNG.random(m.spec.size + (3,)).astype(np.float32)
    calls = []
    layer = m.executor.plan.steps[2].node.name
    hooks = OcclusionHooks(plan_rewrite=naive_from_rewrite(layer), profile=True,
                           on_batch=lambda d, t: calls.append((d, t)))
    got = occlude(m, img, patch=3, stride=4, device="gpu", batch_size=4, hooks=hooks)
    ref = occlude(m, img, patch=3, stride=4)
    assert np.abs(got.probs - ref.probs).max() <= 1e-5
    plan = plan_occlusion(m.graph, (3, 3), m.executor.plan)
    assert set(hooks.step_secs) == {ds.node.name for ds in plan.steps}
    assert hooks.materialize_s > 0
    n = got.probs.size
    assert calls[-1] == (n, n) and len(calls) == -(-n // 4)


@needs_device
def test_approximate_tau_matches_cpu(tmp_path_factory):
    m = tiny_model("vgg", tmp_path_factory)
    g = m.graph
    x = RNG.random(g.input_shape).astype(np.float32)
    cpu = CpuExecutor(g)
    plan = plan_occlusion(g, (3, 3), cpu.plan, tau=0.4)
    assert any(s.cap is not None for s in plan.steps)  # the threshold binds somewhere
    _, gp, pos, pv = occlusion_probs(lambda: GpuIncrementalExecutor(plan, G.GpuExecutor(g)), x, 3, 4)
    _, cp, _, _ = occlusion_probs(lambda: IncrementalExecutor(plan, cpu), x, 3, 4)
    assert np.abs(gp - cp).max() <= 1e-5
    exact = naive_probs(cpu, x, pos, pv)
    assert np.abs(gp - exact).max() < 0.5  # an approximation of the exact heat map


# -- real-GPU compilation (PTX) without a GPU ----------------------------------------------------

_PTX_CHILD = r"""
import sys, types, warnings
import numpy as np, numba
from numba import cuda
try:  # NVVM (the CUDA toolkit's compiler library) is needed, a driver is not
    cuda.compile_ptx(lambda a: None, (numba.float32[::1],), cc=(9, 0))
except Exception as e:
    print(f"no NVVM: {type(e).__name__}: {str(e)[:200]}"); sys.exit(77)
import numba.cuda.dispatcher as D
if not hasattr(D, "get_current_device"):
    print("numba-cuda internals changed (dispatcher.get_current_device)"); sys.exit(77)
# device functions are compiled for the current device's cc: pretend an sm_90 one
D.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from krypton_db.exec import kernels_gpu as K
assert not K.SIM and K.TILE == 16
A = lambda *s: np.zeros(s, np.float32)
I = lambda *s: np.zeros(s, np.int64)
z = np.float32(0)
x4, v3 = A(2, 2, 5, 5), A(2, 5, 5)
cases = [
    ("gather_patch_gpu", (v3, A(2, 3, 4, 4)[:, :, 1:3, 1:3], I(3, 2), I(3, 2), z, A(2, 3, 4, 4))),
    ("stitch_patch_gpu", (v3, A(2, 3, 2, 2), I(3, 2), A(2, 3, 5, 5))),
    ("avgpool_patch_gpu", (x4, I(2, 2), 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, True, x4)),
    ("repeat_batch_gpu", (A(2, 1, 5, 5), x4)),
    ("conv_direct_gpu", (x4, A(2, 2, 3, 3), A(2), 1, 1, 1, 1, 1, 1, 1, 1, z, z, x4)),
    ("matmul_tiled_gpu", (A(3, 4), A(4, 5), A(3, 5), A(3), True, 1, z, z)),
    ("conv_gemm_gpu", (x4, A(2, 18), A(2), 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, z, z, x4)),
    ("bias_act_rows_gpu", (A(3, 5), A(3), True, 1, z, z)),
    ("pool_cnhw_gpu", (x4, 3, 3, 2, 2, 1, 1, 1, 1, True, False, x4)),
    ("global_avgpool_gpu", (x4, A(2, 2), False)),
    ("act_flat_gpu", (A(10), A(10), 4, z, z)),
    ("affine_gpu", (A(2, 10), A(2), A(2), 0, A(2, 10))),
    ("add_act_gpu", (A(10), A(10), A(10), 1, z, z)),
    ("binary_bcast_gpu", (x4, A(2, 2, 1, 1), x4, True, 6, z, z)),
    ("copy_offset4_gpu", (x4[:, :, 1:3, :], A(2, 2, 2, 5), 0, 0)),
    ("permute4_gpu", (x4, x4, 1, 0, 2, 3)),
    ("pad_cnhw_gpu", (x4, 1, 1, z, A(2, 2, 7, 7))),
    ("lrn_cnhw_gpu", (x4, 3, np.float32(1e-4), np.float32(0.75), np.float32(1.0), x4)),
    ("softmax_rows_gpu", (A(3, 5), A(3, 5))),
]
bad = []
for name, args in cases:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cuda.compile_ptx(getattr(K, name).py_func, tuple(numba.typeof(a) for a in args), cc=(9, 0))
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
missing = sorted(n for n in dir(K) if n.endswith("_gpu") and n not in {c[0] for c in cases})
print("\n".join(bad) or f"compiled {len(cases)} kernels"); print("untested:", missing)
sys.exit(1 if bad or missing else 0)
"""


@pytest.mark.slow
def test_kernels_compile_to_ptx_for_a_real_gpu():
    """Every kernel passes numba-cuda's type inference + NVVM for sm_90 in driver mode (the
    simulator runs any Python; this is what catches code a real GPU would reject). Needs NVVM
    from the CUDA toolkit (numba-cuda[cu12]); no driver or GPU."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["NUMBA_ENABLE_CUDASIM"] = "0"
    r = subprocess.run([sys.executable, "-c", _PTX_CHILD], env=env, capture_output=True, text=True, check=False,
                       timeout=300)
    if r.returncode == 77:
        pytest.skip(f"cannot compile PTX here: {r.stdout.strip()}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# -- errors -------------------------------------------------------------------------------------


def test_unavailable_error_message(monkeypatch):
    monkeypatch.setattr(G, "_K", None)
    monkeypatch.setattr(G, "gpu_status", lambda: (False, "no CUDA driver"))
    g = tiny_graph([(Op.RELU, ["x"], {}, {})], (1, 2, 2))
    with pytest.raises(G.GpuUnavailableError, match=r"device='gpu' needs a CUDA GPU and the numba-cuda "
                                                     r"package; none found: no CUDA driver") as e:
        G.GpuExecutor(g)
    assert isinstance(e.value, KryptonError)


def test_cupy_probe_is_safe():
    assert G.cupy_available() in (True, False)


# -- real GPU only ------------------------------------------------------------------------------


@real_gpu
@pytest.mark.gpu
def test_real_gpu_zoo_resnet18_exact_equals_cpu():
    m = kdb.load_model("zoo:resnet18")
    img = m.preprocess(kdb.sample_image("chelsea"))
    x = m.to_nchw(img[None])[0]
    plan = plan_occlusion(m.graph, (16, 16), m.executor.plan)
    gi = GpuIncrementalExecutor(plan, G.GpuExecutor(m.graph))
    ci = IncrementalExecutor(plan, m.executor)
    gi.materialize(x)
    ci.materialize(x)
    pos = np.array([[0, 0], [208, 208], [104, 0], [50, 170], [100, 100]])
    pv = np.zeros((3, 16, 16), np.float32)
    assert np.abs(gi.run_batch(pos, pv) - ci.run_batch(pos, pv)).max() <= 1e-5


@real_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("use_cupy", [False, True])
def test_real_gpu_dense_paths(use_cupy):
    if use_cupy and not G.cupy_available():
        pytest.skip("CuPy not installed")
    m = kdb.load_model("zoo:vgg16")
    x = RNG.random((2,) + m.graph.input_shape).astype(np.float32)
    got = G.GpuExecutor(m.graph, use_cupy=use_cupy).predict(x)
    assert np.abs(got - m.executor.predict(x)).max() <= 1e-5
