"""Every layer type: ONNX Runtime (oracle) == numpy reference == numba CPU executor, on small
shapes with odd sizes, padding, strides that do not divide the size, groups and ceil mode."""

import numpy as np
import onnx
import pytest
from conftest import rel_err
from onnx_builders import Net, ort_run

from krypton_db.exec import dense_cpu
from krypton_db.exec import reference
from krypton_db.exec.cpu import CpuExecutor
from krypton_db.graph import Op
from krypton_db.onnx_import import import_onnx


def check(model: onnx.ModelProto, shape, tmp_path, tol=1e-4, expect_ops=None, seed=1):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    g, layout, _ = import_onnx(path)
    x = np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)
    want = ort_run(model, x)[0]
    xin = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "NHWC" else x
    ref = reference.run(g, xin)[g.output]
    got = CpuExecutor(g).predict(xin)
    assert ref.shape == want.shape
    assert rel_err(ref, want) <= tol, ("reference", rel_err(ref, want))
    assert rel_err(got, want) <= tol, ("cpu", rel_err(got, want))
    if expect_ops is not None:
        assert [n.op for n in g.nodes[1:]] == expect_ops
    return g


CONVS = [
    dict(k=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1)),
    dict(k=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),
    dict(k=(5, 5), stride=(3, 3), pads=(2, 1, 0, 2)),  # asymmetric, stride does not divide
    dict(k=(1, 7), stride=(1, 1), pads=(0, 3, 0, 3)),
    dict(k=(7, 1), stride=(1, 1), pads=(3, 0, 3, 0)),
    dict(k=(3, 3), stride=(1, 1), pads=(2, 2, 2, 2), dil=(2, 2)),
    dict(k=(3, 3), stride=(1, 2), pads=(1, 1, 1, 1), group=2),
    dict(k=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1), group=6, cout=6),  # depthwise
    dict(k=(1, 1), stride=(1, 1), pads=(0, 0, 0, 0)),
    dict(k=(1, 1), stride=(2, 2), pads=(0, 0, 0, 0)),
    dict(k=(1, 1), stride=(2, 3), pads=(0, 0, 0, 0), group=2),  # subsampled input, one GEMM per group
    dict(k=(1, 1), stride=(2, 2), pads=(1, 0, 0, 1)),  # padded: the phase-plane route
    dict(k=(4, 4), stride=(4, 4), pads=(0, 0, 0, 0)),
]


@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: str(c))
def test_conv(cfg, tmp_path):
    cfg = dict(cfg)
    cout = cfg.pop("cout", 8)
    net = Net((2, 6, 11, 13))
    y = net.conv("input", 6, cout, **cfg)
    check(net.model(net.op("Flatten", [y], axis=1)), (2, 6, 11, 13), tmp_path)


@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (3, 3, 150, 131)], ids=["small-planes", "large-planes"])
@pytest.mark.parametrize("cfg", [
    dict(k=(3, 3), pads=(1, 1, 1, 1)), dict(k=(5, 5), pads=(2, 2, 2, 2)),
    dict(k=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)), dict(k=(5, 5), stride=(2, 2), pads=(2, 2, 2, 2)),
    dict(k=(3, 3), stride=(2, 2), pads=(0, 0, 1, 1)), dict(k=(5, 5), stride=(2, 2), pads=(1, 2, 2, 1)),
    dict(k=(3, 3), pads=(2, 1, 2, 3), dil=(2, 2)), dict(k=(1, 7), pads=(0, 3, 0, 3)),
    dict(k=(7, 7), pads=(3, 3, 3, 3)), dict(k=(5, 3), pads=(0, 1, 4, 1)),
    dict(k=(3, 3), stride=(1, 2), pads=(1, 1, 1, 1))], ids=str)
def test_depthwise_blocks(cfg, shape, tmp_path):
    """Depthwise convs against ORT on many small planes (several images side by side in one
    stage block; the executor's two threads split a channel's images) and on planes larger
    than a block (``depthwise_cpu.DW_STAGE``: one image per block): the register-blocked 3x3
    and 5x5 windows at stride 1 and 2, and the per-kernel-row path for the others."""
    net = Net(shape)  # 3 channels x an odd batch: the threads' ranges split a channel
    y = net.conv("input", 3, 3, group=3, **cfg)
    check(net.model(net.op("Flatten", [y], axis=1)), shape, tmp_path)


def test_conv_auto_pad_same(tmp_path):
    net = Net((1, 3, 9, 10))
    w = net.const(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32))
    y = net.op("Conv", ["input", w], auto_pad="SAME_UPPER", strides=[2, 2], kernel_shape=[3, 3])
    check(net.model(net.op("Flatten", [y], axis=1)), (1, 3, 9, 10), tmp_path)


POOLS = [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", dict(kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 1, 1], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
                         count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
    # stride 1 runs on the padded flat-grid kernel: asymmetric pads, no pads, 5x3 windows
    ("AveragePool", dict(kernel_shape=[3, 2], strides=[1, 1], pads=[2, 0, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[3, 2], strides=[1, 1], pads=[2, 0, 1, 1], count_include_pad=0)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[1, 1])),
    ("AveragePool", dict(kernel_shape=[5, 3], strides=[1, 1], pads=[2, 1, 2, 1], count_include_pad=0)),
]


@pytest.mark.parametrize("op,attrs", POOLS, ids=lambda v: str(v))
def test_pool(op, attrs, tmp_path):
    net = Net((2, 3, 12, 11))
    y = net.op(op, ["input"], **attrs)
    check(net.model(net.op("Flatten", [y], axis=1)), (2, 3, 12, 11), tmp_path)


@pytest.mark.parametrize("keepdims", [0, 1])
def test_global_pool_and_reduce_mean(keepdims, tmp_path):
    net = Net((2, 5, 7, 9))
    a = net.op("GlobalAveragePool", ["input"])
    b = net.op("ReduceMean", ["input"], axes=[2, 3], keepdims=keepdims)
    a = net.op("Flatten", [a], axis=1)
    b = net.op("Flatten", [b], axis=1) if keepdims else b
    y = net.op("Add", [a, b])
    check(net.model(y), (2, 5, 7, 9), tmp_path)


ACTS = [
    ("Relu", {}, []), ("LeakyRelu", {"alpha": 0.2}, []), ("Sigmoid", {}, []),
    ("HardSigmoid", {"alpha": 0.25, "beta": 0.4}, []), ("HardSwish", {}, []),
    ("Clip", {}, [np.float32(-0.5), np.float32(0.7)]), ("Elu", {"alpha": 0.7}, []),
]


@pytest.mark.parametrize("op,attrs,consts", ACTS, ids=lambda v: str(v))
def test_pointwise_fused_and_standalone(op, attrs, consts, tmp_path):
    net = Net((2, 4, 6, 5))
    c = net.conv("input", 4, 4)  # conv + activation: fused epilogue
    a = net.op(op, [c] + [net.const(v) for v in consts], **attrs)
    b = net.op(op, ["input"] + [net.const(v) for v in consts], **attrs)  # standalone
    y = net.op("Add", [a, b])
    check(net.model(net.op("Flatten", [y], axis=1)), (2, 4, 6, 5), tmp_path)


def test_batchnorm_folded_and_affine(tmp_path):
    net = Net((2, 3, 8, 8))
    c = net.bn(net.conv("input", 3, 6, bias=False), 6)  # folded into the conv
    r = net.bn(net.op("Relu", [c]), 6)  # after a ReLU: stays an AFFINE node
    g = check(net.model(net.op("Flatten", [r], axis=1)), (2, 3, 8, 8), tmp_path)
    assert [n.op for n in g.nodes[1:]] == [Op.CONV, Op.RELU, Op.AFFINE, Op.RESHAPE]


def test_residual_sum_and_se_gate(tmp_path):
    net = Net((2, 8, 9, 7))
    a = net.op("Relu", [net.conv("input", 8, 8)])
    b = net.conv(a, 8, 8)
    res = net.op("Relu", [net.op("Add", [b, "input"])])
    s3 = net.op("Sum", [res, a, b])
    gate = net.op("HardSigmoid", [net.conv(net.op("GlobalAveragePool", [s3]), 8, 8, k=(1, 1),
                                           pads=(0, 0, 0, 0))])
    y = net.op("Mul", [s3, gate])
    g = check(net.model(net.op("Flatten", [y], axis=1)), (2, 8, 9, 7), tmp_path)
    assert Op.MUL in {n.op for n in g.nodes}


def test_concat_lrn_pad(tmp_path):
    net = Net((2, 4, 10, 10))
    a = net.conv("input", 4, 3, k=(1, 1), pads=(0, 0, 0, 0))
    p = net.op("Pad", ["input", net.const(np.array([0, 0, 1, 0, 0, 0, 1, 2], np.int64))])
    b = net.conv(p, 4, 5, pads=(0, 0, 0, 0))  # zero pad folds into the conv
    pv = net.op("Pad", ["input", net.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                        net.const(np.float32(0.5))])
    c = net.op("MaxPool", [pv], kernel_shape=[3, 3], strides=[1, 1])
    cat = net.op("Concat", [a, b, c], axis=1)
    y = net.op("LRN", [cat], size=5, alpha=1e-3, beta=0.75, bias=2.0)
    g = check(net.model(net.op("Flatten", [y], axis=1)), (2, 4, 10, 10), tmp_path)
    assert sum(n.op is Op.PAD for n in g.nodes) == 1


def test_classifier_head_variants(tmp_path):
    """torch-style view(x.size(0), -1) shape subgraph, Gemm transB 0/1, MatMul + Add, Dropout,
    Identity, Softmax; NHWC input with a leading Transpose (Keras)."""
    net = Net((2, 6, 5, 3))  # NHWC
    t = net.op("Transpose", ["input"], perm=[0, 3, 1, 2])
    c = net.op("Relu", [net.conv(t, 3, 4)])
    shp = net.op("Shape", [c])
    n0 = net.op("Gather", [shp, net.const(np.array(0, np.int64))], axis=0)
    n0 = net.op("Unsqueeze", [n0, net.const(np.array([0], np.int64))])
    tgt = net.op("Concat", [n0, net.const(np.array([-1], np.int64))], axis=0)
    f = net.op("Reshape", [c, tgt])
    h = net.op("Dropout", [net.gemm(f, 4 * 6 * 5, 10, trans_b=0)])
    h = net.op("Identity", [net.op("Relu", [h])])
    w = net.const(np.random.default_rng(3).normal(size=(10, 7)).astype(np.float32))
    mm = net.op("Add", [net.op("MatMul", [h, w]), net.const(np.arange(7, dtype=np.float32))])
    y = net.op("Softmax", [net.gemm(mm, 7, 5)], axis=1)
    g = check(net.model(y), (2, 6, 5, 3), tmp_path)
    assert g[g.output].op is Op.SOFTMAX


def test_nhwc_flatten_order(tmp_path):
    """Keras flattens NHWC: Transpose back to channels-last before Reshape."""
    net = Net((2, 7, 6, 3))
    t = net.op("Transpose", ["input"], perm=[0, 3, 1, 2])
    c = net.conv(t, 3, 4, stride=(2, 2))
    back = net.op("Transpose", [c], perm=[0, 2, 3, 1])
    f = net.op("Reshape", [back, net.const(np.array([-1, 4 * 4 * 3], np.int64))])
    check(net.model(net.gemm(f, 48, 6)), (2, 7, 6, 3), tmp_path)


@pytest.mark.parametrize("cin,cout,hw,n,k,pads,dil", [
    (32, 48, (7, 7), 40, (3, 3), (1, 1, 1, 1), 1),     # ResNet18 layer4-like
    (40, 40, (17, 17), 20, (1, 7), (0, 3, 0, 3), 1),   # Inception 1x7 at 17x17
    (32, 32, (9, 6), 50, (3, 3), (2, 2, 2, 2), 2),     # dilated, non-square
])
def test_small_map_convs_through_chwb(cin, cout, hw, n, k, pads, dil):
    """Stride-1 convs on small maps with enough columns per row run through the CHWB
    row-segment kernels (cpu.CHWB_MIN_WASTE); they must equal the numpy reference."""
    from krypton_db.exec import cpu as C
    from krypton_db.exec import reference
    from krypton_db.graph import Graph, Node, Op

    rng = np.random.default_rng(1)
    w = rng.normal(size=(cout, cin) + k).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    x_node = Node("x", Op.INPUT, (), {}, {}, (cin,) + hw)
    conv = Node("c", Op.CONV, ("x",), dict(kernel=k, stride=(1, 1), pads=pads,
                                           dilation=(dil, dil), groups=1), {"W": w, "B": b},
                (cout,) + hw)
    g = Graph([x_node, conv], "c")
    x = rng.normal(size=(n, cin) + hw).astype(np.float32)
    calls = []
    from krypton_db.planner import algorithms as A

    real, wino, wino1 = dense_cpu._conv_via_chwb, A.WINOGRAD, A.WINOGRAD1D
    dense_cpu._conv_via_chwb = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    # 3x3 and 1x7 stride-1 convs otherwise take the Winograd routes (test_winograd*.py)
    A.WINOGRAD = A.WINOGRAD1D = False
    try:
        got = C.CpuExecutor(g).predict(x)
    finally:
        dense_cpu._conv_via_chwb, A.WINOGRAD, A.WINOGRAD1D = real, wino, wino1
    assert calls, "the CHWB route was not taken"
    want = reference.run(g, x)["c"]
    assert rel_err(got, want) <= 1e-5
