"""Every bad input a user can give gets one clear KryptonError naming the problem and what is
allowed, the same from the Python API and from the query language (one table of checks,
``krypton_db.options``); values with an obvious meaning are accepted instead."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx_builders import Net

import krypton_db as kdb
from krypton_db.catalog import CatalogBusyError, CatalogError
from krypton_db.errors import InputError, KryptonError
from krypton_db.sql.dsl import DslError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    net = Net((1, 3, 16, 16), seed=2, name="tiny")
    y = net.op("Relu", [net.conv("input", 3, 4)])
    y = net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    f = net.op("Flatten", [y], axis=1)
    onnx.save(net.model(net.op("Softmax", [net.gemm(f, 4 * 8 * 8, 3)], axis=1)), d / "tiny.onnx")
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(img).save(d / "scan.png")
    return d


@pytest.fixture(scope="module")
def model(files):
    return kdb.load_model(files / "tiny.onnx")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)


@pytest.fixture
def s(files, tmp_path):
    with kdb.connect(tmp_path / "cat.duckdb") as s:
        s.sql(f"CREATE MODEL tiny FROM '{files / 'tiny.onnx'}'; CREATE IMAGE scan FROM "
              f"'{files / 'scan.png'}'")
        yield s


# (API keyword arguments, the same in the language or None, error words); every row also runs
# through the other interface where it exists, and both must say the same words
OPTION_CASES = {
    "color nan": (dict(color=float("nan")), None, "color must be finite"),
    "color red": (dict(color="red"), "color => 'red'", "color must be a number, got 'red'"),
    "color 4 values": (dict(color=(0.1, 0.2, 0.3, 0.4)), "color => (0.1, 0.2, 0.3, 0.4)",
                       "color needs 1 or 3 values for this 3-channel model"),
    "color out of range": (dict(color=2.0), "color => 2.0", "color values must lie in [0, 1]"),
    "positions triples": (dict(positions=[(0, 8, 16), (24, 32, 40)]),
                          "positions => ((0, 8, 16), (24, 32, 40))",
                          "positions must be a non-empty list of (y, x) pairs"),
    "positions empty": (dict(positions=[]), None, "positions must be a non-empty list"),
    "positions outside": (dict(positions=[(0, 0), (14, 0)], patch=4), "positions => ((0, 0), "
                          "(14, 0)), patch => 4", "put the 4x4 patch outside the 16x16 input"),
    "positions and region": (dict(positions=[(0, 0)], region=(0, 0, 8, 8)),
                             "positions => ((0, 0)), region => (0, 0, 8, 8)",
                             "give either region or positions, not both"),
    "patch True": (dict(patch=True), "patch => TRUE", "patch must be a positive integer, got TRUE"),
    "patch too big": (dict(patch=17), "patch => 17", "patch 17x17 is larger than the model input"),
    "stride 0": (dict(stride=0), "stride => 0", "stride must lie in [1, 65536], got 0"),
    "batch_size 0": (dict(batch_size=0), "batch_size => 0", "batch_size must lie in [1, 65536], got 0"),
    "batch_size -3": (dict(batch_size=-3), "batch_size => -3", "batch_size must lie in [1, 65536]"),
    "region 5": (dict(region=5), "region => 5", "region must be (y0, x0, y1, x1)"),
    "region empty": (dict(region=(4, 4, 4, 8)), "region => (4, 4, 4, 8)", "needs y0 < y1"),
    "mode": (dict(mode="fast"), "mode => 'fast'", "mode must be one of exact, naive, approximate"),
    "tau 0": (dict(mode="approximate", tau=0.0), "mode => 'approximate', tau => 0.0",
              "tau must lie in (0, 1]"),
    "tau in exact mode": (dict(tau=0.5), "tau => 0.5", "tau applies to mode 'approximate'"),
    "memory_budget": (dict(memory_budget="lots"), "memory_budget => 'lots'",
                      "memory_budget must be bytes or a size like"),
    "target": (dict(target=7), "target => 7", "class index 7 out of range [0, 2]"),
    "target label": (dict(target="horse"), "target => 'horse'", "unknown class 'horse'"),
    "drilldown r": (dict(drilldown=dict(r=2)), "drilldown => {r: 2}", "drilldown r must lie in (0, 1]"),
    "score": (dict(score="odds"), "score => 'odds'", "score must be one of prob, logit"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_errors_same_from_api_and_language(s, model, image, case):
    kw, dsl, words = OPTION_CASES[case]
    with pytest.raises(InputError) as api_err:
        kdb.occlude(model, image, **({"patch": 4} | kw))
    assert words in str(api_err.value), str(api_err.value)
    if dsl is None:
        return
    args = dsl if "patch" in dsl else f"patch => 4, {dsl}"
    before = s.sql("SELECT count(*) FROM runs").fetchall()
    with pytest.raises(DslError) as dsl_err:
        s.sql(f"SELECT * FROM occlusion('tiny', 'scan', {args})")
    assert words in dsl_err.value.message, dsl_err.value.message
    assert isinstance(dsl_err.value, KryptonError)
    assert s.sql("SELECT count(*) FROM runs").fetchall() == before


def test_values_with_an_obvious_meaning_are_accepted(model, image, tmp_path):
    want = kdb.occlude(model, image, patch=4, stride=4, memory_budget=128 << 20, tau=0.5,
                       mode="approximate")
    got = kdb.occlude(model, image, patch=np.int64(4), stride=(np.int32(4), 4),
                      memory_budget="128MiB", tau=np.float32(0.5), mode="approximate",
                      color=np.float64(0.0), positions=None)
    np.testing.assert_array_equal(got.probs, want.probs)
    pos = np.array([[0, 0], [8, 4]])
    a = kdb.occlude(model, image, patch=4, positions=pos)
    b = kdb.occlude(model, image, patch=4, positions=[(0, 0), (8, 4)])
    np.testing.assert_array_equal(a.probs, b.probs)
    # a catalog given as a path is opened, recorded into, and closed
    hm = kdb.occlude(model, image, patch=4, stride=4, catalog=str(tmp_path / "c.duckdb"))
    with kdb.connect(tmp_path / "c.duckdb") as s:
        assert s.sql("SELECT count(*) FROM heatmaps WHERE run_id = ?",
                     [hm.stats["run_id"]]).fetchall() == [(hm.probs.size,)]


def test_non_finite_inputs_name_the_first_bad_index(model, image, tmp_path):
    bad = image.copy()
    bad[3, 5, 1] = np.nan
    with pytest.raises(InputError, match=r"image has a non-finite value \(nan\) at index \(3, 5, 1\)"):
        kdb.occlude(model, bad, patch=4)
    bad[3, 5, 1] = np.inf
    with pytest.raises(InputError, match=r"non-finite value \(inf\) at index \(3, 5, 1\)"):
        kdb.occlude(model, bad, patch=4)
    x = model.preprocess(image)[None].repeat(2, axis=0)
    x[1, 0, 2, 2] = -np.inf
    with pytest.raises(InputError, match=r"batch has a non-finite value \(-inf\) at index \(1, 0, 2, 2\)"):
        model.predict(x)
    np.save(tmp_path / "nan.npy", bad)
    with kdb.connect(tmp_path / "n.duckdb") as s:
        with pytest.raises(DslError, match="non-finite value"):
            s.sql(f"CREATE IMAGE x FROM '{tmp_path / 'nan.npy'}'")


def test_unreadable_and_empty_images(model, tmp_path):
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage, not an array")
    with pytest.raises(InputError, match=r"cannot read .*garbage.npy as a .npy array"):
        kdb.occlude(model, tmp_path / "garbage.npy", patch=4)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="as a .npy array"):  # never unpickled
        kdb.occlude(model, tmp_path / "obj.npy", patch=4)
    with pytest.raises(InputError, match=r"image array is empty \(shape \(0, 0\)\)"):
        kdb.occlude(model, np.zeros((0, 0), np.float32), patch=4)
    with pytest.raises(InputError, match="unsupported image type dict"):
        kdb.occlude(model, {"pixels": 1}, patch=4)
    with pytest.raises(InputError, match="predict got an empty batch"):
        model.predict(np.zeros((0, 3, 16, 16), np.float32))


def test_preprocessing_checked_the_same_way(files, tmp_path):
    cases = [({"std": [0, 1, 1]}, "std => (0, 1, 1)", "std values must be > 0"),
             ({"meen": [1, 2, 3]}, "meen => 1", "unknown"),
             ({"mean": [1, 2]}, "mean => (1, 2)", "needs 1 or 3 values for this 3-channel model"),
             ({"scale": float("inf")}, None, "scale must be finite"),
             ({"scale": -1}, "scale => -1", "scale must be > 0")]
    with kdb.connect(tmp_path / "p.duckdb") as s:
        for pre, dsl, words in cases:
            with pytest.raises(InputError) as e:
                kdb.load_model(files / "tiny.onnx", preprocess=pre)
            assert words in str(e.value)
            if dsl is not None:
                with pytest.raises(DslError) as e2:
                    s.sql(f"CREATE MODEL m FROM '{files / 'tiny.onnx'}' WITH ({dsl})")
                assert words in e2.value.message
        with pytest.raises(DslError, match=r"unknown model option 'meen' \(did you mean 'mean'\?\)"):
            s.sql(f"CREATE MODEL m FROM '{files / 'tiny.onnx'}' WITH (meen => 1)")
        assert s.sql("SELECT count(*) FROM models").fetchall() == [(0,)]


def test_unknown_keyword_and_bad_catalog_argument(model, image):
    with pytest.raises(InputError, match=r"unknown option 'memory_budjet' \(did you mean 'memory_budget'\?\)"):
        kdb.occlude(model, image, patch=4, memory_budjet=1)
    with pytest.raises(InputError, match="catalog must be a path, a Catalog or a session"):
        kdb.occlude(model, image, patch=4, catalog=42)


def test_statement_is_bound_before_the_occlusion_runs(s, monkeypatch):
    """A typo in the SQL around occlusion(...) fails before any computation, names no
    internal relation, and records nothing."""
    from krypton_db import api

    calls = []
    real = api.run_checked
    monkeypatch.setattr(api, "run_checked", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for sql, words in (("SELEC * FROM occlusion('tiny', 'scan', patch => 4)", "syntax error"),
                       ("SELECT nope FROM occlusion('tiny', 'scan', patch => 4)", "nope"),
                       ("SELECT * FROM occlusion('tiny', 'scan', patch => 4) WHERE propb > 0.5",
                        "propb"),
                       ("SELECT * FROM occlusion('tiny', 'scan', patch => 4) o JOIN missing m "
                        "ON true", "missing")):
        with pytest.raises(DslError) as e:
            s.sql(sql)
        msg = str(e.value)
        assert words in msg and "__krypton" not in msg and "occlusion(...)" in msg, msg
    assert calls == []
    assert s.sql("SELECT count(*) FROM runs").fetchall() == [(0,)]
    # an error DuckDB finds only while executing: the runs of the statement are rolled back
    with pytest.raises(DslError, match="in the SQL around occlusion"):
        s.sql("SELECT CAST(label AS INTEGER) FROM occlusion('tiny', 'scan', patch => 8, stride => 8)")
    assert calls == [1]
    assert s.sql("SELECT count(*) FROM runs").fetchall() == [(0,)]
    s.sql("SELECT * FROM occlusion('tiny', 'scan', patch => 8, stride => 8)")
    assert s.sql("SELECT count(*) FROM runs").fetchall() == [(1,)]


def test_plain_sql_errors_are_krypton_errors(s):
    with pytest.raises(KryptonError, match="nope"):
        s.sql("SELECT * FROM nope")
    with pytest.raises(InputError, match="takes the statement text as a str"):
        s.sql(42)


# -- catalog files -----------------------------------------------------------------------------

def test_catalog_file_problems(tmp_path):
    with pytest.raises(CatalogError, match="is a directory"):
        kdb.connect(tmp_path)
    (tmp_path / "notes.txt").write_text("hello, not a database")
    with pytest.raises(CatalogError, match="not a DuckDB database file"):
        kdb.connect(tmp_path / "notes.txt")
    ro = tmp_path / "ro.duckdb"
    kdb.connect(ro).close()
    ro.chmod(0o444)
    with pytest.raises(CatalogError, match="is read-only; open it with read_only=True"):
        kdb.connect(ro)
    with kdb.connect(ro, read_only=True) as r:  # reading still works
        assert r.sql("SELECT count(*) FROM runs").fetchall() == [(0,)]
        with pytest.raises(CatalogError, match="read-only"):
            r.catalog.register_image(np.zeros((4, 4), np.uint8), "x")
    import duckdb

    with duckdb.connect(str(tmp_path / "theirs.duckdb")) as con:
        con.execute("CREATE TABLE sales (id INTEGER)")
    with pytest.raises(CatalogError, match=r"not a krypton_db catalog \(tables: sales\)"):
        kdb.connect(tmp_path / "theirs.duckdb")
    with duckdb.connect(str(tmp_path / "theirs.duckdb")) as con:  # untouched
        assert [r[0] for r in con.sql("SELECT table_name FROM duckdb_tables()").fetchall()] == ["sales"]
    with kdb.connect(tmp_path / "theirs.duckdb", allow_foreign=True) as s:
        assert s.sql("SELECT count(*) FROM sales").fetchall() == [(0,)]
        assert s.sql("SELECT count(*) FROM models").fetchall() == [(0,)]


def test_catalog_locked_by_another_process(tmp_path):
    path = tmp_path / "held.duckdb"
    kdb.connect(path).close()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; "
                               f"c = duckdb.connect({str(path)!r}); print('held', flush=True); "
                               "sys.stdin.readline()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.perf_counter()
        with pytest.raises(CatalogBusyError, match=rf"locked by another process \(PID {holder.pid}"):
            kdb.connect(path, lock_timeout=0.5)
        assert 0.4 < time.perf_counter() - t < 10
    finally:
        holder.communicate("\n", timeout=30)
    with kdb.connect(path, lock_timeout=0.5) as s:  # free again
        assert s.sql("SELECT count(*) FROM runs").fetchall() == [(0,)]


# -- the command line ----------------------------------------------------------------------------

def krypton(args, **kw):
    return subprocess.run([sys.executable, "-m", "krypton_db", *args], capture_output=True,
                          text=True, timeout=120, **kw)


def test_cli_checks_arguments_before_computing(tmp_path):
    for out, words in (("/nonexistent/x.png", "does not exist"),
                       (str(tmp_path / "x.xyz"), "unknown image suffix '.xyz'")):
        t = time.perf_counter()
        r = krypton(["demo", "--out", out])
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert time.perf_counter() - t < 30  # before loading the model and explaining
    r = krypton(["classify", "zoo:vgg16", "sample:mri", "--top", "-1"])
    assert r.returncode == 2 and "--top must be a positive number of classes, got -1" in r.stderr
    r = krypton(["sql", "--catalog", str(tmp_path), "-c", "SELECT 1"])
    assert r.returncode == 2 and r.stderr.startswith("krypton: error: catalog path")
    assert len(r.stderr.strip().splitlines()) == 1


def test_logit_runs_never_reuse_another_models_truncation(files, tmp_path):
    """score='logit' truncates the model at its logits once per model object; a new model
    object (even at the address of a collected one) gets its own."""
    import gc

    rng = np.random.default_rng(5)
    x = rng.random((16, 16, 3)).astype(np.float32)
    for seed in range(4):
        net = Net((1, 3, 16, 16), seed=100 + seed, name="tiny")
        f = net.op("Flatten", [net.op("Relu", [net.conv("input", 3, 2)])], axis=1)
        onnx.save(net.model(net.op("Softmax", [net.gemm(f, 2 * 16 * 16, 3)], axis=1)),
                  tmp_path / f"m{seed}.onnx")
        m = kdb.load_model(tmp_path / f"m{seed}.onnx")
        hm = kdb.occlude(m, x, patch=4, positions=[(0, 0)], score="logit", target=0)
        occluded = m.preprocess(x)[None].copy()
        occluded[0, :, 0:4, 0:4] = 0.0
        assert abs(float(hm.probs[0, 0]) - float(m.logits(occluded)[0, 0])) <= 1e-5
        del m, hm
        gc.collect()
