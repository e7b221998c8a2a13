"""check_delta: for each layer type, sweep kernel / stride / padding / dilation / groups /
patch position (corners, borders, straddling stride boundaries, non-square): the rule's output
region covers every cell that a brute-force full recompute changes, and materialized view +
delta (stitched) equals full recompute."""

import itertools

import numpy as np
import pytest

from krypton_db.exec import reference
from krypton_db.exec.incremental import IncrementalExecutor, window_locations
from krypton_db.graph import Graph, Node, Op, infer_shape
from krypton_db.planner.delta_plan import plan_occlusion
from krypton_db.planner.ivm import DELTA_RULES, rule_for

RNG = np.random.default_rng(11)


def node(name, op, inputs, in_shapes, params=None, weights=None):
    params, weights = params or {}, weights or {}
    return Node(name, op, tuple(inputs), params, weights, infer_shape(op, params, in_shapes, weights))


def conv_node(name, src, shape, cout, k, s, pads, d=(1, 1), g=1):
    w = RNG.normal(size=(cout, shape[0] // g) + k).astype(np.float32)
    b = RNG.normal(size=cout).astype(np.float32)
    return node(name, Op.CONV, [src], [shape], dict(kernel=k, stride=s, pads=pads, dilation=d, groups=g),
                dict(W=w, B=b))


def single(layer_fn, shape):
    inp = Node("x", Op.INPUT, (), {}, {}, shape)
    layers = layer_fn(inp)
    last = layers[-1]
    flat = node("flat", Op.RESHAPE, [last.name], [last.shape], {"shape": (int(np.prod(last.shape)),)})
    return Graph([inp] + layers + [flat], "flat"), last


def check_delta(g: Graph, layer: Node, positions, patch):
    c, h, w = g.input.shape
    x = RNG.normal(size=(c, h, w)).astype(np.float32)
    plan = plan_occlusion(g, patch)
    inc = IncrementalExecutor(plan)
    inc.materialize(x)
    ph, pw = patch
    for (py, px) in positions:
        vals = RNG.normal(size=(c, ph, pw)).astype(np.float32)
        x2 = x.copy()
        x2[:, py : py + ph, px : px + pw] = vals
        full1 = reference.run(g, x[None], [layer.name])[layer.name][0]
        full2 = reference.run(g, x2[None], [layer.name])[layer.name][0]
        changed = np.argwhere(np.abs(full2 - full1).max(axis=0) > 0)
        got = inc.run_batch(np.array([[py, px]]), vals)[0].reshape(layer.shape)
        np.testing.assert_allclose(got, full2, rtol=1e-4, atol=1e-4)
        rule = rule_for(layer.op)
        if rule.kind == "window" and changed.size:
            size = rule.out_size(layer, [patch], [g.input.shape])
            oloc, _, _ = window_locations(layer, np.array([[py, px]]), (ph, pw), size)
            (oy, ox), (sh, sw) = oloc[0], size
            assert changed[:, 0].min() >= oy and changed[:, 0].max() < oy + sh, (py, px)
            assert changed[:, 1].min() >= ox and changed[:, 1].max() < ox + sw, (py, px)


SHAPE = (4, 13, 11)
SHAPE_HW = SHAPE[1:]
PATCHES = [(3, 3), (2, 5)]


def positions_for(patch, shape=SHAPE):
    ph, pw = patch
    h, w = shape[1:]
    return [(0, 0), (0, w - pw), (h - ph, 0), (h - ph, w - pw), (h // 2, w // 2 - 1), (1, 3), (5, 0)]


CONV_CASES = list(itertools.product(
    [(3, 3), (1, 1), (5, 3), (1, 7)], [(1, 1), (2, 2), (3, 2)], [(1, 1, 1, 1), (0, 0, 0, 0), (2, 1, 0, 2)],
    [(1, 1), (2, 2)], [1, 2]))
# keep the cases whose dilated kernel fits the padded input
CONV_CASES = [c for c in CONV_CASES
              if (c[0][0] - 1) * c[3][0] + 1 <= SHAPE_HW[0] + c[2][0] + c[2][2]
              and (c[0][1] - 1) * c[3][1] + 1 <= SHAPE_HW[1] + c[2][1] + c[2][3]]


@pytest.mark.parametrize("k,s,pads,d,g", CONV_CASES[::3] + [((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4)])
@pytest.mark.parametrize("patch", PATCHES)
def test_check_delta_conv(k, s, pads, d, g, patch):
    def layers(inp):
        return [conv_node("conv", "x", inp.shape, 4 if g == 4 else 6, k, s, pads, d, g)]

    gph, layer = single(layers, SHAPE)
    check_delta(gph, layer, positions_for(patch), patch)


POOL_CASES = [
    (Op.MAXPOOL, dict(kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1), ceil_mode=False)),
    (Op.MAXPOOL, dict(kernel=(2, 2), stride=(2, 2), pads=(0, 0, 0, 0), ceil_mode=True)),
    (Op.MAXPOOL, dict(kernel=(3, 2), stride=(1, 3), pads=(1, 0, 0, 1), ceil_mode=True)),
    (Op.AVGPOOL, dict(kernel=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1), ceil_mode=False, count_include_pad=False)),
    (Op.AVGPOOL, dict(kernel=(3, 3), stride=(2, 2), pads=(1, 1, 1, 1), ceil_mode=True, count_include_pad=True)),
    (Op.AVGPOOL, dict(kernel=(2, 3), stride=(2, 2), pads=(0, 1, 0, 1), ceil_mode=True, count_include_pad=False)),
]


@pytest.mark.parametrize("op,params", POOL_CASES)
@pytest.mark.parametrize("patch", PATCHES)
def test_check_delta_pool(op, params, patch):
    gph, layer = single(lambda inp: [node("pool", op, ["x"], [inp.shape], params)], SHAPE)
    check_delta(gph, layer, positions_for(patch), patch)


POINTWISE = [
    (Op.RELU, {}, {}), (Op.HARD_SWISH, {}, {}), (Op.LEAKY_RELU, {"alpha": 0.1}, {}),
    (Op.ELU, {"alpha": 0.7}, {}),
    (Op.AFFINE, {}, {"scale": RNG.normal(size=4), "shift": RNG.normal(size=4)}),
    (Op.LRN, {"size": 3, "alpha": 1e-2, "beta": 0.75, "bias": 1.0}, {}),
]


@pytest.mark.parametrize("op,params,weights", POINTWISE, ids=lambda v: str(v)[:20])
def test_check_delta_pointwise(op, params, weights):
    def layers(inp):
        c = conv_node("conv", "x", inp.shape, 4, (3, 3), (1, 1), (1, 1, 1, 1))
        return [c, node("pw", op, ["conv"], [c.shape], params, weights)]

    gph, layer = single(layers, SHAPE)
    check_delta(gph, layer, positions_for((3, 3)), (3, 3))


@pytest.mark.parametrize("op", [Op.ADD, Op.MUL, Op.CONCAT])
def test_check_delta_merge(op):
    def layers(inp):
        a = conv_node("a", "x", inp.shape, 4, (1, 1), (1, 1), (0, 0, 0, 0))
        b = conv_node("b", "x", inp.shape, 4, (5, 3), (1, 1), (2, 1, 2, 1))
        c = conv_node("c", "x", inp.shape, 4, (3, 3), (1, 1), (2, 2, 2, 2), d=(2, 2))
        m = node("m", op, ["a", "b", "c"], [a.shape, b.shape, c.shape])
        return [a, b, c, m]

    gph, layer = single(layers, SHAPE)
    check_delta(gph, layer, positions_for((2, 5)), (2, 5))


def test_check_delta_global_and_se_gate():
    def layers(inp):
        a = conv_node("a", "x", inp.shape, 4, (3, 3), (2, 2), (1, 1, 1, 1))
        gp = node("gap", Op.GLOBAL_AVGPOOL, ["a"], [a.shape], {"keepdims": True})
        gate = node("gate", Op.SIGMOID, ["gap"], [gp.shape])
        return [a, gp, gate, node("se", Op.MUL, ["a", "gate"], [a.shape, gate.shape])]

    gph, layer = single(layers, SHAPE)
    check_delta(gph, layer, positions_for((3, 3)), (3, 3))
    # the gate changed everywhere, so the plan (like the executor) treats the merge as global
    se = [s for s in plan_occlusion(gph, (3, 3)).steps if s.node.name == "se"][0]
    assert se.out_size is None and se.kind == "global"


def test_every_layer_type_has_a_rule():
    assert set(DELTA_RULES) >= set(Op) - {Op.INPUT}
