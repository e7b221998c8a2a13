"""The GPU incremental (IVM) executor: a delta plan for batches of patch positions against
device-resident materialized views, one launch per step for the whole batch (see
:mod:`krypton_db.exec.gpu` for the design and the full-inference executor it runs on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..graph import Op
from ..planner.batching import peak_bytes_per_query
from ..planner.physical import PhysicalStep, Route, physical_steps
from .cpu import act_spec
from .gpu import (GpuExecutor, as_4d, contiguous, cuda_module, device_empty, launch,
                  to_external_host)
from .incremental import union_box, window_locations, window_read_in


@dataclass
class _Loc:
    """Host-side patch location state of the metadata pass."""

    loc: np.ndarray  # [B, 2]
    idx: int  # row of the packed device location array
    size: tuple[int, int]


@dataclass
class GPatch:
    """Device patch state: every query's patch of one tensor, same size for all."""

    loc: object  # device [B, 2] int64
    val: object  # device [C, B, h, w] float32

    @property
    def size(self) -> tuple[int, int]:
        return int(self.val.shape[2]), int(self.val.shape[3])


# index math shared with the CPU executor (the tests compare the two query by query)
_window_out = window_locations


class GpuIncrementalExecutor:
    """Runs a delta plan for batches of patch positions against device-resident materialized
    views; the interface of ``IncrementalExecutor`` (``materialize``, ``run_batch``, ``close``)."""

    def __init__(self, delta_plan, executor: GpuExecutor | None = None):
        self.plan = delta_plan
        self.graph = delta_plan.graph
        self.ex = executor or GpuExecutor(self.graph)
        self.K = self.ex.K
        self.views: dict[str, object] = {}
        self.step_secs: dict[str, float] = {}
        self.profile = False
        self._steps = {s.node.name: s for s in self.ex.plan.steps}
        missing = [ds.node.name for ds in delta_plan.steps if ds.node.name not in self._steps]
        if missing:
            raise ValueError(f"delta plan steps {missing[:3]} are not steps of the executor's plan")
        # the route of each delta step on the GPU (every window a patch): what _meta launches
        self.ops = physical_steps(delta_plan, "gpu")

    def ex_step(self, ds) -> PhysicalStep:
        return self._steps[ds.node.name]

    def materialize(self, x_nchw: np.ndarray) -> np.ndarray:
        """Run the original image once and keep every step's output on the device (internal
        layout, batch axis dropped); returns the graph output [1, classes] (host)."""
        names = [self.graph.input.name] + [s.out_name for s in self.plan.steps]
        x = x_nchw[None] if x_nchw.ndim == 3 else x_nchw
        outs = self.ex.run_device(self.ex.upload(x), outputs=names)
        self.views = {}
        for k, v in outs.items():
            self.views[k] = v.reshape(v.shape[0], v.shape[2], v.shape[3]) if v.ndim == 4 else v
        return to_external_host(outs[self.graph.output])

    def bytes_per_query(self) -> int:
        return peak_bytes_per_query(self.plan, "gpu")

    def close(self) -> None:
        """End of a run: nothing is kept between runs on the device (the CPU executor keeps
        its batch arena here)."""

    # -- metadata pass (host, index math only) -------------------------------------------------
    def _meta(self, positions: np.ndarray, patch_size):
        """Walk the plan with location-only states: per step a record of what to launch and the
        [B, 2] locations it needs, packed into one array (uploaded once)."""
        locs: list[np.ndarray] = []

        def add(a) -> int:
            locs.append(np.ascontiguousarray(a, np.int64))
            return len(locs) - 1

        g = self.graph
        boxes = self.plan.batch_windows(positions)  # None: the published sizes
        st: dict[str, object] = {g.input.name: _Loc(positions, add(positions), tuple(patch_size))}
        recs = []
        for op in self.ops:
            ds, route = op.delta, op.route
            node = ds.node
            ins = [st[i] for i in node.inputs]
            if route is not Route.FULL and not all(isinstance(s, _Loc) for s in ins):
                raise RuntimeError(f"{node.name}: the physical plan routes it {route.value}, but "
                                   f"an input arrives in full (plan and executor disagree)")
            if route is Route.PATCH_WINDOW:
                pin = ins[0]
                cut = None
                if boxes is not None and ds.out_name in boxes:  # per-position regions
                    oloc, size = boxes[ds.out_name]
                    rloc, rsize = window_read_in(node, oloc, size)
                else:
                    size, crop = self.plan.window_size(ds, pin.size)
                    if crop is not None:  # projective-field threshold: keep the patch centre
                        oy, ox = (pin.size[0] - crop[0]) // 2, (pin.size[1] - crop[1]) // 2
                        cut = (oy, ox, crop)
                        nl = pin.loc + np.array([oy, ox])
                        pin = _Loc(nl, add(nl), tuple(crop))
                    oloc, rloc, rsize = _window_out(node, pin.loc, pin.size, size)
                out = _Loc(oloc, add(oloc), tuple(size))
                recs.append(("window", cut, pin.idx, add(rloc), tuple(rsize), tuple(size), out.idx))
                st[ds.out_name] = out
            elif route is Route.PATCH_POINTWISE:
                recs.append(("pointwise",))
                st[ds.out_name] = ins[0]
            elif route is Route.PATCH_MERGE:
                loc, (bh, bw) = union_box(node, [p.loc for p in ins], [p.size for p in ins])
                out = _Loc(loc, add(loc), (bh, bw))
                recs.append(("merge", out.idx, (bh, bw)))
                st[ds.out_name] = out
            else:
                recs.append(("global",))
                st[ds.out_name] = None
        packed = np.stack(locs) if locs else np.zeros((0, positions.shape[0], 2), np.int64)
        return recs, packed

    # -- batched run ----------------------------------------------------------------------------
    def run_batch(self, positions: np.ndarray, patch_values: np.ndarray) -> np.ndarray:
        """positions [B, 2] top-left corners; patch_values [C, ph, pw] (the occluded input patch,
        model-input units). Returns the graph output [B, classes] (host)."""
        cuda = cuda_module()
        positions = np.ascontiguousarray(positions, np.int64).reshape(-1, 2)
        b = positions.shape[0]
        g = self.graph
        pv = np.asarray(patch_values, np.float32)
        c0 = pv.shape[0]
        if pv.ndim == 4:  # one patch per query [C, ph, pw, B] -> the device layout [C, B, ph, pw]
            pv = pv.transpose(0, 3, 1, 2)
            recs, packed = self._meta(positions, pv.shape[2:])
            host = np.ascontiguousarray(pv)
        else:
            recs, packed = self._meta(positions, pv.shape[1:])
            host = np.ascontiguousarray(np.broadcast_to(pv[:, None], (c0, b) + pv.shape[1:]))
        dlocs = cuda.to_device(packed)  # every location of this batch, one upload
        val = cuda.to_device(host)
        state: dict[str, object] = {g.input.name: GPatch(dlocs[0], val)}
        for ds, rec in zip(self.plan.steps, recs):
            node = ds.node
            ins = [state[i] for i in node.inputs]
            t0 = time.perf_counter()
            state[ds.out_name] = self._step(ds, rec, ins, b, dlocs)
            if self.profile:
                cuda.synchronize()
                self.step_secs[node.name] = self.step_secs.get(node.name, 0.0) + time.perf_counter() - t0
        out = state[g.output] if g.output in state else state[self.plan.steps[-1].out_name]
        if isinstance(out, GPatch):
            out = self._full(g.output, out, b)
        return to_external_host(out)

    def _full(self, name: str, st, b: int):
        K = self.K
        view = self.views[name]
        if isinstance(st, GPatch):
            out = device_empty((view.shape[0], b) + tuple(view.shape[1:]))
            launch(K.stitch_patch_gpu, out.size, view, contiguous(st.val), st.loc, out)
            return out
        if st is None:  # unchanged: the view repeated over the batch
            if view.ndim == 3:
                out = device_empty((view.shape[0], b) + tuple(view.shape[1:]))
                launch(K.repeat_batch_gpu, out.size, view.reshape(view.shape[0], 1, *view.shape[1:]), out)
                return out
            out = device_empty((b,) + tuple(view.shape[1:]))
            launch(K.repeat_batch_gpu, out.size, as_4d(view), as_4d(out))
            return out
        return st

    def _step(self, ds, rec, ins, b, dlocs):
        K = self.K
        node = ds.node
        kind = rec[0]
        if kind == "window":
            _, cut, pidx, ridx, rsize, size, oidx = rec
            pin = ins[0]
            pval = pin.val
            if cut is not None:
                oy, ox, (ch, cw) = cut
                pval = pval[:, :, oy : oy + ch, ox : ox + cw]
            view = self.views[node.inputs[0]]
            fill = np.float32(-np.inf) if node.op is Op.MAXPOOL else np.float32(0.0)
            buf = device_empty((view.shape[0], b) + tuple(rsize))
            launch(K.gather_patch_gpu, buf.size, view, pval, dlocs[pidx], dlocs[ridx], fill, buf)
            step = self.ex_step(ds)
            if node.op is Op.CONV:
                y = self.ex.conv(buf, node, act_spec(ds.fused), pads=(0, 0, 0, 0))
            elif node.op is Op.MAXPOOL:
                y = self.ex.pool(buf, node, pads=(0, 0, 0, 0), out_hw=size)
            else:
                p = node.params
                ishape = self.graph[node.inputs[0]].shape
                y = device_empty((buf.shape[0], b) + tuple(size))
                t, l, bo, r = p["pads"]
                kh, kw = p["kernel"]
                sh, sw = p["stride"]
                launch(K.avgpool_patch_gpu, y.size, buf, dlocs[ridx], ishape[1], ishape[2], kh, kw,
                        sh, sw, t, l, bo, r, bool(p.get("count_include_pad", False)), y)
            if ds.fused is not None and node.op is not Op.CONV:
                y = self.ex.pointwise(y, step.fused)
            return GPatch(dlocs[oidx], y)
        if kind == "pointwise":
            return GPatch(ins[0].loc, self.ex.exec_step(self.ex_step(ds), [ins[0].val]))
        if kind == "merge":
            _, bidx, (bh, bw) = rec
            bufs = []
            for name, p in zip(node.inputs, ins):
                view = self.views[name]
                buf = device_empty((view.shape[0], b, bh, bw))
                launch(K.gather_patch_gpu, buf.size, view, p.val, p.loc, dlocs[bidx], np.float32(0.0), buf)
                bufs.append(buf)
            return GPatch(dlocs[bidx], self.ex.exec_step(self.ex_step(ds), bufs))
        full = [self._full(i, s, b) for i, s in zip(node.inputs, ins)]
        return self.ex.exec_step(self.ex_step(ds), full)
