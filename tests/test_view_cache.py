"""Materialized views that outlive a query (exec/view_cache.py): a second query on an image
reuses its views and gives the same heat map bit for bit as one that materializes them (and
naive re-inference to 1e-5); LRU in bytes; cached views are never written by later runs;
the language's SET view_cache / SHOW CACHE / EXPLAIN ANALYZE."""

from __future__ import annotations

import numpy as np
import pytest

import krypton_db as kdb
from krypton_db.exec.view_cache import ViewCache, input_key

PATCH, STRIDE = 4, 4


@pytest.fixture()
def net(tiny_nets):
    model, img = tiny_nets["inception"]
    cache = model.executor.view_cache
    cache.clear()
    cache.set_budget(64 << 20)
    yield model, img
    cache.clear()
    cache.set_budget(512 << 20)


def occ(model, img, **kw):
    return kdb.occlude(model, img, patch=PATCH, progress=False, **{"stride": STRIDE, **kw})


def test_a_second_query_reuses_the_views_and_equals_a_fresh_one(net):
    model, img = net
    first = occ(model, img)
    second = occ(model, img)
    other = occ(model, img, positions=[(1, 2), (5, 7)])  # other positions, same image
    assert (first.stats["views"], second.stats["views"], other.stats["views"]) == \
        ("materialized", "cached", "cached")
    np.testing.assert_array_equal(second.probs, first.probs)
    model.executor.view_cache.set_budget(0)  # off: every query materializes its own
    fresh = occ(model, img)
    assert fresh.stats["views"] == "materialized"
    np.testing.assert_array_equal(second.probs, fresh.probs)
    naive = occ(model, img, mode="naive")
    np.testing.assert_allclose(second.probs, naive.probs, atol=1e-5)
    naive_pos = occ(model, img, positions=[(1, 2), (5, 7)], mode="naive")
    np.testing.assert_allclose(other.probs, naive_pos.probs, atol=1e-5)


def test_cached_views_survive_other_images_runs(net):
    """The executor reuses its buffers run after run; the cache holds copies, so another
    image's runs (full inference included) leave the first image's views intact."""
    model, img = net
    a1 = occ(model, img)
    other = np.ascontiguousarray(img[::-1, ::-1])
    occ(model, other)
    model.predict(model.preprocess(other)[None])
    a2 = occ(model, img)
    assert a2.stats["views"] == "cached"
    np.testing.assert_array_equal(a1.probs, a2.probs)


def test_lru_in_bytes(net):
    model, img = net
    cache = model.executor.view_cache
    occ(model, img)
    one = cache.stats()["bytes"]
    assert one > 0 and cache.stats()["entries"] == 1
    cache.set_budget(int(one * 2.5))  # room for two images' views
    imgs = [img, img * 0.5, img * 0.25]
    for im in imgs[1:]:
        occ(model, im)
    s = cache.stats()
    assert s["entries"] == 2 and s["bytes"] == 2 * one <= s["budget"]
    assert occ(model, imgs[0]).stats["views"] == "materialized"  # the least recently used went
    assert occ(model, imgs[2]).stats["views"] == "cached"
    assert occ(model, imgs[1]).stats["views"] == "materialized"  # evicted by imgs[0]'s return


def test_view_cache_unit():
    c = ViewCache(budget=100)
    views = {"a": np.zeros(10, np.float32)}  # 40 bytes
    key = input_key(("a",), np.ones((1, 2, 2), np.float32))
    kept, out = c.put(key, views, np.zeros(2, np.float32))
    assert kept["a"] is not views["a"]  # a private copy
    assert c.get(key)[1] is out and c.stats() == dict(entries=1, bytes=48, budget=100, hits=1,
                                                      misses=0)
    assert c.get(input_key(("a",), np.zeros((1, 2, 2), np.float32))) is None  # other bytes
    big = {"a": np.zeros(100, np.float32)}
    c.put(input_key(("b",), np.ones(1)), big, np.zeros(1, np.float32))  # larger than the budget
    assert c.stats()["entries"] == 1
    c.set_budget(0)
    assert c.stats()["entries"] == 0 and c.stats()["bytes"] == 0


def test_the_language_sets_and_shows_the_cache(tiny_nets, tmp_path):
    model, img = tiny_nets["vgg"]
    model.executor.view_cache.clear()
    s = kdb.connect(tmp_path / "c.duckdb")
    s.sql(f"CREATE MODEL m FROM '{model.source}'")
    np.save(tmp_path / "img.npy", img)
    s.sql(f"CREATE IMAGE i FROM '{tmp_path / 'img.npy'}'")
    q = f"SELECT * FROM occlusion('m', 'i', patch => {PATCH}, stride => {STRIDE})"
    s.sql(q).fetchall()
    s.sql(q).fetchall()
    (row,) = s.sql("SHOW CACHE").fetchall()
    assert row[0] == "m" and row[1] == 1 and row[4] >= 1 and row[3] == 512.0
    plan = dict(s.sql("EXPLAIN ANALYZE " + q).fetchall())
    assert "(reused from the view cache)" in plan["analyze"]
    s.sql("SET view_cache = 0")
    s.sql(q).fetchall()
    (row,) = s.sql("SHOW CACHE").fetchall()
    assert row[1:4] == (0, 0.0, 0.0)
    plan = dict(s.sql("EXPLAIN ANALYZE " + q).fetchall())
    assert "reused" not in plan["analyze"]
    with pytest.raises(kdb.KryptonError, match="view_cache"):
        s.sql("SET view_cache = 'lots'")


@pytest.mark.parametrize("name", ["vgg", "resnet", "inception"])
def test_the_first_explanation_materializes_from_the_warm_up(tiny_nets, name):
    """A fresh executor's warm-up runs on the image and hands its values to materialize: one
    full inference in the first explanation, results identical to a later one that
    materializes itself, and equal to naive re-inference."""
    from krypton_db.exec import view_cache

    loaded, img = tiny_nets[name]
    m = kdb.load_model(loaded.source)  # a new model object: its executor has not warmed up
    ex = m.executor
    calls = []
    run = ex.run
    ex.run = lambda *a, **k: calls.append(1) or run(*a, **k)
    first = occ(m, img)
    assert len(calls) == 1 and first.stats["jit_s"] > 0 and first.stats["views"] == "materialized"
    assert ex.take_warm_outputs(np.zeros(1), []) is None  # taken once, then gone
    with view_cache.paused():
        again = occ(m, img)
    assert len(calls) == 2 and again.stats["jit_s"] == 0.0
    np.testing.assert_array_equal(first.probs, again.probs)
    assert first.base_prob == again.base_prob
    naive = occ(m, img, mode="naive")
    np.testing.assert_allclose(first.probs, naive.probs, atol=1e-5)
    other = kdb.load_model(loaded.source)  # a warm-up on one image never serves another
    other.executor.warmup(np.zeros(other.graph.input_shape, np.float32))
    with view_cache.paused():
        np.testing.assert_array_equal(occ(other, img).probs, first.probs)
