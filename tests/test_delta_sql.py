"""The IVM rewrite as SQL: ``engine="duckdb"`` (materialized view tables + delta queries run
by DuckDB) equals the numba exact executor and naive re-inference to 1e-5 on small nets with
every layer type, at corners, edges and centre; the delta relations stay inside the planner's
changed regions; the rendered script is golden; switched-off rules and bad combinations."""

import os
from pathlib import Path

import numpy as np
import pytest

import krypton_db as kdb
from krypton_db.errors import InputError
from krypton_db.hooks import OcclusionHooks
from krypton_db.planner.delta_sql import compile_delta_sql

GOLDEN = Path(__file__).parent / "golden"


def _edge_positions(h, w, ph, pw):
    """Corners, edge midpoints and the centre of the patch grid."""
    ys, xs = (0, (h - ph) // 2, h - ph), (0, (w - pw) // 2, w - pw)
    return [(y, x) for y in ys for x in xs]


@pytest.mark.parametrize("net", ["vgg", "resnet", "inception", "wide", "factorized"])
@pytest.mark.parametrize("patch", [(5, 4), (1, 1)])
def test_duckdb_engine_equals_numba_exact_and_naive(tiny_nets, net, patch):
    model, img = tiny_nets[net]
    _, h, w = model.graph.input_shape
    pos = _edge_positions(h, w, *patch)
    kw = dict(patch=patch, positions=pos, color=(0.2, 0.5, 0.9), all_classes=True)
    sql = kdb.occlude(model, img, engine="duckdb", **kw)
    exact = kdb.occlude(model, img, **kw)
    naive = kdb.occlude(model, img, mode="naive", **kw)
    assert sql.stats["engine"] == "duckdb" and exact.stats["engine"] == "numba"
    np.testing.assert_allclose(sql.all_probs, exact.all_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sql.all_probs, naive.all_probs, atol=1e-5, rtol=0)
    assert sql.base_prob == pytest.approx(exact.base_prob, abs=1e-6)
    # the occlusion changed something: the comparison is not of unchanged baselines
    assert np.abs(naive.all_probs - naive.all_probs[..., :1, :].mean()).max() > 1e-6 or \
        np.abs(naive.probs - naive.base_prob).max() > 1e-6


def test_duckdb_engine_on_a_stride_grid_and_logits(tiny_nets):
    model, img = tiny_nets["resnet"]
    kw = dict(patch=6, stride=5, score="logit")
    sql = kdb.occlude(model, img, engine="duckdb", batch_size=7, **kw)
    exact = kdb.occlude(model, img, **kw)
    assert sql.probs.shape == exact.probs.shape == (4, 4)
    np.testing.assert_allclose(sql.probs, exact.probs, atol=1e-5, rtol=1e-5)


def test_delta_relations_stay_inside_the_planned_regions(tiny_nets):
    """Each layer's delta relation (computed from the data by SQL) holds, per query, at most
    the planner's output-patch rows and columns (the published position-independent sizes)
    and every channel of each changed position."""
    from krypton_db.exec.duckdb_ivm import DuckDbIncrementalExecutor
    from krypton_db.occlusion import color_to_input

    model, img = tiny_nets["inception"]
    plan = kdb.plan(model, patch=(3, 4))
    sizes = {s.node.name: s.out_size for s in plan.steps}
    sizes.update({s.fused.name: s.out_size for s in plan.steps if s.fused is not None})
    dsql = plan.delta_sql()
    ex = DuckDbIncrementalExecutor(dsql)
    try:
        x = model.to_nchw(model.preprocess(img)[None])[0]
        ex.materialize(x)
        _, h, w = model.graph.input_shape
        ex.run_batch(np.array(_edge_positions(h, w, 3, 4)), color_to_input(0.0, model.spec))
        checked = 0
        for node, view in dsql.views.view_of.items():  # layer views (not merge helpers)
            if node not in sizes or sizes[node] is None:
                continue
            cells = ex.delta_cells(view).to_pandas()
            channels = model.graph[node].shape[0]
            for _, q in cells.groupby("n"):
                assert q.y.max() - q.y.min() + 1 <= sizes[node][0], node
                assert q.x.max() - q.x.min() + 1 <= sizes[node][1], node
                per_pos = q.groupby(["y", "x"]).c.nunique()
                assert (per_pos == channels).all(), node
            checked += 1
        assert checked >= 10
    finally:
        ex.close()


def test_delta_sql_golden(tiny_nets):
    """The rendered rewrite of the small Inception-like net (window, pointwise, merge by
    concat, a broadcast gate, global layers)."""
    model, _ = tiny_nets["inception"]
    text = str(kdb.plan(model, patch=(5, 4)).delta_sql())
    golden = GOLDEN / "delta_sql_inception_like.sql"
    if os.environ.get("KRYPTON_REGEN_GOLDEN") == "1":
        golden.write_text(text)
    assert golden.exists(), "KRYPTON_REGEN_GOLDEN=1 pytest tests/test_delta_sql.py writes it"
    assert text == golden.read_text(), ("delta SQL changed: if intended, KRYPTON_REGEN_GOLDEN=1 "
                                         "pytest tests/test_delta_sql.py and review the diff")
    assert text.count("CREATE OR REPLACE TEMP TABLE") == len(compile_delta_sql(
        model.graph, (5, 4)).deltas)


def test_switched_off_rule_recomputes_in_full_and_agrees(tiny_nets):
    model, img = tiny_nets["resnet"]
    hooks = OcclusionHooks(disabled_rules=frozenset({"conv"}))
    plan = kdb.plan(model, patch=4)
    on = plan.delta_sql()
    off = compile_delta_sql(model.graph, (4, 4), frozenset({"conv"}))
    first_conv = next(d for d in on.deltas if d.template == "deltas/conv2d")
    assert next(d for d in off.deltas if d.view == first_conv.view).rule == "global"
    pos = [(0, 0), (10, 10), (20, 20)]
    a = kdb.occlude(model, img, patch=4, positions=pos, engine="duckdb", hooks=hooks)
    b = kdb.occlude(model, img, patch=4, positions=pos)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_engine_duckdb_refuses_what_it_cannot_run(tiny_nets):
    model, img = tiny_nets["vgg"]
    with pytest.raises(InputError, match="engine 'duckdb' runs mode 'exact'"):
        kdb.occlude(model, img, engine="duckdb", mode="approximate", tau=0.5)
    with pytest.raises(InputError, match="engine 'duckdb'"):
        kdb.occlude(model, img, engine="duckdb", drilldown=True)
    with pytest.raises(InputError, match="engine must be one of numba, duckdb"):
        kdb.occlude(model, img, engine="spark")
    with pytest.raises(InputError, match="exact plans"):
        kdb.plan(model, patch=4, tau=0.5).delta_sql()


def test_language_engine_and_explain_format_sql(tiny_nets, tmp_path):
    model, img = tiny_nets["vgg"]
    np.save(tmp_path / "img.npy", img)
    s = kdb.connect(tmp_path / "c.duckdb")
    s.sql(f"CREATE MODEL m FROM '{model.source}'; CREATE IMAGE i FROM '{tmp_path / 'img.npy'}'")
    q = "occlusion('m', 'i', patch => 5, stride => 6{})"
    sql_rows = s.sql(f"SELECT y, x, prob FROM {q.format(', engine => ' + repr('duckdb'))} "
                     "ORDER BY y, x").fetchall()
    num_rows = s.sql(f"SELECT y, x, prob FROM {q.format('')} ORDER BY y, x").fetchall()
    assert [r[:2] for r in sql_rows] == [r[:2] for r in num_rows] and len(sql_rows) == 12
    np.testing.assert_allclose([r[2] for r in sql_rows], [r[2] for r in num_rows], atol=1e-5)
    rows = s.explain("EXPLAIN FORMAT SQL SELECT * FROM " + q.format(""))
    assert rows[0][0] == "delta queries (SQL)"
    # the same script as the API's (the first line names the graph: the catalog's name here)
    assert rows[0][1].split("\n", 1)[1] == \
        str(kdb.plan(model, patch=5).delta_sql()).rstrip("\n").split("\n", 1)[1]
    assert s.explain("SELECT * FROM " + q.format(""), format="sql") == rows
    with pytest.raises(kdb.KryptonError, match="FORMAT SQL"):
        s.explain("EXPLAIN FORMAT SQL SELECT * FROM " + q.format(", mode => 'naive'"))
    with pytest.raises(kdb.KryptonError, match="no ANALYZE"):
        s.explain("EXPLAIN ANALYZE FORMAT SQL SELECT * FROM " + q.format(""))
    s.close()
