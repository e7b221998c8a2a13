"""The runtime cost model (planner/cost.py): NNLS against SciPy, features mirroring the
executor, calibration round trip, predictions that respond to the plan."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls  # installed with scikit-image (test extra)
from test_occlusion import NETS

import krypton_db as kdb
from krypton_db.planner import algorithms
from krypton_db.exec import winograd1d_cpu as W1
from krypton_db.exec import winograd_cpu as W
from krypton_db import calibration
from krypton_db.planner import cost
from krypton_db.planner.physical import physical_steps


@pytest.mark.parametrize("seed", range(6))
def test_nnls_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.random((40, 5)) * rng.choice([1e-9, 1e3, 1.0], 5)  # badly scaled columns
    b = a @ rng.normal(size=5) + 0.01 * rng.normal(size=40)  # some coefficients clamp at 0
    ours = calibration.nnls(a, b)
    ref, _ = scipy_nnls(a, b)
    assert (ours >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(a @ ours - b), np.linalg.norm(a @ ref - b),
                               rtol=1e-6)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8 * np.abs(ref).max())


def test_nnls_recovers_exact_nonnegative_solution():
    rng = np.random.default_rng(1)
    a = rng.random((30, 5))
    x = np.array([1e-11, 0.0, 3e-10, 2.0, 5e-5])
    np.testing.assert_allclose(calibration.nnls(a, a @ x), x, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("name", list(NETS))
def test_features_cover_every_profiled_step(tiny_nets, name):
    m, img = tiny_nets[name]
    pos = np.array([[0, 0], [2, 3], [5, 1]])
    plan, secs, sizes = calibration.profile_run(m, img, 4, pos, 2)
    feats = cost.step_features(plan)
    assert [n for n, _ in feats] == [op.delta.node.name for op in physical_steps(plan)]
    assert set(secs) == {n for n, _ in feats} and sizes == [2, 1]
    w1_convs = []
    for (n, f), (ds, _, ks, _) in zip(feats, physical_steps(plan)):
        assert f[cost.NQ] == 1.0 and (f[: cost.NQ] >= 0).all()
        if ds.node.op.name == "CONV":  # conv MACs are the kernels' executed MACs
            patch = ks[-1].startswith("Batched")
            macs = ds.macs_inc if patch else ds.macs_full
            node = ds.node
            ho, wo = ds.out_size if patch else node.shape[1:]
            c = m.graph[node.inputs[0]].shape[0]
            if W.eligible(node.params, c, node.params["groups"], (ho, wo)):
                macs = macs * 16 * (-(-ho // 2)) * (-(-wo // 2)) / (9 * ho * wo)  # Winograd
            elif W1.eligible(node.params, c, node.params["groups"], (ho, wo)):
                # 1-D F(4, r): 4 + r - 1 products per 4 outputs along the filter axis
                kh, kw = node.params["kernel"]
                tiles = -(-ho // 4) * wo if kw == 1 else -(-wo // 4) * ho
                macs = macs * (3 + max(kh, kw)) * tiles / (max(kh, kw) * ho * wo)
                w1_convs.append(n)
            assert f[0 if patch else 2] == pytest.approx(macs, rel=1e-12)
            assert f[2 if patch else 0] == 0
    assert bool(w1_convs) == (name == "factorized")  # its 1-D Winograd convs were counted as such


def test_predict_scales_with_positions_and_plan(tiny_nets):
    m, _ = tiny_nets["vgg"]
    cm = cost.load_cost_model("/nonexistent/cost.json")
    assert cm["source"] == "defaults (uncalibrated)"
    small, big = kdb.plan(m, 3), kdb.plan(m, 9)
    p1 = cost.predict(small, "exact", 100, 50, cm)
    p2 = cost.predict(small, "exact", 200, 50, cm)
    p3 = cost.predict(big, "exact", 100, 50, cm)
    inc1 = p1["predicted_s"] - p1["materialize_s"]
    assert p2["predicted_s"] - p2["materialize_s"] == pytest.approx(2 * inc1)
    assert p3["predicted_s"] > p1["predicted_s"]  # a larger patch changes more cells
    assert p1["predicted_s"] < p1["naive_s"]
    naive = cost.predict(small, "naive", 100, 50, cm)
    assert naive["predicted_s"] == naive["naive_s"] == p1["naive_s"]


def test_calibration_round_trip(tiny_nets, tmp_path):
    path = tmp_path / "cm.json"
    suite = [(tiny_nets["resnet"][0], tiny_nets["resnet"][1]), (tiny_nets["inception"][0], tiny_nets["inception"][1])]
    res = calibration.calibrate(suite, path=path, patches=(3, 6), batches=(2, 6))
    stored = json.loads(path.read_text())
    assert stored["coef"] == res["coef"] and stored["version"] == cost.VERSION
    assert res["samples"] == sum(2 * 2 * len(cost.step_features(kdb.plan(m, 3)))
                                 for m, _ in suite)
    cm = cost.load_cost_model(path)
    assert cm["coef"] == res["coef"] and cm["source"].startswith("calibrated on ")
    # a calibration of an older feature set falls back to the defaults
    stored["version"] = cost.VERSION - 1
    path.write_text(json.dumps(stored))
    assert cost.load_cost_model(path)["source"] == "defaults (uncalibrated)"
    assert res["total_s"] > 0 and res["total_pred_s"] > 0 and res["rmse_s"] >= 0


def test_winograd_convs_count_the_macs_they_execute(tiny_nets, monkeypatch):
    """A 3x3 stride-1 conv with C >= 16 (and little tile padding) runs as Winograd F(2x2,
    3x3): its conv MACs are the 16-per-tile GEMM products (odd sizes padded to whole tiles),
    and switching Winograd off (KRYPTON_WINOGRAD=0) gives back the direct MACs."""
    m = tiny_nets["wide"][0]
    plan = kdb.plan(m, 3)
    on = dict(cost.step_features(plan))
    steps_on = physical_steps(plan)
    wino = {}
    for ds, _, ks, _ in steps_on:
        node = ds.node
        patch = ks[-1].startswith("Batched")
        hw = ds.out_size if patch else node.shape[1:]
        wino[node.name] = (node.op is kdb.graph.Op.CONV and W.eligible(
            node.params, m.graph[node.inputs[0]].shape[0], node.params["groups"], hw), patch, hw)
    monkeypatch.setattr(algorithms, "WINOGRAD", False)
    off = dict(cost.step_features(plan))
    same_kernels = {ds.node.name for (ds, _, a, _), (_, _, b, _) in zip(steps_on, physical_steps(plan)) if a == b}
    seen = 0
    for name, (eligible, patch, hw) in wino.items():
        if not eligible:
            if name in same_kernels:
                np.testing.assert_array_equal(on[name], off[name])
            continue
        seen += 1
        ho, wo = hw
        k = 0 if patch else 2
        ratio = 16 * (-(-ho // 2)) * (-(-wo // 2)) / (9 * ho * wo)
        assert on[name][k] == pytest.approx(off[name][k] * ratio)
        assert on[name][4] > off[name][4]  # the transforms' traffic
    assert seen >= 2, "the wide net's Winograd convs"


def test_f4x4_winograd_convs_count_the_macs_they_execute(monkeypatch):
    """A 3x3 stride-1 conv of >= 64 channels within the filter cap runs as Winograd F(4x4,
    3x3): 36 GEMM products per 4x4 output tile (7x7 padded to 8x8), counted so; with F(4x4)
    off, F(2x2)'s 16 per 2x2 tile."""
    from test_winograd import _conv_graph


    g = _conv_graph(64, 64, (7, 7), (1, 1, 1, 1), np.random.default_rng(0))
    node = g["c"]
    direct = node.macs
    f4 = cost._op_features(node, g, direct, 64 * 49, 64 * 49, dense=True)
    assert f4[2] == pytest.approx(direct * 36 * 4 / (9 * 49))
    monkeypatch.setattr(algorithms, "WINOGRAD4", False)
    f2 = cost._op_features(node, g, direct, 64 * 49, 64 * 49, dense=True)
    assert f2[2] == pytest.approx(direct * 16 * 16 / (9 * 49))
    assert f4[4] < f2[4] * 2.25  # transforms' traffic: 36 x 4 tiles vs 16 x 16
