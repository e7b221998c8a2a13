"""Memory planning: the planned arena (record & replay) never hands out overlapping live
buffers, its slab is the liveness walk's peak, and EXPLAIN's batch is the batch that runs."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
from test_occlusion import NETS

import krypton_db as kdb
from krypton_db.exec import conv_cpu, dense_cpu
from krypton_db.exec.incremental import IncrementalExecutor, PlannedArena
from krypton_db.occlusion import occlude
from krypton_db.planner.batching import peak_bytes_per_query


def _script(rng, n=40):
    """A random get/put sequence: (op, size or index of a get)."""
    ops, live = [], []
    for _ in range(n):
        if live and rng.random() < 0.45:
            ops.append(("put", live.pop(int(rng.integers(len(live))))))
        else:
            k = sum(1 for o in ops if o[0] == "get")
            ops.append(("get", int(rng.integers(1, 500))))
            live.append(k)
    return ops


def _play(arena, ops, key, scale=1.0, check=True):
    arena.begin(key)
    held, live = [], {}
    for op, v in ops:
        if op == "get":
            a = arena.get((max(1, int(v * scale)),))
            a[:] = len(held)  # stamp: a live buffer must keep its stamp until released
            live[len(held)] = a
            held.append(a)
        else:
            a = live.pop(v)
            if check:
                assert (a == v).all(), "a live buffer was overwritten"
            arena.put(a)
    for k, a in live.items():
        assert (a == k).all()
    arena.end()


@pytest.mark.parametrize("seed", range(8))
def test_planned_arena_replays_without_overlap(seed):
    rng = np.random.default_rng(seed)
    ops = _script(rng)
    arena = PlannedArena()
    _play(arena, ops, 7)  # record
    slab = arena.slab_bytes
    for _ in range(3):  # replay: no new slab
        _play(arena, ops, 7)
    assert arena.allocated == slab
    _play(arena, ops, 7, scale=0.5)  # smaller requests fit their slots
    assert arena.allocated == slab
    _play(arena, ops, 7, scale=2.0)  # larger ones deviate: fresh arrays, then a new plan
    assert arena.allocated > slab
    _play(arena, ops, 3)  # another batch size records again
    _play(arena, ops, 3)


def test_smaller_batch_replays_the_plan_and_keeps_it():
    """A run's last, smaller batch replays the full batches' plan (its buffers are no
    larger); where it deviates it gets fresh arrays but the plan stays for the next run."""
    ops = _script(np.random.default_rng(3))
    arena = PlannedArena()
    _play(arena, ops, 8)
    slab = arena.allocated
    _play(arena, ops, 5, scale=0.6)  # the smaller last batch: replayed, no allocation
    assert arena.allocated == slab
    _play(arena, ops, 5, scale=1.5)  # a smaller batch with larger buffers: fresh arrays ...
    _play(arena, ops, 8)  # ... and the full batch still replays its plan
    assert arena.allocated == slab
    _play(arena, ops, 9)  # a larger batch re-plans
    assert arena.allocated > slab


def test_occlude_keeps_the_batch_arena_for_the_next_run(tiny_nets):
    m, img = tiny_nets["resnet"]
    first = occlude(m, img, patch=4, stride=3, batch_size=8)
    arena = m.executor._inc_arena
    assert arena is not None and arena.slab_bytes > 0
    allocated = arena.allocated
    again = occlude(m, img, patch=4, stride=3, batch_size=8)  # replays from its first batch
    assert m.executor._inc_arena is arena and arena.allocated == allocated
    np.testing.assert_array_equal(first.probs, again.probs)
    m.executor.release_buffers()
    assert m.executor._inc_arena is None


def test_planned_arena_slab_is_the_liveness_peak():
    arena = PlannedArena()
    # a lives [0, 2], b [1, 3], c [4, 5] (after a and b are released): peak a + b
    ops = [("get", 100), ("get", 50), ("put", 0), ("put", 1), ("get", 120), ("put", 2)]
    _play(arena, ops, 1)
    assert arena.slab_bytes == 4 * 150


@pytest.mark.parametrize("name", list(NETS))
def test_slab_matches_the_planned_peak(tiny_nets, name):
    m, img = tiny_nets[name]
    m.executor.warmup()
    m.executor.release_buffers()  # no arena planned for another run's (larger) batches
    xn = m.to_nchw(m.preprocess(img)[None])[0]
    plan = kdb.plan(m, 3)
    inc = IncrementalExecutor(plan, m.executor)
    inc.materialize(xn)
    pos = np.array([[0, 0], [1, 2], [4, 4], [2, 5], [3, 1], [0, 3]])
    pv = np.zeros((xn.shape[0], 3, 3), np.float32)
    first = inc.run_batch(pos[:3], pv)
    again = inc.run_batch(pos[:3], pv)  # replayed in the slab
    np.testing.assert_array_equal(first, again)
    est = peak_bytes_per_query(plan, "cpu") * 3
    assert 0 < inc._arena.slab_bytes <= 1.25 * est
    assert inc.bytes_per_query() == peak_bytes_per_query(plan, "cpu")


@pytest.mark.parametrize("mode", ["exact", "naive"])
def test_explain_batch_is_the_executed_batch(tiny_nets, mode, tmp_path):
    m, img = tiny_nets["resnet"]
    s = kdb.connect(":memory:")
    s.sql(f"CREATE MODEL res FROM '{m.source}'")
    path = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    s.sql(f"CREATE IMAGE img FROM '{path}'")
    for budget in ("'40KiB'", "'1MiB'"):
        q = (f"occlusion('res', 'img', patch => 4, stride => 2, mode => {mode}, "
             f"memory_budget => {budget})")
        phys = dict(s.explain(q))["physical_plan"]
        batch = int(re.search(r"batch (\d+), \d+ batches", phys).group(1))
        hm = occlude(kdb.load_model(m.source), img, patch=4, stride=2, mode=mode,
                     memory_budget=40 << 10 if "40" in budget else 1 << 20)
        assert hm.stats["batch_size"] == batch


def test_naive_baseline_gets_its_batches_of_16_under_the_default_budget():
    """Naive re-inference (the baseline of every speedup) runs batches of up to 16 images, as
    ORT-naive does in the benchmark protocol, unless a budget is given; the incremental modes
    keep the default budget."""
    from krypton_db.planner import batching as B

    per_image = 40 << 20  # about VGG16's at 224 x 224 (3 x its largest activation)
    assert B.batch_for("naive", per_image, 100, None) == 16
    assert B.batch_for("naive", per_image, 100, 100 << 20) == 2  # an explicit budget applies
    # ... also when it equals the incremental default (it used to be widened)
    want = B.DEFAULT_MEMORY_BUDGET // per_image  # 4 at 160 MiB
    assert 1 <= want < 16
    assert B.batch_for("naive", per_image, 100, B.DEFAULT_MEMORY_BUDGET) == want
    assert B.batch_for("exact", per_image, 100, None) == want


_MMAP_PROBE = """
import sys, numpy as np
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
if sys.argv[1] == 'pinned':
    from krypton_db.heap import pin_mmap_threshold
    pin_mmap_threshold()
x = np.ones(5 << 20, np.float32); del x   # a 20 MB block freed: glibc raises its threshold to it
r0 = rss()
y = np.ones(2 << 20, np.float32); del y   # 8 MB, freed again
print(rss() - r0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt / /proc (Linux)")
def test_pinned_mmap_threshold_returns_freed_batch_buffers():
    """With glibc's dynamic threshold an 8 MB buffer freed after a 20 MB one stays resident
    (it came from the heap); with the threshold pinned (as the CPU executor does) it goes back
    to the OS, so a run's peak RSS does not depend on the order its buffers were freed in."""
    import subprocess

    def grown(mode):
        out = subprocess.run([sys.executable, "-c", _MMAP_PROBE, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "KRYPTON_MMAP_THRESHOLD": "4194304"})
        return int(out.stdout.strip())

    assert grown("dynamic") > 6 << 20  # the probe sees glibc's behaviour at all
    assert grown("pinned") < 1 << 20


def test_step_scratch_takes_dense_transposes_from_the_allocator(monkeypatch):
    """Inside ``cpu.step_scratch`` a dense conv's whole-batch transposes (``dense_in`` /
    ``dense_out``) come from the given allocator (the incremental executor's batch arena),
    not the thread's persistent scratch; a loop over several bands reuses its first buffers;
    the result is the same. Run on a fresh thread, whose persistent scratch starts empty."""
    import threading

    from test_winograd import _conv_graph

    from krypton_db.exec import cpu as C
    from krypton_db.exec import reference, runtime
    from krypton_db.exec import winograd_cpu as W
    from krypton_db.graph import Op

    rng = np.random.default_rng(4)
    g = _conv_graph(32, 32, (14, 10), (1, 1, 1, 1), rng, act=(Op.RELU, {}))
    x = rng.normal(size=(5, 32, 14, 10)).astype(np.float32)
    ex = C.CpuExecutor(g)
    step = ex.plan.steps[0]
    xi = np.ascontiguousarray(x.transpose(1, 0, 2, 3))
    got, asked, persistent, bands = {}, [], {}, []

    def alloc(shape):
        asked.append(tuple(shape))
        return np.empty(shape, np.float32)

    def body():
        with runtime.step_scratch(alloc):
            got["y"] = ex.exec_step(step, [xi])
        persistent.update(getattr(runtime._TLS, "bufs", {}))

    monkeypatch.setattr(dense_cpu, "WINO_BAND_FLOATS", 32 * 6 * 12 * 5)  # 6-row bands: 14 rows in 3
    real = W.conv
    monkeypatch.setattr(W, "conv", lambda *a, **kw: (bands.append(1), real(*a, **kw))[1])
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert len(bands) == 3
    # one dense_in and one dense_out for the whole band loop (the first band's, reused)
    assert len(asked) == 2 and not {"dense_in", "dense_out"} & set(persistent)
    want = reference.run(g, x)[g.output]
    np.testing.assert_allclose(got["y"].transpose(1, 0, 2, 3), want, rtol=1e-4, atol=1e-4)


def test_shifted_patch_conv_reads_its_own_slice_of_a_slab():
    """A 5x5 patch conv on a few queries takes the shifted-window route, which reads the
    gathered read-in through the spare tail after it. Replayed batches hand the read-in out
    as a slice of the arena's slab, at any offset (numpy collapses view chains: ``buf.base``
    is the slab), so the route must start at the read-in's own first element."""
    from krypton_db.exec import patch_cpu as P
    from krypton_db.exec import reference
    from krypton_db.graph import Graph, Node, Op

    rng = np.random.default_rng(6)
    c, o, hr, wr, nb = 16, 8, 12, 13, 3
    w = (rng.normal(size=(o, c, 5, 5)) / 20).astype(np.float32)
    b = rng.normal(size=o).astype(np.float32)
    nodes = [Node("x", Op.INPUT, (), {}, {}, (c, hr, wr)),
             Node("k", Op.CONV, ("x",), dict(kernel=(5, 5), stride=(1, 1), pads=(0, 0, 0, 0), dilation=(1, 1),
                                             groups=1), {"W": w, "B": b}, (o, hr - 4, wr - 4))]
    g = Graph(nodes, "k")
    x = rng.normal(size=(nb, c, hr, wr)).astype(np.float32)
    n, tail = c * hr * wr * nb, 4 * nb
    slab = rng.normal(size=5000 + n + tail).astype(np.float32)  # other buffers' data around it
    buf = slab[5000 : 5000 + n].reshape(c, hr, wr, nb)
    buf[...] = x.transpose(1, 2, 3, 0)
    assert buf.base is slab
    calls = []
    real = P._conv_shift
    P._conv_shift = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
    try:
        got = P.conv_chwb(buf, g["k"], conv_cpu.ConvWeights.of(g["k"]), dense_cpu.act_spec(None), (hr - 4, wr - 4))
    finally:
        P._conv_shift = real
    assert calls, "the shifted-window route was not taken"
    want = reference.run(g, x)["k"].transpose(1, 2, 3, 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_planning_prepares_no_weights():
    """Planning is index math: kdb.plan of VGG16 (528 MB of weights) allocates < 50 MB and
    builds no executor (weight preparation belongs to the executors)."""
    import tracemalloc

    import krypton_db as kdb

    m = kdb.load_model("zoo:vgg16")
    tracemalloc.start()
    try:
        plan = kdb.plan(m, 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(plan.steps) >= 25 and plan.theoretical_speedup > 1  # 13 convs (+ReLU), 5 pools, FCs
    assert peak < 50 << 20, f"planning VGG16 allocated {peak / 2**20:.1f} MiB"
    assert m._executor is None
