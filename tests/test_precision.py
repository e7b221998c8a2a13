"""precision='exact': the model's twin without Winograd convolutions, from the API, the
language and the catalog's record; results equal naive re-inference and ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_builders import ort_run

import krypton_db as kdb
from krypton_db.errors import InputError
from krypton_db.planner import algorithms


def winograd_convs(m) -> int:
    n = 0
    for node in m.graph.nodes:
        if node.op is kdb.Op.CONV:
            g = node.params["groups"]
            c = node.weights["W"].shape[1] * g
            n += algorithms.winograd_f2(node.params, c, g, node.shape[1:]) or \
                algorithms.winograd1d(node.params, c, g, node.shape[1:])
    return n


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Small nets whose second conv runs Winograd F(2x2, 3x3) (16 channels) and F(4x4, 3x3)
    (64 channels) at precision 'fast'."""
    import onnx
    from test_catalog_history import tiny_net

    d = tmp_path_factory.mktemp("precision")
    out = {}
    for name, size, width in (("f2", 24, 16), ("f4", 20, 64)):
        onnx.save(tiny_net(5, size=size, width=width), d / f"{name}.onnx")
        img = np.random.default_rng(width).random((size, size, 3)).astype(np.float32)
        out[name] = (kdb.load_model(d / f"{name}.onnx"), img)
    return out


@pytest.mark.parametrize("name", ["f2", "f4"])
def test_exact_precision_runs_no_winograd_and_equals_naive(nets, name):
    m, img = nets[name]
    exact = m.with_precision("exact")
    assert exact is m.with_precision("exact") and m.with_precision("fast") is m
    assert exact.with_precision("exact") is exact and exact.with_precision("fast") is m
    assert winograd_convs(m) > 0 and winograd_convs(exact) == 0
    hm = kdb.occlude(m, img, patch=4, stride=5, precision="exact", progress=False)
    assert hm.stats["precision"] == "exact"
    naive = kdb.occlude(m, img, patch=4, stride=5, precision="exact", mode="naive",
                        progress=False)
    np.testing.assert_allclose(hm.probs, naive.probs, atol=1e-5)
    fast = kdb.occlude(m, img, patch=4, stride=5, progress=False)
    np.testing.assert_allclose(hm.probs, fast.probs, atol=1e-4)
    import onnx
    x = m.preprocess(img)[None]
    want = ort_run(onnx.load(str(m.source)), x)[0]
    if not m.ends_in_softmax:
        want = np.exp(want - want.max(1, keepdims=True))
        want /= want.sum(1, keepdims=True)
    assert abs(hm.base_prob - want[0, hm.target]) <= 1e-6


def test_bad_precision_is_refused(nets):
    m, img = nets["f2"]
    with pytest.raises(InputError, match="precision must be one of fast, exact; got 'double'"):
        kdb.occlude(m, img, precision="double", progress=False)
    with pytest.raises(InputError, match="precision must be 'fast' or 'exact'"):
        m.with_precision("half")


def test_the_language_and_the_catalog_take_precision(nets, tmp_path):
    m, img = nets["f4"]
    api = kdb.occlude(m, img, patch=4, stride=6, precision="exact", progress=False)
    with kdb.connect(tmp_path / "c.duckdb") as s:
        s.catalog.register_model(m, "m")
        s.catalog.register_image(img, "i")
        rows = s.sql("SELECT y, x, prob FROM occlusion('m', 'i', patch => 4, stride => 6, "
                     "precision => 'exact') ORDER BY y, x").fetchall()
        np.testing.assert_array_equal(np.array([r[2] for r in rows], np.float32),
                                      api.probs.ravel())
        settings = s.sql("SELECT settings FROM runs").fetchall()[0][0]
        assert '"precision": "exact"' in settings
        plan = "\n".join(p for _, p in s.explain("SELECT * FROM occlusion('m', 'i', "
                                                 "precision => 'exact')"))
        assert "precision=exact" in plan
        # the plan EXPLAIN costs is the exact twin's: direct convs cost more than Winograd
        import json

        def predicted(q):
            return next(d["predicted_s"] for d in (json.loads(t) for _, t in
                                                    s.explain(q, format="json"))
                        if d["plan_type"] == "estimate")

        plan = "SELECT * FROM occlusion('m', 'i', precision => 'exact')"
        fast_plan = "SELECT * FROM occlusion('m', 'i')"
        assert predicted(plan) > predicted(fast_plan)


def test_datasets_take_precision_and_keep_it_apart(nets, tmp_path):
    """explain_dataset(precision='exact') computes what occlude does at that precision, and
    its results go to another settings folder than the default's (resume never mixes them)."""
    m, img = nets["f2"]
    fast = kdb.explain_dataset(m, [img], patch=4, stride=5, out=tmp_path / "o", progress=False)
    exact = kdb.explain_dataset(m, [img], patch=4, stride=5, out=tmp_path / "o",
                                precision="exact", progress=False)
    assert (fast.done, exact.done, exact.skipped) == (1, 1, 0)
    assert len({p.parent for p in (tmp_path / "o").rglob("part-*.parquet")}) == 2
    want = kdb.occlude(m, img, patch=4, stride=5, precision="exact", progress=False)
    got = exact.sql("SELECT prob FROM heatmaps ORDER BY y, x").fetchall()
    np.testing.assert_array_equal(np.array([r[0] for r in got], np.float32), want.probs.ravel())


def test_an_exact_twin_runs_exact_unless_told_otherwise(nets, tmp_path):
    """occlude / explain_dataset take the model's own precision by default: an exact twin
    passed without ``precision=`` runs (and records) exact; an explicit value still wins."""
    m, img = nets["f4"]
    exact = m.with_precision("exact")
    assert (m.precision, exact.precision) == ("fast", "exact")
    want = kdb.occlude(m, img, patch=4, stride=5, precision="exact", progress=False)
    got = kdb.occlude(exact, img, patch=4, stride=5, progress=False)
    assert got.stats["precision"] == "exact"
    np.testing.assert_array_equal(got.probs, want.probs)
    fast = kdb.occlude(exact, img, patch=4, stride=5, precision="fast", progress=False)
    assert fast.stats["precision"] == "fast"
    np.testing.assert_array_equal(fast.probs, kdb.occlude(m, img, patch=4, stride=5,
                                                          progress=False).probs)
    a = kdb.explain_dataset(exact, [img], patch=4, stride=5, out=tmp_path / "o", progress=False)
    b = kdb.explain_dataset(m, [img], patch=4, stride=5, out=tmp_path / "o", precision="exact",
                            progress=False)
    assert a.settings_sha256 == b.settings_sha256 and (a.done, b.skipped) == (1, 1)
