"""``occlude(..., hooks=OcclusionHooks(...))``: per-step profiling, materialization time,
per-batch progress and the plan rewrite, without patching anything global."""

import io
import math

import numpy as np
import onnx
import pytest
from test_occlusion import NETS

import krypton_db as kdb
import krypton_db.exec.incremental as inc_mod
import krypton_db.occlusion as occ_mod
from krypton_db.exec.incremental import IncrementalExecutor
from krypton_db.hooks import OcclusionHooks
from krypton_db.occlusion import occlude
from krypton_db.planner.delta_plan import plan_occlusion
from krypton_db.progress import Progress
from krypton_db.research import force_naive_from, naive_from_rewrite


@pytest.fixture(scope="module", params=["vgg", "resnet"])
def small(request, tmp_path_factory):
    model, (h, w) = NETS[request.param]()
    p = tmp_path_factory.mktemp("hooks") / f"{request.param}.onnx"
    onnx.save(model, p)
    img = np.random.default_rng(7).random((h, w, 3)).astype(np.float32)
    return kdb.load_model(p), img


def _n_positions(m, patch, stride):
    h, w = m.spec.size
    return ((h - patch) // stride + 1) * ((w - patch) // stride + 1)


def test_profile_times_every_step_and_materialize(small):
    m, img = small
    hooks = OcclusionHooks(profile=True)
    hm = occlude(m, img, patch=3, stride=2, hooks=hooks)
    steps = [ds.node.name for ds in plan_occlusion(m.graph, (3, 3), m.executor.plan).steps]
    assert set(hooks.step_secs) == set(steps)
    assert all(v > 0 for v in hooks.step_secs.values())
    assert sum(hooks.step_secs.values()) <= hm.stats["run_s"]
    assert 0 < hooks.materialize_s <= hm.stats["prepare_s"]
    # without profile: nothing timed per step, the materialization still is
    quiet = OcclusionHooks()
    occlude(m, img, patch=3, stride=2, hooks=quiet)
    assert quiet.step_secs == {} and quiet.materialize_s > 0


def test_profile_naive_times_the_full_inference_steps(small):
    m, img = small
    hooks = OcclusionHooks(profile=True)
    occlude(m, img, patch=3, stride=5, mode="naive", hooks=hooks)
    assert set(hooks.step_secs) == {s.node.name for s in m.executor.plan.steps}
    assert all(v > 0 for v in hooks.step_secs.values())
    assert hooks.materialize_s == 0.0
    assert all(s.secs == 0.0 for s in m.executor.plan.steps)  # the shared plan is untouched


@pytest.mark.parametrize("mode", ["exact", "naive", "approximate"])
def test_on_batch_progress_reaches_the_total(small, mode):
    m, img = small
    calls = []
    kw = dict(tau=0.5) if mode == "approximate" else {}
    occlude(m, img, patch=3, stride=2, mode=mode, batch_size=7,
            hooks=OcclusionHooks(on_batch=lambda d, t: calls.append((d, t))), **kw)
    n = _n_positions(m, 3, 2)
    assert len(calls) == math.ceil(n / 7)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # strictly increasing
    assert all(t == n for _, t in calls) and calls[-1] == (n, n)


def test_plan_rewrite_naive_from_equals_exact(small):
    m, img = small
    steps = [ds.node.name for ds in plan_occlusion(m.graph, (3, 3), m.executor.plan).steps]
    exact = occlude(m, img, patch=3, stride=2, all_classes=True)
    seen = []

    def rewrite(plan):
        seen.append(plan)
        return force_naive_from(plan, steps[1])

    hooks = OcclusionHooks(plan_rewrite=rewrite, profile=True)
    got = occlude(m, img, patch=3, stride=2, all_classes=True, hooks=hooks)
    assert len(seen) == 1
    assert np.abs(got.all_probs - exact.all_probs).max() <= 1e-5
    assert got.stats["macs_incremental"] == force_naive_from(seen[0], steps[1]).macs_inc \
        > exact.stats["macs_incremental"]
    assert set(hooks.step_secs) == set(steps)
    # naive mode has no delta plan: the rewrite is not called
    occlude(m, img, patch=3, stride=5, mode="naive", hooks=OcclusionHooks(plan_rewrite=rewrite))
    assert len(seen) == 1
    assert naive_from_rewrite(None) is None and naive_from_rewrite("") is None


def test_nothing_global_is_patched(small):
    m, img = small
    cls = inc_mod.IncrementalExecutor
    during = []

    def on_batch(done, total):
        during.append((inc_mod.IncrementalExecutor, getattr(occ_mod, "IncrementalExecutor")))

    occlude(m, img, patch=3, stride=2, batch_size=5,
            hooks=OcclusionHooks(plan_rewrite=naive_from_rewrite(m.executor.plan.steps[0]
                                                                  .node.name),
                                 profile=True, on_batch=on_batch))
    # the executor class is the same object everywhere during the run (nothing swapped in)
    assert during and all(c is cls is IncrementalExecutor and used is cls for c, used in during)
    assert inc_mod.IncrementalExecutor is cls


def test_drilldown_progress_spans_both_stages(small):
    m, img = small
    calls = []
    hooks = OcclusionHooks(profile=True, on_batch=lambda d, t: calls.append((d, t)))
    hm = kdb.occlude(m, img, patch=3, stride=1, drilldown=dict(r=0.25, speedup=2.0),
                     batch_size=4, hooks=hooks)
    d = hm.stats["drilldown"]
    total = d["stage1_positions"] + d["stage2_positions"]
    assert all(t == total for _, t in calls) and calls[-1] == (total, total)
    done = [c for c, _ in calls]
    assert done == sorted(done) and d["stage1_positions"] in done  # stage 2 goes on from there
    assert hooks.materialize_s > 0 and hooks.step_secs


def test_progress_bar_fed_by_on_batch(small):
    m, img = small
    out = io.StringIO()
    bar = Progress("occlusion", stream=out, interval=0.01)
    try:
        occlude(m, img, patch=3, stride=2, batch_size=3, hooks=OcclusionHooks(on_batch=bar.update))
    finally:
        bar.close()
    n = _n_positions(m, 3, 2)
    assert (bar.done, bar.total) == (n, n)
    assert f"{n}/{n} positions" in bar._line()


def test_query_names_stay_importable():
    from krypton_db import query, research

    for name in ("Progress", "ablation", "force_naive_from"):
        assert hasattr(query, name)
    assert query.force_naive_from is research.force_naive_from
    # no process-wide switch: disable_rule belongs to each plan (OcclusionHooks.disabled_rules)
    assert not hasattr(query, "instrumented") and not hasattr(query, "rule_switches")
