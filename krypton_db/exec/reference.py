"""The numpy reference executor: the definition of layer semantics.

Slow and obvious on purpose: every fast path (numba CPU, numba.cuda GPU, DuckDB SQL views,
incremental plans) is tested against these functions. Batches are NCHW float32; computation
is done in float64 where it costs nothing in clarity, so the reference is the more exact side
of every comparison.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph, Node, Op


def conv2d(x, w, b, stride, pads, dilation=(1, 1), groups=1):
    """Direct convolution: sum over kernel offsets of shifted input slices times weights."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    t, l, bo, r = pads
    sh, sw = stride
    dh, dw = dilation
    xp = np.zeros((n, c, h + t + bo, wd + l + r), np.float64)
    xp[:, :, t : t + h, l : l + wd] = x
    ho = (h + t + bo - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + l + r - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo), np.float64)
    og = o // groups
    for g in range(groups):
        xs = xp[:, g * cg : (g + 1) * cg]
        ws = w[g * og : (g + 1) * og].astype(np.float64)
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                           j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    out += np.asarray(b, np.float64).reshape(1, -1, 1, 1)
    return out


def _pool_windows(x, kernel, stride, pads, out_hw, fill):
    """Yield (i, j, window-slice) over kernel offsets on an input padded with ``fill``."""
    n, c, h, w = x.shape
    t, l, _, _ = pads
    kh, kw = kernel
    sh, sw = stride
    ho, wo = out_hw
    # pad generously: ceil mode may read past the declared bottom/right padding
    ph = max((ho - 1) * sh + kh - h - t, 0)
    pw = max((wo - 1) * sw + kw - w - l, 0)
    xp = np.full((n, c, t + h + ph, l + w + pw), fill, np.float64)
    xp[:, :, t : t + h, l : l + w] = x
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]


def maxpool2d(x, kernel, stride, pads, out_hw):
    out = np.full(x.shape[:2] + tuple(out_hw), -np.inf)
    for _, _, win in _pool_windows(x, kernel, stride, pads, out_hw, -np.inf):
        out = np.maximum(out, win)
    return out


def avgpool2d(x, kernel, stride, pads, out_hw, count_include_pad):
    """Average pool. With count_include_pad the divisor counts declared padding cells but never
    cells beyond it (those only exist because of ceil mode), as ONNX Runtime and PyTorch do."""
    n, c, h, w = x.shape
    t, l, b, r = pads
    total = np.zeros(x.shape[:2] + tuple(out_hw))
    for _, _, win in _pool_windows(x, kernel, stride, pads, out_hw, 0.0):
        total += win
    ones = np.ones((1, 1, h, w))
    if count_include_pad:  # cells inside the declared padding count, those beyond do not
        ones = np.ones((1, 1, h + t + b, w + l + r))
        ones_pads = (0, 0, 0, 0)
        cnt = np.zeros((1, 1) + tuple(out_hw))
        for _, _, win in _pool_windows(ones, kernel, stride, ones_pads, out_hw, 0.0):
            cnt += win
    else:
        cnt = np.zeros((1, 1) + tuple(out_hw))
        for _, _, win in _pool_windows(ones, kernel, stride, pads, out_hw, 0.0):
            cnt += win
    return total / cnt


def lrn(x, size, alpha, beta, bias):
    sq = x.astype(np.float64) ** 2
    c = x.shape[1]
    acc = np.zeros_like(sq)
    lo, hi = (size - 1) // 2, size // 2  # ONNX: floor((size-1)/2) before, ceil((size-1)/2) after
    for ch in range(c):
        acc[:, ch] = sq[:, max(0, ch - lo) : min(c, ch + hi + 1)].sum(axis=1)
    return x / (bias + alpha / size * acc) ** beta


def pointwise(node: Node, x):
    p = node.params
    op = node.op
    if op is Op.RELU:
        return np.maximum(x, 0.0)
    if op is Op.CLIP:
        return np.clip(x, p["lo"], p["hi"])
    if op is Op.LEAKY_RELU:
        return np.where(x >= 0, x, x * p["alpha"])
    if op is Op.SIGMOID:
        return 1.0 / (1.0 + np.exp(-x))
    if op is Op.HARD_SIGMOID:
        return np.clip(p["alpha"] * x + p["beta"], 0.0, 1.0)
    if op is Op.HARD_SWISH:
        return x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if op is Op.ELU:
        return np.where(x >= 0, x, p["alpha"] * np.expm1(np.minimum(x, 0.0)))
    if op is Op.AFFINE:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * node.weights["scale"].reshape(shape) + node.weights["shift"].reshape(shape)
    raise ValueError(f"{op} is not pointwise")


def run_node(node: Node, ins: list[np.ndarray]) -> np.ndarray:
    """Apply one layer to batched inputs (leading batch axis)."""
    op, p, x = node.op, node.params, ins[0] if ins else None
    if op is Op.CONV:
        return conv2d(x, node.weights["W"], node.weights["B"], p["stride"], p["pads"],
                      p["dilation"], p["groups"])
    if op is Op.MAXPOOL:
        return maxpool2d(x, p["kernel"], p["stride"], p["pads"], node.shape[1:])
    if op is Op.AVGPOOL:
        return avgpool2d(x, p["kernel"], p["stride"], p["pads"], node.shape[1:],
                         p["count_include_pad"])
    if op is Op.GLOBAL_AVGPOOL:
        return x.mean(axis=(2, 3), keepdims=p.get("keepdims", True))
    if op is Op.ADD:
        return sum(ins[1:], ins[0])
    if op is Op.MUL:
        out = ins[0]
        for v in ins[1:]:
            out = out * v
        return out
    if op is Op.CONCAT:
        return np.concatenate(ins, axis=1)
    if op is Op.LRN:
        return lrn(x, p["size"], p["alpha"], p["beta"], p["bias"])
    if op is Op.PAD:
        t, l, b, r = p["pads"]
        return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=p["value"])
    if op is Op.RESHAPE:
        return x.reshape((x.shape[0],) + tuple(node.shape))
    if op is Op.TRANSPOSE:
        return np.transpose(x, (0,) + tuple(a + 1 for a in p["perm"]))
    if op is Op.GEMM:
        return x.astype(np.float64) @ node.weights["W"].T.astype(np.float64) + node.weights["B"]
    if op is Op.SOFTMAX:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return pointwise(node, x)


def run(graph: Graph, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run the whole graph on an NCHW batch; returns the requested node outputs (float64)."""
    want = set(outputs or [graph.output])
    cons = graph.consumers()
    remaining = {k: len(v) for k, v in cons.items()}
    vals: dict[str, np.ndarray] = {}
    result = {}
    for node in graph.nodes:
        if node.op is Op.INPUT:
            out = np.asarray(batch, np.float64)
        else:
            out = run_node(node, [vals[i] for i in node.inputs])
            for i in node.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i not in want:
                    del vals[i]
        expect = (batch.shape[0],) + tuple(node.shape)
        if out.shape != expect:
            raise AssertionError(f"{node.name}: produced {out.shape}, graph says {expect}")
        vals[node.name] = out
        if node.name in want:
            result[node.name] = out
    return result
