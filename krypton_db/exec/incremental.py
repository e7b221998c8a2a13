"""Batched incremental inference (IVM with multi-query optimization) on the CPU.

Given the materialized views (every step's output for the original image) and a batch of
queries (patch positions), each step maintains, per query, either a *patch* (its location
[B, 2] and values [C, h, w, B] in the CHWB layout of ``patch_cpu``, the same size for every
query) or the *full* tensor (CNHW, after a global-context layer). Per step the delta plan's
rule kind decides the physical operator:

- window:    gather every query's read-in context (patch applied) in ONE kernel launch, run
             the layer once on the whole batch with padding 0 (conv: GEMMs over all queries)
- pointwise: run on the patch values
- merge:     per query the union box of the input patches; each input gathered over it
- global:    stitch the patch into the materialized view and run the layer fully

Locations use the published border rule: the output patch keeps its size and is shifted
back inside the tensor, so every query in a batch has the same patch size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..graph import Op
from ..heap import return_freed_heap
from ..planner.batching import peak_bytes_per_query
from ..planner.physical import Route, physical_steps
from . import patch_cpu
from .cpu import BufferLedger, CpuExecutor, act_spec, in_layout, to_external
from .runtime import step_scratch
from .view_cache import input_key


class PlannedArena:
    """Batch buffers at offsets planned ahead in one slab (static memory planning, as ML
    compilers do for activations), with record & replay:

    - the first batch of a size *records*: every buffer is a fresh array, and the sequence of
      requests (``get``) and releases (``put``) is logged;
    - at its end, each buffer released within the batch gets an offset in one slab such that
      buffers whose lifetimes overlap never overlap in memory (greedy, largest first, lowest
      offset that fits) -- so the slab is about the batch's peak of live buffers
      (``planner.batching.peak_bytes_per_query``), not the sum of every step's buffers;
    - later batches of the same size *replay*: the k-th request gets the k-th planned slot
      (no allocation, no page faults) while the requests and releases arrive in the recorded
      order and fit their slots; from the first deviation on (a larger union box, a different
      path) requests get fresh arrays, and that batch is recorded for the next one.

    Buffers never released within the batch (the output, values aliased by a view) always
    get fresh arrays. One plan is kept: a smaller batch (a run's last) replays it -- its
    buffers are no larger, in the same order -- and keeps it even where it deviates; a larger
    one re-plans. The CPU executor keeps the arena between runs (``CpuExecutor.checkin_arena``),
    so a model's next explanation replays from its first batch on: recording a batch costs a
    page fault per fresh page, ~40% of a ResNet18 batch at 64 queries."""

    def __init__(self):
        self.allocated = 0  # bytes of slabs ever allocated (the arena's footprint)
        self.slab_bytes = 0
        self._plan = None  # (key, events, sizes, offsets {slot: off}, slab)
        self._key = None

    def begin(self, key) -> None:
        self._key = key
        self._events: list[tuple[str, int]] = []
        self._sizes: list[int] = []
        self._slot: dict[int, int] = {}  # id(handed-out array) -> slot
        self._on_plan = self._plan is not None and key <= self._plan[0]
        if not self._on_plan:
            self._plan = None  # free the slab of a smaller batch size before recording

    def _follows(self, ev) -> bool:
        if not self._on_plan:
            return False
        e = len(self._events)
        ok = e < len(self._plan[1]) and self._plan[1][e] == ev
        self._on_plan = ok
        return ok

    def get(self, shape) -> np.ndarray:
        n = max(math.prod(shape), 1)  # (np.prod on a tuple: 0.8% of a ResNet18 run)
        k = len(self._sizes)
        plan = self._plan
        if self._follows(("g", k)) and n <= plan[2][k] and k in plan[3]:
            off = plan[3][k]
            v = plan[4][off : off + n].reshape(shape)
        else:
            if self._on_plan and n > plan[2][k]:
                self._on_plan = False
            v = np.empty(shape, np.float32)
        self._sizes.append(n)
        self._events.append(("g", k))
        self._slot[id(v)] = k
        return v

    def put(self, v: np.ndarray) -> None:
        k = self._slot.pop(id(v), None)
        if k is not None:
            self._follows(("p", k))
            self._events.append(("p", k))

    def end(self) -> None:
        """Close the batch: re-plan from its record unless it replayed the plan throughout."""
        if self._plan is not None and (self._key < self._plan[0] or
                                       (self._on_plan and len(self._events) == len(self._plan[1]))):
            return  # replayed throughout, or a smaller batch: keep the plan
        start, end = {}, {}
        for t, (kind, k) in enumerate(self._events):
            (start if kind == "g" else end)[k] = t
        sizes = self._sizes
        # greedy placement in a few orders, the smallest slab kept (largest first alone left
        # ResNet18's slab 10% above its liveness peak)
        orders = [lambda k: -sizes[k], lambda k: (start[k], -sizes[k]),
                  lambda k: -sizes[k] * (end[k] - start[k]), lambda k: (-(end[k] - start[k]), -sizes[k])]
        total, offsets = min((_place(sorted(end, key=order), sizes, start, end) for order in orders),
                             key=lambda r: r[0])
        self._plan = None  # drop the old slab before allocating the new one
        # the recorded batch's freed buffers below glibc's mmap threshold stay resident on the
        # heap, and the slab does not reuse them: hand them back first (ResNet18: peak -8 MB;
        # no gc pass: the batch's buffers are plain arrays, freed by reference counting)
        return_freed_heap(collect=False)
        slab = np.empty(max(total, 1), np.float32)
        self.allocated += slab.nbytes
        self.slab_bytes = slab.nbytes
        self._plan = (self._key, list(self._events), list(self._sizes), offsets, slab)


def _place(keys, sizes, start, end) -> tuple[int, dict[int, int]]:
    """Greedy offsets for buffers ``keys`` in that order: each at the lowest offset where it
    overlaps no placed buffer whose lifetime [start, end] overlaps its own. Returns (slab
    size, offsets)."""
    placed: list[tuple[int, int, int, int]] = []  # (off, size, t0, t1)
    offsets = {}
    for k in keys:
        n, t0, t1 = sizes[k], start[k], end[k]
        busy = sorted((o, o + sz) for o, sz, a, b in placed if a <= t1 and t0 <= b)
        off = 0
        for lo, hi in busy:
            if off + n <= lo:
                break
            off = max(off, hi)
        offsets[k] = off
        placed.append((off, n, t0, t1))
    return max((o + sz for o, sz, _, _ in placed), default=0), offsets


@dataclass
class Patch:
    loc: np.ndarray  # [B, 2] int64 top-left (y, x)
    val: np.ndarray  # [C, h, w, B] float32

    @property
    def size(self) -> tuple[int, int]:
        return self.val.shape[1], self.val.shape[2]


def _axis_loc(x_in, w_in, k, s, p, d, w_out, size_out):
    keff = d * (k - 1) + 1
    x_o = np.maximum(-((-(p + x_in - keff + 1)) // s), 0)
    return np.minimum(x_o, w_out - size_out)


def window_locations(node, loc: np.ndarray, in_size, size_out):
    """(output patch locations, read-in origins, read-in size) of a windowed step for a batch
    whose input patches (all ``in_size``) start at ``loc`` [B, 2]. Published border rule: the
    output patch keeps its size and is shifted back inside. Shared by the CPU and GPU
    executors (pure index math)."""
    p = node.params
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    dh, dw = p.get("dilation", (1, 1))
    t, l, _, _ = p["pads"]
    ho, wo = size_out
    yo = _axis_loc(loc[:, 0], in_size[0], kh, sh, t, dh, node.shape[1], ho)
    xo = _axis_loc(loc[:, 1], in_size[1], kw, sw, l, dw, node.shape[2], wo)
    oloc = np.stack([yo, xo], axis=1).astype(np.int64)
    return (oloc,) + window_read_in(node, oloc, size_out)


def window_read_in(node, oloc: np.ndarray, size_out):
    """(read-in origins [B, 2], read-in size) of a windowed step whose output boxes of
    ``size_out`` start at ``oloc`` [B, 2]."""
    p = node.params
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    dh, dw = p.get("dilation", (1, 1))
    t, l, _, _ = p["pads"]
    ho, wo = size_out
    rloc = np.stack([oloc[:, 0] * sh - t, oloc[:, 1] * sw - l], axis=1).astype(np.int64)
    return rloc, (dh * (kh - 1) + 1 + (ho - 1) * sh, dw * (kw - 1) + 1 + (wo - 1) * sw)


def union_box(node, locs: list[np.ndarray], sizes: list[tuple[int, int]]):
    """Per query, the bounding box of a merge's input patches, as (locations [B, 2], size):
    one size for the batch (the largest union, capped at the map), shifted back inside."""
    h, w = node.shape[1], node.shape[2]
    y0 = np.min([lc[:, 0] for lc in locs], axis=0)
    x0 = np.min([lc[:, 1] for lc in locs], axis=0)
    y1 = np.max([lc[:, 0] + sz[0] for lc, sz in zip(locs, sizes)], axis=0)
    x1 = np.max([lc[:, 1] + sz[1] for lc, sz in zip(locs, sizes)], axis=0)
    bh = min(int((y1 - y0).max()), h)
    bw = min(int((x1 - x0).max()), w)
    loc = np.stack([np.minimum(y0, h - bh), np.minimum(x0, w - bw)], axis=1).astype(np.int64)
    return loc, (bh, bw)


class IncrementalExecutor:
    """Runs a delta plan for batches of patch positions against materialized views."""

    def __init__(self, delta_plan, executor: CpuExecutor | None = None):
        self.plan = delta_plan
        self.graph = delta_plan.graph
        self.ex = executor or CpuExecutor(self.graph)
        self.views: dict[str, np.ndarray] = {}
        self.step_secs: dict[str, float] = {}  # accumulated per step (EXPLAIN ANALYZE)
        self.profile = False
        self._steps = {s.node.name: s for s in self.ex.plan.steps}
        # the physical form of each delta step: the route this executor dispatches on (the
        # same list batching, the cost model and EXPLAIN read)
        self.ops = physical_steps(delta_plan, "cpu")
        # Buffers of a batch come from an arena and go back at their value's last use: a
        # fresh np.empty of tens of MB is mmapped and page-faulted (kernel-zeroed) on first
        # touch, which cost the gathers, epilogues and concats of a batch as much as 30%.
        self._stitched: dict[str, np.ndarray] = {}  # per batch: value -> its stitched full tensors
        # per batch: full values held channels-last (FULL steps the dense plan runs channels-
        # last, ``PhysicalPlan.channels_last``) and values' copies in the other layout
        self._nhwc: set[str] = set()
        self._converted: dict[str, np.ndarray] = {}
        self._state: dict[str, object] = {}  # the running batch's values (run_batch)
        self._idx = -1  # the running step
        self._boxes = None  # the running batch's per-position window boxes (plan.batch_windows)
        # the executor's arena from the previous run (planned slab, no page faults), if free
        self._arena = self.ex.checkout_arena() or PlannedArena()
        self._ledger = BufferLedger(self._arena, self.ex.plan)
        self._alloc = self._ledger.alloc
        self.last_use = self.ex.last_use()  # the delta plan's steps are the CPU plan's

    def materialize(self, x_nchw: np.ndarray) -> np.ndarray:
        """Run the original image once and keep every step's output (internal layout). An
        input materialized before (same bytes) reuses its views: from the CPU executor's
        ``shared_views`` scope, else from its LRU ``view_cache`` (``self.views_hit`` says
        which happened). Cached views are read-only here: gathers and stitches copy out."""
        names = tuple([self.graph.input.name] + [s.out_name for s in self.plan.steps])
        x = x_nchw[None] if x_nchw.ndim == 3 else x_nchw
        key = input_key(names, x)
        memo, cache = self.ex.view_memo, self.ex.view_cache
        hit = memo.get(key) if memo is not None else None
        if hit is None:
            hit = cache.get(key)
        self.views_hit = hit is not None
        if hit is not None:
            self.views = hit[0]
            if memo is not None:
                memo[key] = hit
            return hit[1]
        outs = self.ex.take_warm_outputs(x, names + (self.graph.output,))  # the warm-up's run
        if outs is None:
            outs = self.ex.run(x, outputs=list(names))
        views = {k: np.ascontiguousarray(v[0]) if v.ndim == 4 else v for k, v in outs.items()
                 if k in names}
        # the cache keeps copies: the executor's outputs live in buffers its next run reuses
        self.views, out = cache.put(key, views, outs[self.graph.output])
        if memo is not None:
            memo[key] = (self.views, out)
        return out

    def _full(self, name: str, st, b: int) -> np.ndarray:
        """The full tensors of a value: a patch stitched into its view, once per batch (a
        value read by two dense steps, e.g. ResNet's layer3 output by layer4.0's conv1 and
        downsample, is stitched for the first and reused by the second). The stitched
        buffer belongs to the value and goes back at its last use -- unless the value has a
        slot in a concat (``planner.physical.concat_slots``): then it is stitched into that slice, and the
        concat owns the buffer."""
        if not isinstance(st, Patch):
            return st
        full = self._stitched.get(name)
        if full is None:
            # stitched straight into its slice of a concat's buffer where it has one
            full = self._stitched[name] = patch_cpu.stitch(self.views[name], st.val, st.loc,
                                                   alloc=self._ledger.out_alloc(name))
            self._ledger.own(name, full)
        return full

    def run_batch(self, positions: np.ndarray, patch_values: np.ndarray) -> np.ndarray:
        """positions [B, 2] top-left corners; patch_values [C, ph, pw] (the occluded input
        patch, model-input units, the same for every query) or [C, ph, pw, B] (one per query).
        Returns the graph output [B, classes]."""
        b = positions.shape[0]
        g = self.graph
        if patch_values.ndim == 4:
            val = np.ascontiguousarray(patch_values, np.float32)
        else:
            val = np.ascontiguousarray(np.broadcast_to(patch_values[..., None],
                                                       patch_values.shape + (b,)), np.float32)
        state: dict[str, object] = {g.input.name: Patch(positions.astype(np.int64), val)}
        self._boxes = self.plan.batch_windows(positions)  # None: the published sizes
        ledger = self._ledger
        ledger.reset()
        self._stitched = {}
        self._nhwc, self._converted = set(), {}
        self._arena.begin(b)
        last = len(self.plan.steps) - 1
        self._state = state
        for idx, op in enumerate(self.ops):
            ds = op.delta
            self._idx = idx
            ins = [state[i] for i in ds.node.inputs]
            t0 = time.perf_counter()
            y = state[ds.out_name] = self._step(op, ins, b)
            # the graph output leaves the arena with the caller
            ledger.adopt(ds.out_name, y.val if isinstance(y, Patch) else y, keep=idx < last)
            for i in ds.node.inputs:  # values whose last reader ran: buffers back
                self._release_if_last(i)
            if self.profile:
                name = ds.node.name
                self.step_secs[name] = self.step_secs.get(name, 0.0) + time.perf_counter() - t0
        self._arena.end()
        name = self.plan.steps[-1].out_name
        out = state[name]
        return to_external(out, name in self._nhwc) if isinstance(out, np.ndarray) else out

    def _step(self, op, ins, b):
        ds, route = op.delta, op.route
        node = ds.node
        step = self._steps[node.name]
        if route is not Route.FULL and not all(isinstance(s, Patch) for s in ins):
            raise RuntimeError(f"{node.name}: the physical plan routes it {route.value}, but an "
                               f"input arrived in full (plan and executor disagree)")
        if route is Route.PATCH_WINDOW:
            return self._window(ds, step, ins[0])
        if route is Route.PATCH_POINTWISE:  # the same physical op, on the patch values only
            return Patch(ins[0].loc, self.ex.exec_step(step, [ins[0].val], alloc=self._alloc))
        if route is Route.PATCH_MERGE:
            return self._merge(ds, step, ins, b)
        # FULL (also a window whose output patch is the whole map, most of them on the CPU:
        # the queries carry full tensors, stitched once, on the dense executor; in the layout
        # the dense plan runs the step in: the late layers of a depthwise-separable net, where
        # every step is FULL, run channels-last, switching layout once)
        full = [self._full(i, s, b) for i, s in zip(node.inputs, ins)]
        last = node.name in self.ex.plan.channels_last
        full = [in_layout(i, v, i in self._nhwc, last, self._converted, self._ledger)
                for i, v in zip(node.inputs, full)]
        alloc = self._ledger.out_alloc(ds.out_name)
        with step_scratch(self._alloc):  # transposes' scratch from the batch arena, returned at adopt
            if not last:
                return self.ex.exec_step(step, full, alloc=alloc)
            y = self.ex.exec_step_nhwc(step, full, alloc=alloc)
        if y.ndim == 4:
            self._nhwc.add(ds.out_name)
        return y

    def _window(self, ds, step, pin: Patch) -> Patch:
        node = ds.node
        if self._boxes is not None and ds.out_name in self._boxes:
            # per-position regions: the batch's boxes, placed by the planner
            oloc, size = self._boxes[ds.out_name]
            rloc, rsize = window_read_in(node, oloc, size)
        else:
            size, crop = self.plan.window_size(ds, pin.size)
            if crop is not None:  # projective-field threshold: keep the centre of the patch
                oy, ox = (pin.size[0] - crop[0]) // 2, (pin.size[1] - crop[1]) // 2
                pin = Patch(pin.loc + np.array([oy, ox]),
                            np.ascontiguousarray(pin.val[:, oy : oy + crop[0], ox : ox + crop[1]]))
            oloc, rloc, rsize = window_locations(node, pin.loc, pin.size, size)
        src = node.inputs[0]
        fill = -np.inf if node.op is Op.MAXPOOL else 0.0
        if tuple(rsize) == tuple(pin.size) and np.array_equal(rloc, pin.loc):
            # the read-in is the patch itself (1x1 stride-1 convs): no gather; the input is
            # released after the step, as for any step
            buf = pin.val
        else:
            buf = patch_cpu.gather(self.views[src], pin.val, pin.loc, rloc, rsize, fill,
                           patch_cpu.window_tail(node, pin.loc.shape[0]), alloc=self._alloc)
            self._release_if_last(src)  # the read-in holds what the layer needs: the output may reuse it
        if node.op is Op.CONV:
            y = patch_cpu.conv_chwb(buf, node, self.ex.prep[node.name], act_spec(ds.fused), size, alloc=self._alloc)
        elif node.op is Op.MAXPOOL:
            y = patch_cpu.maxpool_chwb(buf, node, size, alloc=self._alloc)
        else:
            y = patch_cpu.avgpool_chwb(buf, node, rloc, self.graph[src].shape[1:], size, alloc=self._alloc)
        return Patch(oloc, y)

    def _release_if_last(self, name: str) -> None:
        """Give a value's buffers back if the running step is its last reader: after the
        step, or already before the step allocates its output once a gather has copied what
        it needs (ResNet18's batch slab peaked at layer3.1.add, whose identity input was held
        beside its gathered copy, the other input and the output)."""
        state = self._state
        if self.last_use.get(name) == self._idx and name in state:
            del state[name]
            self._stitched.pop(name, None)
            self._converted.pop(name, None)
            self._ledger.release(name, (v.val if isinstance(v, Patch) else v for v in state.values()))

    def _merge(self, ds, step, ins: list[Patch], b: int) -> Patch:
        node = ds.node
        loc, (bh, bw) = union_box(node, [p.loc for p in ins], [p.size for p in ins])
        # an input whose patch already is the union box at every query needs no gather
        bufs = []
        for name, p in zip(node.inputs, ins):
            if p.size == (bh, bw) and np.array_equal(p.loc, loc):
                bufs.append(p.val)
            else:
                bufs.append(patch_cpu.gather(self.views[name], p.val, p.loc, loc, (bh, bw), 0.0, alloc=self._alloc))
                if node.inputs.count(name) == 1:
                    self._release_if_last(name)  # copied into the box: the output may reuse it
        return Patch(loc, self.ex.exec_step(step, bufs, alloc=self._alloc))

    def close(self) -> None:
        """Hand the batch arena back to the CPU executor for the model's next run."""
        self.ex.checkin_arena(self._arena)

    def bytes_per_query(self) -> int:
        """Peak buffer bytes one query holds while a batch runs (liveness walk over the
        physical steps: ``planner.batching.peak_bytes_per_query``)."""
        return peak_bytes_per_query(self.plan, "cpu")
