"""Property-based fuzzing (hypothesis) of what users type: ``occlude``'s arguments and query
strings. Whatever comes in, the answer is a result or a ``KryptonError``, never a numpy /
DuckDB / numba / Python-internal exception, and the process stays usable afterwards.

The examples are derandomized (a fixed seed) and bounded; ``KRYPTON_FUZZ_EXAMPLES`` raises
the count for a longer run (the closing notes report one)."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from onnx_builders import Net
from PIL import Image

import krypton_db as kdb
from krypton_db.errors import KryptonError
from krypton_db.occlusion import HeatMap

EXAMPLES = int(os.environ.get("KRYPTON_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    net = Net((1, 3, 24, 24), seed=9, name="tiny")  # the default 16x16 patch fits
    y = net.op("Relu", [net.conv("input", 3, 4)])
    y = net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    f = net.op("Flatten", [y], axis=1)
    onnx.save(net.model(net.op("Softmax", [net.gemm(f, 4 * 12 * 12, 3)], axis=1)), d / "tiny.onnx")
    Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)).save(
        d / "scan.png")
    m = kdb.load_model(d / "tiny.onnx")
    s = kdb.connect(":memory:")
    s.sql(f"CREATE MODEL tiny FROM '{d / 'tiny.onnx'}'; CREATE IMAGE scan FROM '{d / 'scan.png'}'")
    yield d, m, s
    s.close()


numbers = st.one_of(st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([np.int64(4), np.float32(0.5), np.int32(2), True, False]))
scalars = st.one_of(numbers, st.none(), st.text(max_size=6), st.sampled_from(["128MiB", "1e3", "4"]))
pairs = st.one_of(scalars, st.tuples(scalars, scalars), st.lists(scalars, max_size=4))
values = st.one_of(pairs, st.lists(st.tuples(st.integers(-2, 14), st.integers(-2, 14)), max_size=6),
                   st.lists(st.lists(st.integers(-2, 14), max_size=3), max_size=4),
                   st.dictionaries(st.sampled_from(["r", "speedup", "R"]), numbers, max_size=2),
                   st.builds(lambda n: np.arange(n).reshape(-1, 2) if n % 2 == 0 else np.arange(n),
                             st.integers(0, 8)))

ARGS = ("patch", "stride", "color", "target", "mode", "region", "positions", "all_classes",
        "tau", "target_ssim", "domain", "drilldown", "batch_size", "memory_budget", "score",
        "device", "image_name")
MODES = st.sampled_from(["exact", "naive", "approximate", "EXACT", "fast", 3])


@seed(20261206)
@FUZZ
@given(kw=st.dictionaries(st.sampled_from(ARGS), values, max_size=5), mode=MODES,
       image=st.sampled_from(["png", "array", "nan", "empty", "missing", "garbage", "list"]))
def test_occlude_arguments(setup, kw, mode, image):
    d, m, _ = setup
    kw = dict(kw, mode=mode, **({} if "patch" in kw else {"patch": 4}))
    kw.pop("device", None)  # device='gpu' would ask for a CUDA GPU: covered elsewhere
    img = {"png": d / "scan.png", "array": np.full((12, 12, 3), 0.5, np.float32),
           "nan": np.full((12, 12), np.nan), "empty": np.zeros((0, 3)), "missing": d / "none.png",
           "garbage": b"\x00\x01", "list": [[0.1, 0.2], [0.3, 0.4]]}[image]
    try:
        hm = kdb.occlude(m, img, **kw)
    except KryptonError:
        return
    assert isinstance(hm, HeatMap) and np.isfinite(hm.probs).all()
    assert ((hm.probs >= 0) & (hm.probs <= 1 + 1e-6)).all()


FRAGMENTS = ["SELECT", "SELEC", "*", "y, x, prob", "FROM", "occlusion(", ")", "'tiny'", "'scan'",
             "'nope'", ",", "patch =>", "stride =>", "color =>", "mode =>", "'exact'", "'naive'",
             "tau =>", "region =>", "positions =>", "target =>", "ALL", "(0, 0)", "((0, 0), (4, 4))",
             "(0, 0, 8, 8)", "4", "8", "0", "-1", "1e309", "0.5", "'128MiB'", "WHERE", "prob > 0.5",
             "ORDER BY", "LIMIT 2", ";", "EXPLAIN", "ANALYZE", "SET", "stride = 4", "RESET ALL",
             "SHOW OPTIONS", "CREATE MODEL", "CREATE IMAGE", "x", "FROM 'a.png'", "--", "/*", "'",
             "\"", "{r: 0.5}", "drilldown =>", "TRUE", "NULL", "GROUP BY label", "count(*)", "JOIN",
             "runs", "heatmaps", "AS", "(", "unicode é", "\x00"]


@seed(20261206)
@FUZZ
@given(parts=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=14),
       raw=st.text(max_size=20))
def test_query_strings(setup, parts, raw):
    _, _, s = setup
    text = " ".join(parts) + (" " + raw if raw and len(parts) % 3 == 0 else "")
    try:
        s.sql(text).fetchall()
    except KryptonError:
        pass


OPTION_VALUES = ["4", "0", "-3", "13", "2.5", "'x'", "NULL", "TRUE", "(2, 3)", "(1, 2, 3)", "(0, 0)",
                 "((0, 0), (4, 8))", "((0, 0, 1))", "(0, 0, 8, 8)", "(8, 8, 0, 0)", "'exact'",
                 "'naive'", "'approximate'", "0.5", "1e309", "'128MiB'", "'1 GiB'", "ALL", "'cat'",
                 "{r: 0.5}", "{r: 2}", "{speedup: 3}", "''"]
OPTION_NAMES = ["patch", "stride", "color", "target", "mode", "tau", "target_ssim", "region",
                "positions", "batch_size", "memory_budget", "score", "drilldown", "all_classes",
                "domain", "device", "patchh"]
TAILS = ["", " WHERE prob < 0.9", " ORDER BY prob LIMIT 3", " WHERE nope > 1", " GROUP BY y",
         " ORDER BY label"]


@seed(20261206)
@FUZZ
@given(opts=st.lists(st.tuples(st.sampled_from(OPTION_NAMES), st.sampled_from(OPTION_VALUES)),
                     max_size=4),
       head=st.sampled_from(["SELECT y, x, prob FROM ", "SELECT count(*) FROM ", "EXPLAIN ",
                             "SELECT * FROM "]),
       tail=st.sampled_from(TAILS), image=st.sampled_from(["'scan'", "'nope'", "42"]))
def test_structured_occlusion_queries(setup, opts, head, tail, image):
    _, _, s = setup
    args = "".join(f", {k} => {v}" for k, v in opts)
    body = f"occlusion('tiny', {image}{args})"
    text = head + body + ("" if head.startswith("EXPLAIN") else tail)
    if "device" in args:
        text = text.replace("device =>", "score =>")  # no CUDA GPU here: covered elsewhere
    try:
        s.sql(text).fetchall()
    except KryptonError:
        pass


def test_the_process_stays_usable_after_fuzzing(setup):
    d, m, s = setup
    want = kdb.occlude(m, d / "scan.png", patch=4, stride=4, mode="naive")
    got = kdb.occlude(m, d / "scan.png", patch=4, stride=4)
    assert np.abs(got.probs - want.probs).max() <= 1e-5
    rows = s.sql("SELECT y, x, prob FROM occlusion('tiny', 'scan', patch => 4, stride => 4) "
                 "ORDER BY y, x").fetchall()
    assert len(rows) == want.probs.size and math.isclose(rows[0][2], float(want.probs[0, 0]),
                                                         abs_tol=1e-5)
