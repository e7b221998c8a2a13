"""The numba JIT CPU executor for batched float32 inference.

It interprets the physical plan (``planner.physical.PhysicalPlan``: one step per node, a CONV
or ADD with its only consumer's activation fused into the GEMM epilogue while the output tile
is still in cache) and prepares each layer's weights once (``prepare_weights``). Convolutions run on ``gemm_cpu``'s tap GEMM
(``conv_cnhw``: 1x1 stride-1 as a plain GEMM on the input itself, 3x3 stride-1 as Winograd
F(4x4, 3x3) / F(2x2, 3x3), 1 x r / r x 1 as 1-D Winograd, strided ones over phase planes,
the rest shifted-window or im2col), depthwise convolutions on a direct numba kernel. A value
read only by one channel concat is written into its slice of the concat's buffer
(the plan's ``slots``, ``planner.physical.concat_slots``).

Feature maps are CNHW (see ``kernels_cpu``), except in the steps the plan runs channels-last
(``PhysicalPlan.channels_last``: depthwise-separable bodies, NHWC ``nhwc_cpu`` kernels); a
value keeps the layout its step wrote it in and a reader in the other layout gets a transposed
copy, made once per value. Vectors are [N, K]. ``run`` takes and returns the model's own
NCHW/[N, K] batches.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np

from ..graph import ACTIVATIONS, Graph, Op
from ..heap import pin_mmap_threshold, return_freed_heap
from ..planner import algorithms
from ..planner.physical import PhysicalPlan, PhysicalStep
from . import blas_cpu
from . import kernels_cpu, nhwc_cpu
from .dense_cpu import (
    act_spec,
    conv_cnhw,
    conv_hw,
    dense,
    pointwise_any,
    pool_cnhw,
    prepare_weights,
)
from .runtime import parallel_ranges
from .view_cache import ViewCache


def to_internal(x: np.ndarray) -> np.ndarray:
    """The executors' channel-first layout (CNHW) of a 4-D batch-first array."""
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3)) if x.ndim == 4 else x


def to_external(x: np.ndarray, channels_last: bool = False) -> np.ndarray:
    """Batch-first copy (always a new array: internal buffers are reused between runs) of a
    CNHW value, or of an NHWC one (``channels_last``)."""
    if x.ndim == 4 and channels_last:
        out = np.empty((x.shape[0], x.shape[3]) + x.shape[1:3], x.dtype)
        out[...] = x.transpose(0, 3, 1, 2)
        return out
    if x.ndim == 4:
        out = np.empty((x.shape[1], x.shape[0]) + x.shape[2:], x.dtype)
        out[...] = x.transpose(1, 0, 2, 3)
        return out
    return x


def concat_into(ins: list[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Channel concat of CNHW values into ``out``; an input already in its slice of ``out``
    (written there by its producer, ``concat_slots``) is not copied, the others are copied
    with the channels split over the threads."""
    c0 = 0
    for v in ins:
        dst = out[c0 : c0 + v.shape[0]]
        c0 += v.shape[0]
        if not _in_slot(v, dst):
            parallel_ranges(v.shape[0], lambda lo, hi, v=v, dst=dst: np.copyto(dst[lo:hi], v[lo:hi]))
    return out


def _in_slot(v: np.ndarray, dst: np.ndarray) -> bool:
    """Whether ``v`` already is the slice ``dst`` (same first element and strides)."""
    return v.__array_interface__["data"][0] == dst.__array_interface__["data"][0] and v.strides == dst.strides


def in_layout(name, v, is_nhwc, want_nhwc, converted, ledger) -> np.ndarray:
    """Value ``name`` (``v``, channels-last if ``is_nhwc``) in the layout a step reads:
    itself, or its transposed copy (made at the first such reader and kept in ``converted``
    until the value's release; the copy's buffer belongs to the value in ``ledger``)."""
    if v.ndim != 4 or is_nhwc == want_nhwc:
        return v
    t = converted.get(name)
    if t is None:
        if want_nhwc:
            c, n, h, w = v.shape
            t = nhwc_cpu.cnhw_to_nhwc(v, ledger.alloc((n, h, w, c)))
        else:
            n, h, w, c = v.shape
            t = nhwc_cpu.nhwc_to_cnhw(v, ledger.alloc((c, n, h, w)))
        ledger.own(name, t)
        converted[name] = t
    return t


def _prepare_nhwc(node):
    """A channels-last conv's weights, in the form of its ``nhwc_cpu`` kernel."""
    w, bias = node.weights["W"], np.ascontiguousarray(node.weights["B"], np.float32)
    if algorithms.channels_last_pointwise(node):
        return nhwc_cpu.PointwiseWeights(w, bias)
    if algorithms.channels_last_depthwise(node):
        return nhwc_cpu.DepthwiseWeights.of(w, bias)
    return nhwc_cpu.DirectConvWeights(w, bias)


class _Arena:
    """Feature-map buffers reused across steps and runs, keyed by shape: a fresh 100+ MB
    ``np.empty`` per layer costs a page-fault + kernel zeroing pass over all of it on first
    touch (and an munmap after), which at batch 16 is a sizeable share of a VGG layer."""

    def __init__(self):
        self.free: dict[tuple, list[np.ndarray]] = {}

    def get(self, shape) -> np.ndarray:
        lst = self.free.get(tuple(shape))
        return lst.pop() if lst else np.empty(shape, np.float32)

    def put(self, a: np.ndarray) -> None:
        self.free.setdefault(a.shape, []).append(a)

    def clear(self) -> None:
        self.free.clear()


class BufferLedger:
    """Which arena buffers hold which value during one run, shared by the dense and the
    incremental executor: ``alloc`` hands out arena buffers; ``out_alloc(name)`` is the
    allocator of the step producing ``name`` (a slice of a concat's buffer where the plan
    gives ``name`` a slot: the concat owns that buffer from its first slice on); ``adopt``
    after a step keeps the buffers its output lives in (returns the step's scratch);
    ``release`` after a value's last reader returns its buffers, unless a value still alive
    views them."""

    def __init__(self, arena, plan: PhysicalPlan | None = None):
        self.arena = arena
        self.handed: dict[int, np.ndarray] = {}
        self.owned: dict[str, list[np.ndarray]] = {}
        self.slots = plan.slots if plan is not None else {}
        self._channels = {q: plan.graph[q].shape[0] for q, _ in self.slots.values()} if plan else {}
        self._pending: dict[str, np.ndarray] = {}  # concat value -> its buffer, being filled

    def reset(self) -> None:
        self.owned.clear()
        self.handed.clear()
        self._pending.clear()

    def out_alloc(self, name: str):
        """The output allocator of the step producing ``name``: a slice of a concat's buffer
        where ``name`` has a slot there (``concat_slots``; the buffer, taken from the arena
        at its first slice, belongs to the concat), that concat's buffer for the concat
        itself, otherwise ``alloc``."""
        if name not in self.slots and name not in self._pending:
            return self.alloc
        return lambda shape: self._slot_or_alloc(name, tuple(shape))

    def _slot_or_alloc(self, name: str, shape: tuple) -> np.ndarray:
        buf = self._pending.pop(name, None)  # a concat whose inputs filled their slices
        if buf is not None and buf.shape == shape:
            return buf
        slot = self.slots.get(name)
        if slot is None:
            return self.alloc(shape)
        q, c0 = slot
        cbuf = self._pending.get(q)
        if cbuf is None:
            full = (self._channels[q],) + shape[1:]
            if q in self.slots:  # nested: the concat's own buffer is a slice of the outer one
                cbuf = self._slot_or_alloc(q, full)
            else:
                cbuf = self.arena.get(full)
                self.owned.setdefault(q, []).append(cbuf)
            self._pending[q] = cbuf
        if cbuf.shape[1:] != shape[1:] or c0 + shape[0] > cbuf.shape[0]:
            return self.alloc(shape)  # not the planned shape: the concat copies this one
        return cbuf[c0 : c0 + shape[0]]

    def alloc(self, shape) -> np.ndarray:
        a = self.arena.get(shape)
        self.handed[id(a)] = a
        return a

    def adopt(self, name: str, y: np.ndarray, keep: bool = True) -> None:
        """After the step producing ``name`` = ``y``: buffers y lives in are owned by ``name``
        (``keep=False``: they leave the arena with y), the others go back."""
        for a in self.handed.values():
            if not np.may_share_memory(a, y):
                self.arena.put(a)
            elif keep:
                self.owned.setdefault(name, []).append(a)
        self.handed.clear()

    def own(self, name: str, a: np.ndarray) -> None:
        """Buffer ``a``, handed out during the current step, belongs to value ``name`` (not
        to the step's output): it goes back at ``name``'s release."""
        if self.handed.pop(id(a), None) is not None:
            self.owned.setdefault(name, []).append(a)

    def release(self, name: str, live) -> None:
        live = list(live)
        for buf in self.owned.pop(name, ()):
            if not any(np.may_share_memory(buf, u) for u in live):
                self.arena.put(buf)


class CpuExecutor:
    """Runs a graph on batches with numba kernels + BLAS, using all cores numba sees."""

    def __init__(self, graph: Graph, fuse: bool = True, prepared: dict | None = None):
        """``prepared``: another executor's ``prep`` for a graph with the same nodes and
        weights (only params such as algorithm caps may differ), shared instead of prepared
        again (a conv's prepared weights serve every algorithm)."""
        pin_mmap_threshold()  # freed batch buffers back to the OS (krypton_db.heap)
        self.graph = graph
        self.plan = PhysicalPlan.lower(graph, fuse)
        # weights prepared once per layout: conv GEMM matrices / FC weights transposed
        prepared = prepared or {}
        self.prep: dict[str, object] = {
            st.node.name: prepared[st.node.name] if st.node.name in prepared
            else prepare_weights(st.node) for st in self.plan.steps}
        # the channels-last convs' weights (``nhwc_cpu``), beside the CNHW ones the
        # incremental executor's patch steps read
        self.prep_nhwc: dict[str, object] = {
            st.node.name: _prepare_nhwc(st.node) for st in self.plan.steps
            if st.node.name in self.plan.channels_last and st.node.op is Op.CONV}
        self._step_by_name = {st.node.name: st for st in self.plan.steps}
        readers = [st.node.name for st in self.plan.steps if self.graph.input.name in st.node.inputs]
        # the batch goes straight to channels-last when every step reading it runs so
        self._input_channels_last = bool(readers) and all(r in self.plan.channels_last for r in readers)
        self.jit_seconds: float | None = None
        self._warm: tuple | None = None  # (input, its values) of an input warm-up, taken once
        self._arena = _Arena()
        self._run_lock = threading.Lock()
        self._inc_arena = None  # the incremental executor's batch arena between runs
        self._inc_lock = threading.Lock()
        self.view_memo: dict | None = None  # materialized views shared in ``shared_views``
        self.view_cache = ViewCache()  # materialized views kept between queries (LRU, bytes)

    def checkout_arena(self):
        """The batch arena the last incremental run on this model left (None if none, or if
        a concurrent run holds it: that one then gets a fresh arena)."""
        with self._inc_lock:
            a, self._inc_arena = self._inc_arena, None
        return a

    def checkin_arena(self, arena) -> None:
        with self._inc_lock:
            self._inc_arena = arena

    @contextmanager
    def shared_views(self):
        """A scope in which incremental runs on the same input share one materialization:
        adaptive drill-down's two stages explain one image, and the second reuses the first's
        materialized views (every step's output for the original image) instead of running the
        full inference again, whatever the ``view_cache`` budget (which may be 0: off)."""
        with self._inc_lock:
            outer = self.view_memo is not None
            if not outer:
                self.view_memo = {}
        try:
            yield
        finally:
            if not outer:
                with self._inc_lock:
                    self.view_memo = None

    def release_buffers(self) -> None:
        """Drop the buffers kept between runs (dense and incremental arenas, cached views)."""
        self.view_cache.clear()
        with self._inc_lock:
            self._inc_arena = None
        self._arena.clear()
        return_freed_heap()

    def warmup(self, x: np.ndarray | None = None) -> float:
        """Compile (or load from the numba cache) every kernel this plan uses; returns seconds.
        With ``x`` (one NCHW input [C, H, W]) the warm-up inference runs on it and keeps every
        value it computed for :meth:`take_warm_outputs`: the first explanation of a process
        then materializes its views from the warm-up instead of a second full inference."""
        t = time.perf_counter()
        self._warm = None
        if x is None:
            self.run(np.zeros((1,) + self.graph.input_shape, np.float32))
        else:
            x = np.ascontiguousarray(x, np.float32)[None]
            names = [self.graph.input.name] + [self.plan.out_name(s) for s in self.plan.steps]
            outs = self.run(x, outputs=names)
            # private copies: the outputs live in arena buffers that are cleared next
            self._warm = (x.copy(), {k: np.array(v) for k, v in outs.items()})
        self._arena.clear()
        return_freed_heap()  # LLVM's compile / cache-load temporaries
        self.jit_seconds = time.perf_counter() - t
        return self.jit_seconds

    def take_warm_outputs(self, x: np.ndarray, names) -> dict | None:
        """The warm-up's values ``names`` (batch-first, external layout) if it ran on the
        batch ``x``; each warm-up serves at most one caller, and only the input it ran on."""
        warm, self._warm = getattr(self, "_warm", None), None
        if warm is None or warm[0].shape != x.shape or not np.array_equal(warm[0], x):
            return None
        if not set(names) <= warm[1].keys():
            return None
        return {k: warm[1][k] for k in names}

    def run(self, batch: np.ndarray, outputs: list[str] | None = None, profile: bool = False,
            step_secs: dict[str, float] | None = None) -> dict:
        """Run on an NCHW float32 batch; returns {node name: batch-first output}.
        ``profile``: accumulate per-step seconds into the plan's ``PhysicalStep.secs``; ``step_secs``:
        accumulate them into this dict instead (keyed by node name; the caller's own)."""
        with self._run_lock, blas_cpu.single_threaded_blas():
            return self._run(batch, outputs, profile, step_secs)

    def _run(self, batch, outputs, profile, step_secs=None) -> dict:
        want = set(outputs or [self.graph.output])
        g = self.graph
        batch = np.asarray(batch, np.float32)
        result = {}
        if g.input.name in want:
            result[g.input.name] = batch
        last_use = self.last_use()
        ledger = BufferLedger(self._arena, self.plan)
        nhwc: set[str] = set()  # values held channels-last
        if self._input_channels_last and batch.ndim == 4:
            n, c, h, w = batch.shape
            vals = {g.input.name: nhwc_cpu.nchw_to_nhwc(batch, ledger.alloc((n, h, w, c)))}
            nhwc.add(g.input.name)
        else:
            vals = {g.input.name: self._internal_input(batch, ledger)}
        ledger.adopt(g.input.name, vals[g.input.name])
        converted: dict[str, np.ndarray] = {}  # value -> its copy in the other layout
        early: dict[str, np.ndarray] = {}  # fused depthwise step -> its output, made with its 1x1
        for idx, step in enumerate(self.plan.steps):
            t0 = time.perf_counter() if profile or step_secs is not None else 0.0
            name = self.plan.out_name(step)
            last = step.node.name in self.plan.channels_last
            dw = self.plan.pointwise_depthwise.get(step.node.name)
            if step.node.name in early:
                y = vals[name] = early.pop(step.node.name)  # adopted when its 1x1 conv ran
            elif dw is not None and name not in want:
                # the 1x1 conv and the depthwise conv reading it run as one (``pointwise_
                # depthwise``): the 1x1's output never exists
                x = in_layout(step.node.inputs[0], vals[step.node.inputs[0]], step.node.inputs[0] in nhwc,
                                    True, converted, ledger)
                dw_step = self._step_by_name[dw]
                dw_name = self.plan.out_name(dw_step)
                y = self.exec_pointwise_depthwise(step, dw_step, x, ledger.out_alloc(dw_name))
                nhwc.add(dw_name)
                ledger.adopt(dw_name, y)
                early[dw] = y
            else:
                ins = [in_layout(i, vals[i], i in nhwc, last, converted, ledger) for i in step.node.inputs]
                if last:
                    y = self.exec_step_nhwc(step, ins, alloc=ledger.out_alloc(name))
                    if y.ndim == 4:
                        nhwc.add(name)
                else:
                    y = self.exec_step(step, ins, alloc=ledger.out_alloc(name))
                vals[name] = y
                ledger.adopt(name, y)
            if profile:
                step.secs += time.perf_counter() - t0
            if step_secs is not None:
                n = step.node.name
                step_secs[n] = step_secs.get(n, 0.0) + time.perf_counter() - t0
            if step.fused is not None and step.node.name in want:
                raise ValueError(f"{step.node.name} is fused away; lower with fuse=False to read it")
            if name in want:
                result[name] = to_external(y, name in nhwc)
            for i in step.node.inputs:
                if last_use.get(i) == idx and i not in want:
                    vals.pop(i, None)
                    converted.pop(i, None)
                    ledger.release(i, vals.values())
        for name in list(ledger.owned):
            ledger.release(name, result.values())
        return result

    @staticmethod
    def _internal_input(batch: np.ndarray, ledger: BufferLedger) -> np.ndarray:
        """The batch in the internal layout, in an arena buffer (released after the input's
        last reader): a fresh array per run is a fresh mmap above the pinned threshold
        (``krypton_db.heap``) whose page faults cost as much as the first layers (measured 2-19
        ms for a 16 x 3 x 224 x 224 batch)."""
        if batch.ndim != 4:
            return batch
        x = ledger.alloc((batch.shape[1], batch.shape[0]) + batch.shape[2:])
        x[...] = batch.transpose(1, 0, 2, 3)
        return x

    def last_use(self) -> dict[str, int]:
        last = {}
        for idx, step in enumerate(self.plan.steps):
            for i in step.node.inputs:
                last[i] = idx
        return last

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[self.graph.output]

    def exec_step(self, step: PhysicalStep, ins: list[np.ndarray], alloc=None) -> np.ndarray:
        """One step on internal-layout inputs. ``alloc(shape)`` provides the step's 4-D output
        buffer (the run's arena, or a concat's slice: ``BufferLedger.out_alloc``) for the ops
        in ``_WRITES_INTO_ALLOC``; by default they are fresh arrays."""
        node = step.node
        op = node.op
        x = ins[0]
        act = act_spec(step.fused)
        if op is Op.CONV:
            out = alloc((node.weights["W"].shape[0], x.shape[1]) + conv_hw(x, node)) if alloc else None
            return conv_cnhw(x, node, self.prep[node.name], act, out=out)
        if op in (Op.MAXPOOL, Op.AVGPOOL):
            out = alloc((x.shape[0], x.shape[1]) + tuple(node.shape[1:])) if alloc else None
            return pool_cnhw(x, node, out=out)
        if op is Op.GLOBAL_AVGPOOL:
            m = x.mean(axis=(2, 3), dtype=np.float32)  # [C, N]
            return np.ascontiguousarray(m[:, :, None, None]) if node.params.get("keepdims", True) \
                else np.ascontiguousarray(m.T)
        if op in ACTIVATIONS or op is Op.AFFINE:
            return pointwise_any(x, node, out=alloc(x.shape) if alloc and x.ndim == 4 else None)
        if op is Op.ADD:
            if len(ins) == 2 and ins[0].shape == ins[1].shape:
                a = np.ascontiguousarray(ins[0], np.float32).reshape(-1)
                b = np.ascontiguousarray(ins[1], np.float32).reshape(-1)
                out = alloc(ins[0].shape) if alloc else np.empty(ins[0].shape, np.float32)
                of = out.reshape(-1)
                parallel_ranges(a.size, lambda lo, hi: kernels_cpu.add_act_range_cpu(a, b, of, *act, lo, hi), 65536)
                return out
            out = ins[0]
            for v in ins[1:]:
                out = out + v
            return pointwise_any(out, step.fused) if step.fused is not None else out
        if op is Op.MUL:
            out = ins[0]
            for v in ins[1:]:
                out = out * v
            return np.ascontiguousarray(out)
        if op is Op.CONCAT:
            if alloc and all(v.ndim == 4 for v in ins):
                shape = (sum(v.shape[0] for v in ins),) + ins[0].shape[1:]
                return concat_into(ins, alloc(shape))
            return np.concatenate(ins, axis=0)
        if op is Op.LRN:
            out = np.empty_like(x)
            p = node.params
            kernels_cpu.lrn_cnhw_cpu(np.ascontiguousarray(x), p["size"], np.float32(p["alpha"]), np.float32(p["beta"]),
                           np.float32(p["bias"]), out)
            return out
        if op is Op.PAD:
            t, l, b, r = node.params["pads"]
            return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=node.params["value"])
        if op is Op.RESHAPE:
            ext = to_external(x)
            y = ext.reshape((ext.shape[0],) + tuple(node.shape))
            return to_internal(y)
        if op is Op.TRANSPOSE:
            ext = to_external(x)
            y = np.transpose(ext, (0,) + tuple(a + 1 for a in node.params["perm"]))
            return to_internal(np.ascontiguousarray(y))
        if op is Op.GEMM:
            return dense(x, self.prep[node.name], np.asarray(node.weights["B"], np.float32))
        if op is Op.SOFTMAX:
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
        raise NotImplementedError(f"CPU executor has no lowering for {op}")

    def exec_pointwise_depthwise(self, pw_step: PhysicalStep, dw_step: PhysicalStep, x: np.ndarray,
                                 alloc) -> np.ndarray:
        """A fused 1x1 + depthwise pair (``PhysicalPlan.pointwise_depthwise``) on the 1x1's
        channels-last input; returns the depthwise conv's output."""
        dw = dw_step.node
        out = alloc((x.shape[0],) + tuple(dw.shape[1:]) + (dw.shape[0],))
        return nhwc_cpu.pointwise_depthwise_nhwc(
            x, self.prep_nhwc[pw_step.node.name], act_spec(pw_step.fused), self.prep_nhwc[dw.name],
            dw.params["stride"], dw.params["pads"], act_spec(dw_step.fused), out)

    def exec_step_nhwc(self, step: PhysicalStep, ins: list[np.ndarray], alloc) -> np.ndarray:
        """One channels-last step (``PhysicalPlan.channels_last``) on channels-last inputs
        [N, H, W, C]; its ops are the ones ``planner.physical.channels_last_steps`` admits."""
        node = step.node
        op = node.op
        x = ins[0]
        act = act_spec(step.fused)
        if op is Op.CONV:
            out = alloc((x.shape[0],) + tuple(node.shape[1:]) + (node.shape[0],))
            prep = self.prep_nhwc[node.name]
            if isinstance(prep, nhwc_cpu.DirectConvWeights):
                return nhwc_cpu.conv_direct_nhwc(x, prep, node.params, act, out)
            if isinstance(prep, nhwc_cpu.PointwiseWeights):
                return nhwc_cpu.pointwise_nhwc(x, prep, act, out)
            return nhwc_cpu.depthwise_nhwc(x, prep, node.params["stride"], node.params["pads"], act, out)
        if op is Op.GLOBAL_AVGPOOL:
            return np.ascontiguousarray(x.mean(axis=(1, 2), dtype=np.float32, keepdims=True))
        if op is Op.AFFINE:
            out = alloc(x.shape)
            np.multiply(x, np.asarray(node.weights["scale"], np.float32), out=out)
            np.add(out, np.asarray(node.weights["shift"], np.float32), out=out)
            return out
        if op in ACTIVATIONS:
            return pointwise_any(x, node, out=alloc(x.shape))
        # ADD / MUL: elementwise (channel broadcasts line up in either layout), so the CNHW
        # operator serves
        return self.exec_step(step, ins, alloc=alloc)

    def layer_report(self) -> list[tuple[str, str, float, float]]:
        """(node, op, seconds, GFLOP/s) per step from the last profiled runs (2 FLOPs/MAC),
        the rate assuming the profiled runs together processed ``batch_seen`` samples."""
        rows = []
        for s in self.plan.steps:
            rows.append((s.node.name, s.node.op.name, s.secs, 0.0))
        return rows


