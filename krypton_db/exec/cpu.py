"""The numba JIT CPU executor for batched float32 inference.

Lowering (``CpuPlan``): each graph node becomes one step; a CONV or ADD followed by its only
consumer being a pointwise activation is fused (the activation runs in the GEMM epilogue
while the output block is still in cache). Convolutions are lowered to chunked im2col + BLAS
sgemm (numpy's OpenBLAS; ``threadpoolctl`` shows its kernel), depthwise convolutions to a
direct numba kernel, 1x1 stride-1 convolutions to a plain GEMM on the input itself.

Feature maps are CNHW (see ``kernels_cpu``); vectors are [N, K]. ``run`` takes and returns
the model's own NCHW/[N, K] batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..graph import Graph, Node, Op
from . import kernels_cpu as K

_ACT = {
    Op.RELU: K.ACT_RELU, Op.CLIP: K.ACT_CLIP, Op.LEAKY_RELU: K.ACT_LEAKY,
    Op.SIGMOID: K.ACT_SIGMOID, Op.HARD_SIGMOID: K.ACT_HSIGMOID, Op.HARD_SWISH: K.ACT_HSWISH,
}

# im2col block: at most this many float32 values (16 MiB) per chunk of columns
COLS_BUDGET = 4 * 1024 * 1024


def act_spec(node: Node | None) -> tuple[int, np.float32, np.float32]:
    """(code, a0, a1) of a fusable activation node, or the identity."""
    if node is None:
        return K.ACT_NONE, np.float32(0), np.float32(0)
    p = node.params
    a0 = {Op.CLIP: p.get("lo"), Op.LEAKY_RELU: p.get("alpha"), Op.HARD_SIGMOID: p.get("alpha")}
    a1 = {Op.CLIP: p.get("hi"), Op.HARD_SIGMOID: p.get("beta")}
    return _ACT[node.op], np.float32(a0.get(node.op) or 0.0), np.float32(a1.get(node.op) or 0.0)


@dataclass
class ConvWeights:
    """Per-group GEMM matrices of a conv, prepared once."""

    mats: list[np.ndarray]
    bias: np.ndarray
    w4: np.ndarray

    @classmethod
    def of(cls, node: Node) -> "ConvWeights":
        w = node.weights["W"]
        g = node.params["groups"]
        og = w.shape[0] // g
        mats = [np.ascontiguousarray(w[i * og : (i + 1) * og].reshape(og, -1)) for i in range(g)]
        return cls(mats, np.ascontiguousarray(node.weights["B"], np.float32), np.ascontiguousarray(w))


def conv_cnhw(x: np.ndarray, node: Node, cw: ConvWeights, act=(0, np.float32(0), np.float32(0)),
              pads=None, out: np.ndarray | None = None) -> np.ndarray:
    """Convolution of a CNHW batch; ``pads`` overrides the node's padding (incremental plans
    run on read-in contexts with padding 0)."""
    p = node.params
    c, n, h, w = x.shape
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    dh, dw = p["dilation"]
    t, l, b, r = pads if pads is not None else p["pads"]
    ho = (h + t + b - dh * (kh - 1) - 1) // sh + 1
    wo = (w + l + r - dw * (kw - 1) - 1) // sw + 1
    o = cw.w4.shape[0]
    g = p["groups"]
    if out is None:
        out = np.empty((o, n, ho, wo), np.float32)
    code, a0, a1 = act
    if g == c == o and cw.w4.shape[1] == 1 and g > 1:
        K.depthwise_conv_cpu(x, cw.w4, cw.bias, sh, sw, dh, dw, t, l, code, a0, a1, out)
        return out
    cg = c // g
    og = o // g
    ncols = n * ho * wo
    out2 = out.reshape(o, ncols)
    if kh == kw == 1 and sh == sw == 1 and t == l == b == r == 0:
        x2 = x.reshape(c, ncols)
        for gi in range(g):
            ys = out2[gi * og : (gi + 1) * og]
            np.matmul(cw.mats[gi], x2[gi * cg : (gi + 1) * cg], out=ys)
            K.bias_act_cpu(ys, cw.bias[gi * og : (gi + 1) * og], code, a0, a1)
        return out
    rows = cg * kh * kw
    chunk = max(wo, min(ncols, COLS_BUDGET // rows))
    cols = np.empty((rows, chunk), np.float32)
    for gi in range(g):
        for j0 in range(0, ncols, chunk):
            j1 = min(j0 + chunk, ncols)
            cb = cols[:, : j1 - j0]
            K.im2col_cnhw_cpu(x, gi * cg, cg, kh, kw, sh, sw, dh, dw, t, l, ho, wo, j0, j1, cb)
            ys = out2[gi * og : (gi + 1) * og, j0:j1]
            np.matmul(cw.mats[gi], cb, out=ys)
            K.bias_act_cpu(ys, cw.bias[gi * og : (gi + 1) * og], code, a0, a1)
    return out


def pool_cnhw(x: np.ndarray, node: Node, pads=None, out_hw=None) -> np.ndarray:
    p = node.params
    c, n, _, _ = x.shape
    ho, wo = out_hw if out_hw is not None else node.shape[1:]
    t, l, b, r = pads if pads is not None else p["pads"]
    out = np.empty((c, n, ho, wo), np.float32)
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    K.pool_cnhw_cpu(x, kh, kw, sh, sw, t, l, b, r, node.op is Op.MAXPOOL,
                    bool(p.get("count_include_pad", False)), out)
    return out


def pointwise_any(x: np.ndarray, node: Node) -> np.ndarray:
    """A pointwise node on a CNHW feature map or an [N, K] vector batch."""
    out = np.empty_like(x)
    if node.op is Op.AFFINE:
        s = node.weights["scale"].astype(np.float32)
        sh = node.weights["shift"].astype(np.float32)
        if x.ndim == 4:
            K.affine_cnhw_cpu(x.reshape(x.shape[0], -1), s, sh, out.reshape(x.shape[0], -1))
        else:
            np.add(x * s, sh, out=out)
        return out
    code, a0, a1 = act_spec(node)
    K.act_cpu(x.reshape(-1), out.reshape(-1), code, a0, a1)
    return out


@dataclass
class Step:
    node: Node
    fused: Node | None = None  # activation folded into this step
    prep: object = None
    secs: float = 0.0


@dataclass
class CpuPlan:
    """Physical plan for one graph on the CPU: ordered steps with fused activations."""

    graph: Graph
    steps: list[Step] = field(default_factory=list)

    @classmethod
    def lower(cls, graph: Graph, fuse: bool = True) -> "CpuPlan":
        cons = graph.consumers()
        steps: list[Step] = []
        absorbed: set[str] = set()
        for node in graph.nodes[1:]:
            if node.name in absorbed:
                continue
            fused = None
            nxt = cons[node.name]
            if (
                fuse
                and node.op in (Op.CONV, Op.ADD)
                and len(nxt) == 1
                and node.name != graph.output
                and graph[nxt[0]].op in _ACT
            ):
                fused = graph[nxt[0]]
                absorbed.add(fused.name)
            prep = ConvWeights.of(node) if node.op is Op.CONV else None
            if node.op is Op.GEMM:
                prep = np.ascontiguousarray(node.weights["W"].T)
            steps.append(Step(node, fused, prep))
        return cls(graph, steps)

    def out_name(self, step: Step) -> str:
        return step.fused.name if step.fused is not None else step.node.name


def _to_internal(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3)) if x.ndim == 4 else x


def _to_external(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3)) if x.ndim == 4 else x


class CpuExecutor:
    """Runs a graph on batches with numba kernels + BLAS, using all cores numba sees."""

    def __init__(self, graph: Graph, fuse: bool = True):
        self.graph = graph
        self.plan = CpuPlan.lower(graph, fuse)
        self.jit_seconds: float | None = None

    def warmup(self) -> float:
        """Compile (or load from the numba cache) every kernel this plan uses; returns seconds."""
        t = time.perf_counter()
        x = np.zeros((1,) + self.graph.input_shape, np.float32)
        self.run(x)
        self.jit_seconds = time.perf_counter() - t
        return self.jit_seconds

    def run(self, batch: np.ndarray, outputs: list[str] | None = None, profile: bool = False) -> dict:
        """Run on an NCHW float32 batch; returns {node name: batch-first output}."""
        want = set(outputs or [self.graph.output])
        g = self.graph
        vals: dict[str, np.ndarray] = {g.input.name: _to_internal(np.asarray(batch, np.float32))}
        result = {}
        if g.input.name in want:
            result[g.input.name] = np.asarray(batch, np.float32)
        last_use = self._last_use()
        for idx, step in enumerate(self.plan.steps):
            t0 = time.perf_counter() if profile else 0.0
            y = self._exec(step, [vals[i] for i in step.node.inputs])
            if profile:
                step.secs += time.perf_counter() - t0
            vals[self.plan.out_name(step)] = y
            if step.fused is not None and step.node.name in want:
                raise ValueError(f"{step.node.name} is fused away; lower with fuse=False to read it")
            name = self.plan.out_name(step)
            if name in want:
                result[name] = _to_external(y)
            for i in step.node.inputs:
                if last_use.get(i) == idx and i not in want:
                    vals.pop(i, None)
        return result

    def _last_use(self) -> dict[str, int]:
        last = {}
        for idx, step in enumerate(self.plan.steps):
            for i in step.node.inputs:
                last[i] = idx
        return last

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[self.graph.output]

    def _exec(self, step: Step, ins: list[np.ndarray]) -> np.ndarray:
        node = step.node
        op = node.op
        x = ins[0]
        act = act_spec(step.fused)
        if op is Op.CONV:
            return conv_cnhw(x, node, step.prep, act)
        if op in (Op.MAXPOOL, Op.AVGPOOL):
            return pool_cnhw(x, node)
        if op is Op.GLOBAL_AVGPOOL:
            m = x.mean(axis=(2, 3), dtype=np.float32)  # [C, N]
            return np.ascontiguousarray(m[:, :, None, None]) if node.params.get("keepdims", True) \
                else np.ascontiguousarray(m.T)
        if op in _ACT or op is Op.AFFINE:
            return pointwise_any(x, node)
        if op is Op.ADD:
            if len(ins) == 2 and ins[0].shape == ins[1].shape:
                out = np.empty_like(ins[0])
                K.add_act_cpu(ins[0].reshape(-1), ins[1].reshape(-1), out.reshape(-1), *act)
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
            return np.concatenate(ins, axis=0)
        if op is Op.LRN:
            out = np.empty_like(x)
            p = node.params
            K.lrn_cnhw_cpu(x, p["size"], np.float32(p["alpha"]), np.float32(p["beta"]),
                           np.float32(p["bias"]), out)
            return out
        if op is Op.PAD:
            t, l, b, r = node.params["pads"]
            return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=node.params["value"])
        if op is Op.RESHAPE:
            ext = _to_external(x)
            y = ext.reshape((ext.shape[0],) + tuple(node.shape))
            return _to_internal(y)
        if op is Op.TRANSPOSE:
            ext = _to_external(x)
            y = np.transpose(ext, (0,) + tuple(a + 1 for a in node.params["perm"]))
            return _to_internal(np.ascontiguousarray(y))
        if op is Op.GEMM:
            y = x @ step.prep
            y += node.weights["B"]
            return y
        if op is Op.SOFTMAX:
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
        raise NotImplementedError(f"CPU executor has no lowering for {op}")

    def layer_report(self) -> list[tuple[str, str, float, float]]:
        """(node, op, seconds, GFLOP/s) per step from the last profiled runs (2 FLOPs/MAC)."""
        rows = []
        for s in self.plan.steps:
            rows.append((s.node.name, s.node.op.name, s.secs, 0.0))
        return rows
