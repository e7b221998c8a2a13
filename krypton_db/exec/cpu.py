"""The numba JIT CPU executor for batched float32 inference.

It interprets the physical plan (``planner.physical.PhysicalPlan``: one step per node, a CONV
or ADD with its only consumer's activation fused into the GEMM epilogue while the output tile
is still in cache) and prepares each layer's weights once (``prepare_weights``). Convolutions run on ``gemm_cpu``'s tap GEMM
(``conv_cnhw``: 1x1 stride-1 as a plain GEMM on the input itself, 3x3 stride-1 as Winograd
F(4x4, 3x3) / F(2x2, 3x3), 1 x r / r x 1 as 1-D Winograd, strided ones over phase planes,
the rest shifted-window or im2col), depthwise convolutions on a direct numba kernel. A value
read only by one channel concat is written into its slice of the concat's buffer
(the plan's ``slots``, ``planner.physical.concat_slots``).

Feature maps are CNHW (see ``kernels_cpu``); vectors are [N, K]. ``run`` takes and returns
the model's own NCHW/[N, K] batches.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np

from ..graph import ACTIVATION_CODES, ACTIVATIONS, Graph, Node, Op
from ..planner import algorithms
from ..planner.physical import PhysicalPlan, PhysicalStep
from ..heap import pin_mmap_threshold, return_freed_heap
from . import transpose_cpu as TR
from . import kernels_cpu as K
from . import winograd4_cpu as W4
from . import winograd_cpu as W
from . import winograd1d_cpu as W1
from .conv_cpu import (POLYPHASE_MIN_C, ConvWeights, by_phase_planes, cols_chunk, conv1x1,
                       conv_gemm)
from .runtime import num_threads, parallel_chunks, parallel_ranges, scratch, scratch_as


# Per-thread working-set targets (float32 values) for the conv column chunks. Measured on the
# 2-core Zen target: 1-thread sgemm reaches its plateau from ~512 columns on; larger blocks only
# push the im2col block and the output block out of L2 before the GEMM / epilogue reread them.
IM2COL_BUDGET = 384 * 1024
SHIFT_BUDGET = 512 * 1024
# shifted-window (implicit GEMM) lowering only when the padded grid wastes at most this share
SHIFT_MAX_WASTE = 0.60
SHIFT_MIN_CHANNELS = 32
# Small maps (ResNet's 14x14 / 7x7, Inception's 17x17 / 8x8): the padded grid of the shifted
# lowering computes and drops (H+p)(W+p) - HW of every image's columns (31% at 7x7). Past this
# waste, and with at least 256 columns per output row (Wo * N), the conv runs in the batch-
# innermost CHWB layout instead (patch_cpu.conv_chwb: row-segment GEMMs, no dropped columns),
# paying two transposes of the (small) maps.
CHWB_MIN_WASTE = 0.15


def act_spec(node: Node | None) -> tuple[int, np.float32, np.float32]:
    """(code, a0, a1) of a fusable activation node, or the identity."""
    if node is None:
        return K.ACT_NONE, np.float32(0), np.float32(0)
    p = node.params
    a0 = {Op.CLIP: p.get("lo"), Op.LEAKY_RELU: p.get("alpha"), Op.HARD_SIGMOID: p.get("alpha")}
    a1 = {Op.CLIP: p.get("hi"), Op.HARD_SIGMOID: p.get("beta")}
    return ACTIVATION_CODES[node.op], np.float32(a0.get(node.op) or 0.0), np.float32(a1.get(node.op) or 0.0)


# -- convolution ---------------------------------------------------------------------------------


def conv_cnhw(x: np.ndarray, node: Node, cw: ConvWeights, act=(0, np.float32(0), np.float32(0)),
              pads=None, out: np.ndarray | None = None) -> np.ndarray:
    """Convolution of a CNHW batch; ``pads`` overrides the node's padding (incremental plans
    run on read-in contexts with padding 0).

    Lowerings (all with the bias + activation fused into the per-chunk epilogue):
    depthwise -> direct kernel; 1x1 stride 1 -> GEMM on the input itself; stride-1 convs on
    maps large enough that the padded grid adds little -> shifted-window implicit GEMM (kh*kw
    GEMMs with K = C over column offsets of a zero-padded copy of the chunk, no im2col);
    everything else -> chunked im2col + GEMM."""
    p = node.params
    x = np.ascontiguousarray(x, np.float32)
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
        parallel_ranges(c * n, lambda lo, hi: K.depthwise_conv_cpu(
            x, cw.w4, cw.bias, sh, sw, dh, dw, t, l, code, a0, a1, lo, hi, out), 4)
        return out
    cg = c // g
    og = o // g
    ncols = n * ho * wo
    out2 = out.reshape(o, ncols)
    with K.single_threaded_blas():
        if kh == kw == 1 and sh == sw == 1 and t == l == b == r == 0:
            conv1x1(x.reshape(c, ncols), cw, g, act, out2)
            return out
        if W.eligible(p, c, g, (ho, wo)):
            _conv_winograd(x, p, cw, act, (t, l), ho, wo, out)
            return out
        if W1.eligible(p, c, g, (ho, wo)):
            _conv_winograd1d(x, p, cw, act, (t, l), ho, wo, out)
            return out
        if by_phase_planes(p) and c >= POLYPHASE_MIN_C:
            _conv_polyphase(x, cw, act, (t, l), kh, kw, sh, sw, ho, wo, out)
            return out
        hs, wp = h + max(t, b), w + max(l, r)
        if (g == 1 and sh == sw == 1 and kh * kw > 1 and K.HAVE_BLAS and c >= SHIFT_MIN_CHANNELS
                and wo * n >= 256 and n * hs * wp > (1 + CHWB_MIN_WASTE) * ncols):
            _conv_via_chwb(x, node, cw, act, (t, l), ho, wo, out)
            return out
        if (sh == sw == 1 and kh * kw > 1 and K.HAVE_BLAS and cg >= SHIFT_MIN_CHANNELS
                and ho <= hs and wo <= wp and n * hs * wp <= (1 + SHIFT_MAX_WASTE) * ncols):
            _conv_shifted(x, cw, g, cg, og, kh, kw, dh, dw, t, l, hs, wp, ho, wo, act, out)
            return out
        rows = cg * kh * kw
        qc = cols_chunk(ncols, rows + og, IM2COL_BUDGET)

        def one(ci):
            j0 = ci * qc
            j1 = min(j0 + qc, ncols)
            cols = scratch("work", rows * qc).reshape(rows, qc)
            for gi in range(g):
                K.im2col_chunk_cpu(x, gi * cg, cg, kh, kw, sh, sw, dh, dw, t, l, ho, wo, j0, j1, cols)
                ys = out2[gi * og : (gi + 1) * og, j0:j1]
                conv_gemm(cw, gi, cols, (0,), 0, j1 - j0, ys, act=act)

        parallel_chunks(-(-ncols // qc), one)
    return out


def _conv_via_chwb(x, node, cw, act, tl, ho, wo, out):
    """Stride-1 conv of a CNHW batch through the CHWB patch kernels: x is transposed into its
    zero-padded read-in [C, hR, wR, N] (one per thread's channels), convolved there with the
    row-segment GEMMs, and transposed back into ``out`` [O, N, Ho, Wo]."""
    from . import patch_cpu as P

    c, n, h, w = x.shape
    kh, kw = node.params["kernel"]
    dh, dw = node.params["dilation"]
    hr, wr = ho + dh * (kh - 1), wo + dw * (kw - 1)
    o = out.shape[0]
    buf = scratch_as("dense_in", (c, hr, wr, n))
    parallel_ranges(c, lambda lo, hi: TR.cnhw_to_chwb_cpu(x, 0, h, tl[0], tl[1], buf, lo, hi))
    y = P.conv_chwb(buf, node, cw, act, (ho, wo), alloc=lambda shape: scratch_as("dense_out", shape))
    parallel_ranges(o, lambda lo, hi: TR.chwb_to_cnhw_cpu(y, out, 0, lo, hi))


WINO_BAND_FLOATS = 1 << 21  # CHWB input band per step of the dense Winograd path (8 MiB)


def _conv_winograd(x, p, cw, act, tl, ho, wo, out):
    """3x3 stride-1 conv of a CNHW batch by Winograd F(4x4, 3x3) or F(2x2, 3x3)
    (``ConvWeights.winograd3x3``) on CHWB bands: output rows [oy0, oy1) need input rows
    [oy0 - t, oy1 + 2 - t) (zero outside), transposed into a zero-padded band
    [C, oy1 - oy0 + 2, wo + 2, N]; the band's output [O, rows, wo, N] is transposed back into
    ``out``. Bands bound the scratch at any map size (a row count that is a multiple of the
    tile's, so Winograd's tiles never straddle two bands)."""
    c, n, h, w = x.shape
    o = out.shape[0]
    t, l = tl
    wr = wo + 2
    kern, filters = cw.winograd3x3(p, c, (ho, wo))
    tr = 4 if kern is W4 else 2
    rows = max(tr, min(-(-ho // tr) * tr, WINO_BAND_FLOATS // max(c * wr * n, 1) // tr * tr))
    for oy0 in range(0, ho, rows):
        oy1 = min(oy0 + rows, ho)
        ylo, yhi = max(oy0 - t, 0), min(oy1 + 2 - t, h)
        hr = oy1 - oy0 + 2
        buf = scratch_as("dense_in", (c, hr, wr, n))
        pt = ylo - (oy0 - t)
        parallel_ranges(c, lambda lo, hi: TR.cnhw_to_chwb_cpu(x, ylo, yhi, pt, l, buf, lo, hi))
        y = scratch_as("dense_out", (o, oy1 - oy0, wo, n))
        kern.conv(buf, filters, cw.bias, act, y)
        parallel_ranges(o, lambda lo, hi: TR.chwb_to_cnhw_cpu(y, out, oy0, lo, hi))


def _conv_winograd1d(x, p, cw, act, tl, ho, wo, out):
    """r x 1 or 1 x r stride-1 conv of a CNHW batch by 1-D Winograd (``winograd1d_cpu``): x
    is transposed into a zero-framed buffer with the filter's axis outermost -- CHWB
    [C, ho + r - 1, wo, N] for r x 1, [C, wo + r - 1, ho, N] for 1 x r -- convolved there, and
    the [O, ho, wo, N] / [O, wo, ho, N] result transposed back into ``out``."""
    c, n, h, w = x.shape
    o = out.shape[0]
    t, l = tl
    kh, kw = p["kernel"]
    rows = W1.filter_axis(p) == 0
    if rows:
        shape, oshape = (c, ho + kh - 1, wo, n), (o, ho, wo, n)
    else:
        shape, oshape = (c, wo + kw - 1, ho, n), (o, wo, ho, n)
    buf = scratch_as("dense_in", shape)
    y = scratch_as("dense_out", oshape)
    if rows:
        parallel_ranges(c, lambda lo, hi: TR.cnhw_to_chwb_cpu(x, 0, h, t, l, buf, lo, hi))
    else:
        parallel_ranges(c, lambda lo, hi: TR.cnhw_to_cwhb_cpu(x, t, l, buf, lo, hi))
    W1.conv(buf, cw.winograd1d(), cw.bias, act, y)
    if rows:
        parallel_ranges(o, lambda lo, hi: TR.chwb_to_cnhw_cpu(y, out, 0, lo, hi))
    else:
        parallel_ranges(o, lambda lo, hi: TR.cwhb_to_cnhw_cpu(y, out, lo, hi))


def _conv_polyphase(x, cw, act, tl, kh, kw, sh, sw, ho, wo, out):
    """Strided conv of a CNHW batch over the input's phase planes (``planner.algorithms.polyphase_taps``):
    per band of output rows, the band's planes [C, phases, hp, wp, N] are built (zero padding
    included), each output row is one tap GEMM into a CHWB scratch [O, rows, wo, N], transposed
    back into ``out``. Bands bound the scratch as in ``_conv_winograd`` (ResNet18's
    layer4.0.conv1 at batch 64: 16 MB of planes in one piece)."""
    from . import patch_cpu as P

    c, n = x.shape[:2]
    o = out.shape[0]
    t, l = tl
    used, _, wp = algorithms.phase_planes(kh, kw, sh, sw, 1, wo)
    per_row = c * len(used) * wp * n
    rows = max(1, min(ho, WINO_BAND_FLOATS // max(per_row, 1) - (kh - 1) // sh))
    nb = -(-ho // rows)
    rows = -(-ho // nb)  # even bands: 7 rows are 4 + 3, not 6 + 1
    for oy0 in range(0, ho, rows):
        oy1 = min(oy0 + rows, ho)
        phases, offs, hp, wp = algorithms.polyphase_taps(kh, kw, sh, sw, oy1 - oy0, wo, n)
        planes = scratch_as("dense_in", (c, len(phases), hp, wp, n))
        pt = t - oy0 * sh  # the band's first plane row is input row oy0 * sh + p - t
        parallel_ranges(c, lambda lo, hi: K.polyphase_cnhw_cpu(x, pt, l, sh, sw, phases, planes, lo, hi))
        y = scratch_as("dense_out", (o, oy1 - oy0, wo, n))
        P.conv_rows(planes.reshape(c, -1), cw, offs, oy1 - oy0, wo, wp, n, act, y.reshape(o, -1))
        parallel_ranges(o, lambda lo, hi: TR.chwb_to_cnhw_cpu(y, out, oy0, lo, hi))


def _conv_shifted(x, cw, g, cg, og, kh, kw, dh, dw, t, l, hs, wp, ho, wo, act, out):
    """Stride-1 conv as kh*kw accumulated GEMMs over shifted column windows.

    The input is laid out (chunk by chunk, per thread) on a zero-padded grid [N, hs, wp] whose
    rows / images share their padding (hs = H + max(t, b), wp = W + max(l, r)): then the input
    of tap (i, j) for output grid position q is grid position q + i*dh*wp + j*dw, so tap (i, j)
    contributes W[:, :, i, j] @ grid[:, q0 + off : q1 + off] -- one plain GEMM on a column
    window, no 9x im2col copy. Grid positions outside [0, Ho) x [0, Wo) are computed and
    dropped by the epilogue (the ``SHIFT_MAX_WASTE`` bound)."""
    code, a0, a1 = act
    n = x.shape[1]
    grid = n * hs * wp
    maxoff = (kh - 1) * dh * wp + (kw - 1) * dw
    qc = cols_chunk(grid, cg + og, SHIFT_BUDGET)
    ld = qc + maxoff
    offs = np.array([i * dh * wp + j * dw for i in range(kh) for j in range(kw)], np.int64)
    bias = cw.bias

    def one(ci):
        q0 = ci * qc
        q1 = min(q0 + qc, grid)
        m = q1 - q0
        buf = scratch("work", cg * ld).reshape(cg, ld)
        s = scratch("acc", og * qc).reshape(og, qc)[:, :m]
        for gi in range(g):
            K.padgrid_chunk_cpu(x, gi * cg, cg, t, l, hs, wp, q0, q1 + maxoff, buf)
            conv_gemm(cw, gi, buf, offs, 0, m, s)
            K.shift_epilogue_cpu(s, gi * og, q0, q1, hs, wp, ho, wo, bias, code, a0, a1, out)

    parallel_chunks(-(-grid // qc), one)


def avgpool_inverse_counts(hw, kernel, pads, out_hw, include_pad: bool) -> np.ndarray:
    """1 / (the cells average pooling divides by) per output cell, flat [Ho * Wo] float32, for
    stride 1: the patch route's separable per-axis divisors (``patch_cpu.avg_divisors_cpu``)
    for one read-in context whose origin is the padded map's corner."""
    from . import patch_cpu as P

    (h, w), (kh, kw), (t, l, b, r) = hw, kernel, pads
    origin = np.array([[-t, -l]], np.int64)
    iy = P.avg_divisors_cpu(origin, 0, out_hw[0], 1, kh, h, t, b, include_pad)[:, 0]
    ix = P.avg_divisors_cpu(origin, 1, out_hw[1], 1, kw, w, l, r, include_pad)[:, 0]
    return np.ascontiguousarray(np.outer(iy, ix).reshape(-1), np.float32)


def pool_cnhw(x: np.ndarray, node: Node, pads=None, out_hw=None, out: np.ndarray | None = None) -> np.ndarray:
    p = node.params
    x = np.ascontiguousarray(x, np.float32)
    c, n, _, _ = x.shape
    ho, wo = out_hw if out_hw is not None else node.shape[1:]
    t, l, b, r = pads if pads is not None else p["pads"]
    if out is None:
        out = np.empty((c, n, ho, wo), np.float32)
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    is_max = node.op is Op.MAXPOOL
    inc = bool(p.get("count_include_pad", False))
    if not is_max and sh == sw == 1 and ho + kh - 1 <= x.shape[2] + t + b and wo + kw - 1 <= x.shape[3] + l + r:
        inv = avgpool_inverse_counts(x.shape[2:], (kh, kw), (t, l, b, r), (ho, wo), inc)
        parallel_ranges(c * n, lambda lo, hi: K.avgpool_s1_cnhw_cpu(x, kh, kw, t, l, inv, lo, hi, out), 4)
        return out
    if (is_max and (sh > 1 or sw > 1) and t == l == b == r == 0 and wo < CHWB_POOL_MAX_WO and n >= 16
            and (ho - 1) * sh + kh <= x.shape[2] and (wo - 1) * sw + kw <= x.shape[3]):  # (not ceil mode's)
        _maxpool_via_chwb(x, node, out)
        return out
    parallel_ranges(c * n, lambda lo, hi: K.pool_cnhw_cpu(x, kh, kw, sh, sw, t, l, b, r, is_max, inc,
                                                           lo, hi, out), 4)
    return out


# A strided max pool on a small map (Inception3's Mixed_7a.max_pool: 17x17 -> 8x8) runs per
# [H, W] plane as a few 8-wide strided rows: 10 ms per batch of 48 at 768 channels. Through
# the batch-innermost layout it is two transposes and 16-query vector maxima: ~3x faster.
CHWB_POOL_MAX_WO = 16


def _maxpool_via_chwb(x, node, out):
    from . import patch_cpu as P

    c, n, h, w = x.shape
    buf = scratch_as("dense_in", (c, h, w, n))
    parallel_ranges(c, lambda lo, hi: TR.cnhw_to_chwb_cpu(x, 0, h, 0, 0, buf, lo, hi))
    y = P.maxpool_chwb(buf, node, out.shape[2:], alloc=lambda shape: scratch_as("dense_out", shape))
    parallel_ranges(c, lambda lo, hi: TR.chwb_to_cnhw_cpu(y, out, 0, lo, hi))


def pointwise_any(x: np.ndarray, node: Node, out: np.ndarray | None = None) -> np.ndarray:
    """A pointwise node on a CNHW feature map or an [N, K] vector batch."""
    x = np.ascontiguousarray(x, np.float32)
    if out is None:
        out = np.empty_like(x)
    if node.op is Op.AFFINE:
        s = np.ascontiguousarray(node.weights["scale"], np.float32)
        sh = np.ascontiguousarray(node.weights["shift"], np.float32)
        if x.ndim == 4:
            x2 = x.reshape(x.shape[0], -1)
            o2 = out.reshape(x.shape[0], -1)
            parallel_ranges(x.shape[0], lambda lo, hi: K.affine_rows_cpu(x2, s, sh, o2, lo, hi),
                            max(1, 65536 // max(x2.shape[1], 1)))
        else:
            np.add(x * s, sh, out=out)
        return out
    code, a0, a1 = act_spec(node)
    xf = x.reshape(-1)
    of = out.reshape(-1)
    parallel_ranges(xf.size, lambda lo, hi: K.act_range_cpu(xf, of, code, a0, a1, lo, hi), 65536)
    return out


def dense(x: np.ndarray, wt: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[N, K_in] @ W.T[K_in, K_out] + B, output columns split over the threads."""
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    ko = wt.shape[1]
    y = np.empty((n, ko), np.float32)
    y[:] = bias
    step = max(64, -(-ko // num_threads()))
    with K.single_threaded_blas():
        parallel_chunks(-(-ko // step), lambda i: K.gemm(x, wt[:, i * step : (i + 1) * step],
                                                         y[:, i * step : (i + 1) * step], 1.0))
    return y


def prepare_weights(node: Node):
    """What the CPU operator of ``node`` reads its weights as: ``ConvWeights`` of a conv, the
    transposed [K, O] matrix of a fully connected layer, else None."""
    if node.op is Op.CONV:
        return ConvWeights.of(node)
    if node.op is Op.GEMM:
        return np.ascontiguousarray(node.weights["W"].T, np.float32)
    return None


def _to_internal(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3)) if x.ndim == 4 else x


def to_external(x: np.ndarray) -> np.ndarray:
    """Batch-first copy (always a new array: internal buffers are reused between runs)."""
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

    def __init__(self, graph: Graph, fuse: bool = True):
        pin_mmap_threshold()  # freed batch buffers back to the OS (krypton_db.heap)
        self.graph = graph
        self.plan = PhysicalPlan.lower(graph, fuse)
        # weights prepared once per layout: conv GEMM matrices / FC weights transposed
        self.prep: dict[str, object] = {st.node.name: prepare_weights(st.node)
                                        for st in self.plan.steps}
        self.jit_seconds: float | None = None
        self._arena = _Arena()
        self._run_lock = threading.Lock()
        self._inc_arena = None  # the incremental executor's batch arena between runs
        self._inc_lock = threading.Lock()
        self.view_memo: dict | None = None  # materialized views shared in ``shared_views``

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
        full inference again. Outside the scope nothing is kept (a run's views go with it), so
        repeated explanations of an image each materialize their own, as measured."""
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
        """Drop the buffers kept between runs (dense and incremental arenas)."""
        with self._inc_lock:
            self._inc_arena = None
        self._arena.clear()
        return_freed_heap()

    def warmup(self) -> float:
        """Compile (or load from the numba cache) every kernel this plan uses; returns seconds."""
        t = time.perf_counter()
        x = np.zeros((1,) + self.graph.input_shape, np.float32)
        self.run(x)
        self._arena.clear()
        return_freed_heap()  # LLVM's compile / cache-load temporaries
        self.jit_seconds = time.perf_counter() - t
        return self.jit_seconds

    def run(self, batch: np.ndarray, outputs: list[str] | None = None, profile: bool = False,
            step_secs: dict[str, float] | None = None) -> dict:
        """Run on an NCHW float32 batch; returns {node name: batch-first output}.
        ``profile``: accumulate per-step seconds into the plan's ``PhysicalStep.secs``; ``step_secs``:
        accumulate them into this dict instead (keyed by node name; the caller's own)."""
        with self._run_lock, K.single_threaded_blas():
            return self._run(batch, outputs, profile, step_secs)

    def _run(self, batch, outputs, profile, step_secs=None) -> dict:
        want = set(outputs or [self.graph.output])
        g = self.graph
        vals: dict[str, np.ndarray] = {g.input.name: _to_internal(np.asarray(batch, np.float32))}
        result = {}
        if g.input.name in want:
            result[g.input.name] = np.asarray(batch, np.float32)
        last_use = self.last_use()
        ledger = BufferLedger(self._arena, self.plan)
        for idx, step in enumerate(self.plan.steps):
            t0 = time.perf_counter() if profile or step_secs is not None else 0.0
            name = self.plan.out_name(step)
            y = self.exec_step(step, [vals[i] for i in step.node.inputs], alloc=ledger.out_alloc(name))
            if profile:
                step.secs += time.perf_counter() - t0
            if step_secs is not None:
                n = step.node.name
                step_secs[n] = step_secs.get(n, 0.0) + time.perf_counter() - t0
            vals[name] = y
            ledger.adopt(name, y)
            if step.fused is not None and step.node.name in want:
                raise ValueError(f"{step.node.name} is fused away; lower with fuse=False to read it")
            if name in want:
                result[name] = to_external(y)
            for i in step.node.inputs:
                if last_use.get(i) == idx and i not in want:
                    vals.pop(i, None)
                    ledger.release(i, vals.values())
        for name in list(ledger.owned):
            ledger.release(name, result.values())
        return result

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
            out = alloc((node.weights["W"].shape[0], x.shape[1]) + _conv_hw(x, node)) if alloc else None
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
                parallel_ranges(a.size, lambda lo, hi: K.add_act_range_cpu(a, b, of, *act, lo, hi), 65536)
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
            K.lrn_cnhw_cpu(np.ascontiguousarray(x), p["size"], np.float32(p["alpha"]), np.float32(p["beta"]),
                           np.float32(p["bias"]), out)
            return out
        if op is Op.PAD:
            t, l, b, r = node.params["pads"]
            return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)), constant_values=node.params["value"])
        if op is Op.RESHAPE:
            ext = to_external(x)
            y = ext.reshape((ext.shape[0],) + tuple(node.shape))
            return _to_internal(y)
        if op is Op.TRANSPOSE:
            ext = to_external(x)
            y = np.transpose(ext, (0,) + tuple(a + 1 for a in node.params["perm"]))
            return _to_internal(np.ascontiguousarray(y))
        if op is Op.GEMM:
            return dense(x, self.prep[node.name], np.asarray(node.weights["B"], np.float32))
        if op is Op.SOFTMAX:
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
        raise NotImplementedError(f"CPU executor has no lowering for {op}")

    def layer_report(self) -> list[tuple[str, str, float, float]]:
        """(node, op, seconds, GFLOP/s) per step from the last profiled runs (2 FLOPs/MAC),
        the rate assuming the profiled runs together processed ``batch_seen`` samples."""
        rows = []
        for s in self.plan.steps:
            rows.append((s.node.name, s.node.op.name, s.secs, 0.0))
        return rows


def _conv_hw(x: np.ndarray, node: Node) -> tuple[int, int]:
    p = node.params
    _, _, h, w = x.shape
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    dh, dw = p["dilation"]
    t, l, b, r = p["pads"]
    return (h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + l + r - dw * (kw - 1) - 1) // sw + 1
