"""The persistent catalog: survives reopening, shares a file between read-only processes,
leaves no partial rows after a crash mid-write, and stores hostile names as inert data."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_builders import Net

from krypton_db import catalog as catalog_mod
from krypton_db.catalog import SCHEMA_VERSION, Catalog, CatalogError, default_path
from krypton_db.model import load_model
from krypton_db.session import connect

HOSTILE = "'); DROP TABLE models; --"
PLAIN_TYPES = {"INTEGER", "BIGINT", "FLOAT", "VARCHAR", "VARCHAR[]", "INTEGER[]", "BLOB",
               "TIMESTAMP"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    net = Net((1, 3, 12, 12), seed=11, name="tiny")
    t = net.op("Relu", [net.conv("input", 3, 4, stride=(2, 2))])
    t = net.op("Flatten", [net.op("GlobalAveragePool", [t])], axis=1)
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    onnx.save(net.model(net.op("Softmax", [net.gemm(t, 4, 3)], axis=1)), path)
    return load_model(path, labels=["cat", "dog", "it's; a -- label"],
                      preprocess={"mean": [0.5] * 3, "std": [0.25] * 3})


@pytest.fixture
def image():
    return (np.arange(12 * 10 * 3) % 251).astype(np.uint8).reshape(12, 10, 3)


def fill(cat: Catalog, model, image, model_name="tiny", image_name="img"):
    cat.register_model(model, model_name)
    cat.register_image(image, image_name)
    hm = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    probs = np.random.default_rng(1).random((3, 4, 3)).astype(np.float32)
    run = cat.record_run(model_name, image_name, "exact", {"patch": 4, "stride": 2, "color": [0.5]},
                         "dog", {"total_s": 0.25}, hm, positions=([0, 4, 8], [0, 2, 4, 6]),
                         all_probs=probs)
    return run, hm, probs


def counts(cat: Catalog) -> dict:
    return {t: cat.con.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in catalog_mod.TABLES}


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("KRYPTON_DB", str(tmp_path / "x.duckdb"))
    assert default_path() == str(tmp_path / "x.duckdb")
    Catalog().close()  # path=None: created where KRYPTON_DB points
    assert (tmp_path / "x.duckdb").is_file()
    monkeypatch.delenv("KRYPTON_DB")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
        assert default_path() == str(tmp_path / "data" / "krypton_db" / "catalog.duckdb")
    assert default_path().endswith("catalog.duckdb")


def test_survives_reopening(tmp_path, model, image):
    path = tmp_path / "cat.duckdb"
    with Catalog(path) as cat:
        run, hm, _ = fill(cat, model, image)
    with Catalog(path) as cat:
        assert cat.con.sql("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
        assert cat.models() == ["tiny"] and cat.images() == ["img"]
        np.testing.assert_array_equal(cat.heatmap(run), hm)
        ys, xs = cat.heatmap_positions(run)
        assert ys.tolist() == [0, 4, 8] and xs.tolist() == [0, 2, 4, 6]
        np.testing.assert_array_equal(cat.get_image("img"), image)
        info = cat.run_info(run)
        assert info["target_class"] == 1 and info["settings"]["patch"] == 4
        assert info["model"] == "tiny" and info["status"] == "done"
        m = cat.get_model("tiny")
        assert m.labels == model.labels and m.spec.mean == (0.5, 0.5, 0.5)
        x = np.random.default_rng(0).normal(size=(2, 3, 12, 12)).astype(np.float32)
        np.testing.assert_allclose(m.predict(x), model.predict(x), rtol=1e-6)
        layers = cat.con.sql("SELECT op FROM model_layers ORDER BY ordinal").fetchall()
        assert [r[0] for r in layers] == [n.op.value for n in model.graph.nodes]
        row = cat.con.sql("SELECT input_shape, num_classes, macs, labels FROM models").fetchall()[0]
        assert row[:3] == ([3, 12, 12], 3, model.graph.macs) and row[3][2] == "it's; a -- label"
        # every column is a plain type, so the DuckDB CLI reads the file as is
        types = {r[0] for r in cat.con.sql(
            "SELECT DISTINCT data_type FROM information_schema.columns").fetchall()}
        assert types <= PLAIN_TYPES, types - PLAIN_TYPES
        hp = cat.con.sql("SELECT count(*), count(DISTINCT class) FROM heatmap_probs").fetchall()
        assert hp == [(36, 3)]


def test_memory_catalog_and_errors(model, image):
    cat = Catalog(":memory:")
    fill(cat, model, image)
    assert cat.register_model(model, "tiny") == 1  # the same content reuses its row
    assert cat.register_model(model, "tiny", replace=True) == 1
    assert counts(cat)["model_layers"] == len(model.graph.nodes)
    with pytest.raises(CatalogError, match="no model"):
        cat.get_model("nope")
    with pytest.raises(Exception, match="unknown target"):
        cat.record_run("tiny", "img", "exact", {}, "horse", {}, np.zeros((2, 2)))
    cat.close()


def test_crash_mid_write_leaves_no_partial_rows(tmp_path, model, image, monkeypatch):
    path = tmp_path / "cat.duckdb"
    cat = Catalog(path)
    fill(cat, model, image)
    before = counts(cat)

    def boom(self, run_id, cells):  # the runs row is already inserted when this runs
        assert self.con.sql("SELECT count(*) FROM runs").fetchall()[0][0] == before["runs"] + 1
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Catalog, "_write_heatmap", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cat.record_run("tiny", "img", "exact", {}, 0, {}, np.ones((3, 4)))
    assert counts(cat) == before
    monkeypatch.undo()
    # a model registration failing half way (after the models row) rolls back too
    monkeypatch.setattr(Catalog, "_insert_arrow", lambda *a: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        cat.register_model(model, "other")
    assert counts(cat) == before
    monkeypatch.undo()
    run = cat.record_run("tiny", "img", "exact", {}, 0, {}, np.ones((3, 4)))  # still writable
    assert cat.heatmap(run).shape == (3, 4)
    cat.close()


def test_process_killed_mid_write(tmp_path, model, image):
    """A process dying inside the transaction (os._exit, no rollback) leaves no trace."""
    path = tmp_path / "cat.duckdb"
    with Catalog(path) as cat:
        fill(cat, model, image)
        before = counts(cat)
    code = textwrap.dedent(f"""
        import os, numpy as np
        from krypton_db.catalog import Catalog
        cat = Catalog({str(path)!r})
        def die(self, run_id, cells):
            os._exit(3)
        Catalog._write_heatmap = die
        cat.record_run("tiny", "img", "exact", {{}}, 0, {{}}, np.ones((3, 4)))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    with Catalog(path) as cat:
        assert counts(cat) == before


def test_two_processes_read_the_same_file(tmp_path, model, image):
    path = tmp_path / "cat.duckdb"
    with Catalog(path) as cat:
        fill(cat, model, image)
    code = textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from krypton_db.catalog import Catalog
        path, me, other = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
        cat = Catalog(path, read_only=True)
        n = cat.con.sql("SELECT count(*) FROM heatmaps").fetchall()[0][0]
        me.write_text("open")
        t0 = time.time()
        while not other.exists():  # both hold the file open at the same time
            if time.time() - t0 > 30:
                sys.exit("the other reader never opened the catalog")
            time.sleep(0.02)
        print(n, cat.heatmap(1).shape)
        cat.close()
    """)
    a, b = tmp_path / "a.flag", tmp_path / "b.flag"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(x), str(y)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for x, y in ((a, b), (b, a))]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.split()[0] == "12" and "(3, 4)" in out


def test_read_only_refuses_writes(tmp_path, model, image):
    path = tmp_path / "cat.duckdb"
    with Catalog(path) as cat:
        fill(cat, model, image)
    with Catalog(path, read_only=True) as cat:
        assert cat.models() == ["tiny"]
        with pytest.raises(CatalogError, match="read-only"):
            cat.register_image(image, "again")
    with pytest.raises(CatalogError, match="no catalog"):
        Catalog(tmp_path / "missing.duckdb", read_only=True)


def test_schema_version_is_checked(tmp_path):
    path = tmp_path / "cat.duckdb"
    with Catalog(path) as cat:
        cat.con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(CatalogError, match="schema version 99"):
        Catalog(path)


@pytest.mark.parametrize("evil", [HOSTILE, 'a"b; DELETE FROM images', "x' OR '1'='1", "--"])
def test_hostile_names_are_inert(tmp_path, model, image, evil):
    path = tmp_path / "cat.duckdb"
    with Catalog(path) as cat:
        run, hm, _ = fill(cat, model, image, model_name=evil, image_name=evil + "\n;")
        assert cat.models() == [evil] and cat.images() == [evil + "\n;"]
        assert cat.get_model(evil).name == evil
        np.testing.assert_array_equal(cat.get_image(evil + "\n;"), image)
        assert cat.run_info(run)["model"] == evil
        tables = {r[0] for r in cat.con.sql("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert set(catalog_mod.TABLES) <= tables
    with connect(path, read_only=True) as s:
        assert s.sql("SELECT name FROM models WHERE name = ?", [evil]).fetchall() == [(evil,)]


def test_session_sql(tmp_path, model, image):
    path = tmp_path / "cat.duckdb"
    with connect(path) as s:
        run, hm, _ = fill(s.catalog, model, image)
        res = s.sql("SELECT r.id, m.name, count(*) AS cells FROM runs r JOIN models m "
                    "ON m.id = r.model_id JOIN heatmaps h ON h.run_id = r.id GROUP BY ALL")
        assert res.columns == ["id", "name", "cells"]
        assert res.fetchall() == [(run, "tiny", 12)]
        t = s.sql("SELECT y, x, prob FROM heatmaps WHERE run_id = $r ORDER BY y, x",
                  {"r": run}).arrow()
        np.testing.assert_array_equal(t.column("prob").to_numpy().reshape(3, 4), hm)
        assert s.sql("CREATE TABLE notes (run BIGINT, note VARCHAR)").fetchall() in ([], [(0,)])
        s.sql("INSERT INTO notes VALUES (?, ?)", [run, HOSTILE])
        assert s.sql("SELECT note FROM notes").fetchall() == [(HOSTILE,)]
        settings = json.loads(s.sql("SELECT settings FROM runs").fetchall()[0][0])
        assert settings == {"color": [0.5], "patch": 4, "stride": 2}
    assert Path(path).is_file()
