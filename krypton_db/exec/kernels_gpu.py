"""numba.cuda kernels (``<op>_<variant>_gpu``) of the GPU executors, CNHW layout.

Same layout and semantics as ``kernels_cpu`` (the executors share one
plan): feature maps are ``[C, N, H, W]``, vectors ``[N, K]``, float32. Every kernel is a
*grid-stride* loop over its output elements (or output tiles), so any launch size is correct:
on a GPU the launcher sizes the grid to the work; under the numba CUDA simulator (one Python
thread per CUDA thread) it launches a handful of threads that loop over everything.

This module imports ``numba.cuda``; the executor (``gpu.py``) imports it only after checking
that a GPU (or the simulator) is there.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

# activation codes shared with kernels_cpu (fused epilogue and standalone pointwise; graph.OPS)
from ..graph import (ACT_CLIP, ACT_ELU, ACT_HSIGMOID, ACT_HSWISH, ACT_LEAKY,  # noqa: E402
                     ACT_RELU, ACT_SIGMOID)

F0 = np.float32(0.0)
F1 = np.float32(1.0)
F6 = np.float32(6.0)
FHALF = np.float32(0.5)
NEG_INF = np.float32(-np.inf)


def is_simulator() -> bool:
    """True when ``numba.cuda`` was imported in simulator mode (NUMBA_ENABLE_CUDASIM=1)."""
    return "simulator" in cuda.to_device.__module__


SIM = is_simulator()


def _fix_simulator_shared_race() -> None:
    """The simulator's ``cuda.shared.array`` finds a block's array with an unlocked
    check-then-insert on a dict (numba-cuda 0.30), so two threads of a block can each create
    their own "shared" array and a tiled kernel then reads tiles another thread never wrote
    (seen as rare wrong tiles in the tests). Same lookup (call site file + line), under a
    lock. Simulator only; idempotent."""
    import sys
    import threading

    from numba.cuda.simulator import kernelapi

    cls = kernelapi.FakeCUDAShared
    if getattr(cls, "_krypton_locked", False):
        return
    orig = cls.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported: as is
            return orig(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        f = sys._getframe(1)
        caller = (f.f_code.co_filename, f.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    cls.array = array
    cls._krypton_locked = True


if SIM:
    _fix_simulator_shared_race()
# simulator: few threads (each is a Python thread, ~0.5 ms to start), tiny tiles; GPU: 256
# threads per block, 16 x 16 tiles
THREADS = 8 if SIM else 256
MAX_BLOCKS = 2 if SIM else 65535
TILE = 4 if SIM else 16


def launch1(n: int) -> tuple[int, int]:
    """(blocks, threads) of a 1-D grid-stride launch over ``n`` items."""
    return max(1, min(MAX_BLOCKS, -(-int(n) // THREADS))), THREADS


def launch_tiles(ntiles: int) -> tuple[int, tuple[int, int]]:
    """(blocks, (TILE, TILE)) of a tiled launch; blocks loop over the tiles."""
    return max(1, min(MAX_BLOCKS, int(ntiles))), (TILE, TILE)


# -- activation epilogue ----------------------------------------------------------------------


@cuda.jit(device=True)
def _act(v, code, a0, a1):
    if code == ACT_RELU:
        return v if v > F0 else F0  # noqa: FURB136 - same NaN handling as kernels_cpu
    if code == ACT_CLIP:
        return min(max(v, a0), a1)
    if code == ACT_LEAKY:
        return v if v >= F0 else v * a0
    if code == ACT_SIGMOID:
        return F1 / (F1 + math.exp(-v))
    if code == ACT_HSIGMOID:
        return min(max(a0 * v + a1, F0), F1)
    if code == ACT_HSWISH:
        return v * min(max(v / F6 + FHALF, F0), F1)
    if code == ACT_ELU:
        return v if v >= F0 else a0 * math.expm1(v)
    return v


# -- incremental (IVM) kernels -------------------------------------------------------------------


@cuda.jit
def gather_patch_gpu(view, patch, ploc, rloc, fill, out):
    """out[c, q] = read-in context of query q: rows rloc[q,0] + r, cols rloc[q,1] + s of the
    materialized view[c] (H x W) with the query's patch (patch[c, q] at ploc[q]) applied and
    ``fill`` outside the tensor (0 conv/avg, -inf max). One launch for the whole batch."""
    c_, h, w = view.shape
    q_, hr, wr = out.shape[1], out.shape[2], out.shape[3]
    ph, pw = patch.shape[2], patch.shape[3]
    total = c_ * q_ * hr * wr
    for k in range(cuda.grid(1), total, cuda.gridsize(1)):
        s = k % wr
        t = k // wr
        r = t % hr
        t = t // hr
        q = t % q_
        c = t // q_
        y = rloc[q, 0] + r
        x = rloc[q, 1] + s
        if y < 0 or y >= h or x < 0 or x >= w:
            out[c, q, r, s] = fill
        else:
            py = y - ploc[q, 0]
            px = x - ploc[q, 1]
            if py >= 0 and py < ph and px >= 0 and px < pw:
                out[c, q, r, s] = patch[c, q, py, px]
            else:
                out[c, q, r, s] = view[c, y, x]


@cuda.jit
def stitch_patch_gpu(view, patch, ploc, out):
    """out[c, q] = view[c] with patch[c, q] written at ploc[q] (full tensor per query)."""
    c_, h, w = view.shape
    q_ = out.shape[1]
    ph, pw = patch.shape[2], patch.shape[3]
    total = c_ * q_ * h * w
    for k in range(cuda.grid(1), total, cuda.gridsize(1)):
        x = k % w
        t = k // w
        y = t % h
        t = t // h
        q = t % q_
        c = t // q_
        py = y - ploc[q, 0]
        px = x - ploc[q, 1]
        if py >= 0 and py < ph and px >= 0 and px < pw:
            out[c, q, y, x] = patch[c, q, py, px]
        else:
            out[c, q, y, x] = view[c, y, x]


@cuda.jit
def avgpool_patch_gpu(buf, rloc, h, w, kh, kw, sh, sw, pt, pl, pb, pr, include_pad, out):
    """Average pool over read-in contexts (origin rloc[q] in input coordinates): zero-filled
    cells outside the input add nothing; the divisor uses absolute coordinates exactly as the
    full kernel does (count_include_pad counts declared padding, never beyond)."""
    c_, q_ = buf.shape[0], buf.shape[1]
    ho, wo = out.shape[2], out.shape[3]
    total = c_ * q_ * ho * wo
    for k in range(cuda.grid(1), total, cuda.gridsize(1)):
        ox = k % wo
        t = k // wo
        oy = t % ho
        t = t // ho
        q = t % q_
        c = t // q_
        s = F0
        for i in range(kh):
            for j in range(kw):
                s += buf[c, q, oy * sh + i, ox * sw + j]
        ys = rloc[q, 0] + oy * sh
        xs = rloc[q, 1] + ox * sw
        if include_pad:
            cnt = (min(ys + kh, h + pb) - max(ys, -pt)) * (min(xs + kw, w + pr) - max(xs, -pl))
        else:
            cnt = (min(ys + kh, h) - max(ys, 0)) * (min(xs + kw, w) - max(xs, 0))
        out[c, q, oy, ox] = s / np.float32(cnt)


@cuda.jit
def repeat_batch_gpu(view, out):
    """out[c, n] = view[c, 0] for every n (an unchanged view broadcast over the batch)."""
    c_, n_, h, w = out.shape
    total = c_ * n_ * h * w
    for k in range(cuda.grid(1), total, cuda.gridsize(1)):
        x = k % w
        t = k // w
        y = t % h
        t = t // h
        c = t // n_
        out[c, t % n_, y, x] = view[c, 0, y, x]


# -- convolution / dense -----------------------------------------------------------------------


@cuda.jit
def conv_direct_gpu(x, w, b, sh, sw, dh, dw, pt, pl, groups, code, a0, a1, out):
    """Direct convolution, one output element per thread iteration: stride, dilation, groups,
    zero padding (pt, pl leading; trailing padding is implied by the output size) and the
    fused bias + activation epilogue. Used for depthwise convs (kh*kw MACs per output, no
    reuse worth tiling) and as the simplest oracle-checked path."""
    o_, n_, ho, wo = out.shape
    h, wd = x.shape[2], x.shape[3]
    cg, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    og = o_ // groups
    total = o_ * n_ * ho * wo
    for k in range(cuda.grid(1), total, cuda.gridsize(1)):
        ox = k % wo
        t = k // wo
        oy = t % ho
        t = t // ho
        n = t % n_
        o = t // n_
        c0 = (o // og) * cg
        acc = F0
        for c in range(cg):
            for i in range(kh):
                iy = oy * sh + i * dh - pt
                if iy < 0 or iy >= h:
                    continue
                for j in range(kw):
                    ix = ox * sw + j * dw - pl
                    if ix >= 0 and ix < wd:
                        acc += x[c0 + c, n, iy, ix] * w[o, c, i, j]
        out[o, n, oy, ox] = _act(acc + b[o], code, a0, a1)


def _make_matmul(T: int):
    @cuda.jit
    def matmul_tiled_gpu(a, b, c, bias, bias_rows, code, a0, a1):
        """c[M, N] = act(a[M, K] @ b[K, N] + bias) with T x T shared-memory tiles; bias per
        row (1x1 conv: W[O, C] @ x[C, N*H*W]) or per column (fully connected: x @ W.T).
        Blocks loop over the output tiles (grid-stride over tiles)."""
        sa = cuda.shared.array((T, T), np.float32)
        sb = cuda.shared.array((T, T), np.float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        m_, k_ = a.shape
        n_ = b.shape[1]
        tn = (n_ + T - 1) // T
        ntiles = ((m_ + T - 1) // T) * tn
        for tile in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            row = (tile // tn) * T + ty
            col = (tile % tn) * T + tx
            acc = F0
            for k0 in range(0, k_, T):
                ka = k0 + tx
                kb = k0 + ty
                sa[ty, tx] = a[row, ka] if row < m_ and ka < k_ else F0
                sb[ty, tx] = b[kb, col] if kb < k_ and col < n_ else F0
                cuda.syncthreads()
                for kk in range(T):
                    acc += sa[ty, kk] * sb[kk, tx]
                cuda.syncthreads()
            if row < m_ and col < n_:
                bo = bias[row] if bias_rows else bias[col]
                c[row, col] = _act(acc + bo, code, a0, a1)

    return matmul_tiled_gpu


def _make_conv_gemm(T: int):
    @cuda.jit
    def conv_gemm_gpu(x, w2, bias, kh, kw, sh, sw, dh, dw, pt, pl, groups, code, a0, a1, out):
        """Convolution as an implicit GEMM per group: out[g*og + m, (n, oy, ox)] =
        act(sum_r w2[g*og + m, r] * cols[r, (n, oy, ox)] + bias), r = (c, i, j), where the
        im2col matrix ``cols`` is never stored: each T x T tile of it is computed from x
        while it is loaded into shared memory (zero outside the input). The output [O, N,
        Ho, Wo] (CNHW) is the GEMM's [O, N*Ho*Wo] result as is."""
        sa = cuda.shared.array((T, T), np.float32)
        sb = cuda.shared.array((T, T), np.float32)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        o_, n_, ho, wo = out.shape
        h, wd = x.shape[2], x.shape[3]
        og = o_ // groups
        kk_ = w2.shape[1]  # cg * kh * kw
        cg = kk_ // (kh * kw)
        ncols = n_ * ho * wo
        tn = (ncols + T - 1) // T
        tm = (og + T - 1) // T
        ntiles = groups * tm * tn
        for tile in range(cuda.blockIdx.x, ntiles, cuda.gridDim.x):
            g = tile // (tm * tn)
            rest = tile - g * tm * tn
            m = (rest // tn) * T + ty  # row within the group
            col = (rest % tn) * T + tx
            row = g * og + m
            # this thread's column (n, oy, ox) is fixed for the tile: decompose once
            ox = col % wo
            t = col // wo
            oy = t % ho
            n = t // ho
            acc = F0
            for k0 in range(0, kk_, T):
                ka = k0 + tx
                sa[ty, tx] = w2[row, ka] if m < og and ka < kk_ else F0
                r = k0 + ty
                v = F0
                if r < kk_ and col < ncols:
                    c = r // (kh * kw)
                    ij = r - c * (kh * kw)
                    i = ij // kw
                    j = ij - i * kw
                    iy = oy * sh + i * dh - pt
                    ix = ox * sw + j * dw - pl
                    if iy >= 0 and iy < h and ix >= 0 and ix < wd:
                        v = x[g * cg + c, n, iy, ix]
                sb[ty, tx] = v
                cuda.syncthreads()
                for q in range(T):
                    acc += sa[ty, q] * sb[q, tx]
                cuda.syncthreads()
            if m < og and col < ncols:
                out[row, n, oy, ox] = _act(acc + bias[row], code, a0, a1)

    return conv_gemm_gpu


matmul_tiled_gpu = _make_matmul(TILE)
conv_gemm_gpu = _make_conv_gemm(TILE)


@cuda.jit
def bias_act_rows_gpu(y, bias, bias_rows, code, a0, a1):
    """In place: y[r, s] = act(y[r, s] + bias[r or s]) (epilogue after a cuBLAS product)."""
    m_, n_ = y.shape
    for k in range(cuda.grid(1), m_ * n_, cuda.gridsize(1)):
        r = k // n_
        s = k - r * n_
        bo = bias[r] if bias_rows else bias[s]
        y[r, s] = _act(y[r, s] + bo, code, a0, a1)


# -- pooling ---------------------------------------------------------------------------------------


@cuda.jit
def pool_cnhw_gpu(x, kh, kw, sh, sw, pt, pl, pb, pr, is_max, include_pad, out):
    """Max / average pooling of x[C, N, H, W] into out[C, N, Ho, Wo] (Ho, Wo given by out,
    so ceil mode is the caller's output size). Max: cells outside the input never win (-inf
    when a window has none). Average: divisor counts cells inside the input, plus, with
    include_pad, cells inside the declared padding (never those beyond, which only ceil mode
    reaches) -- exactly ``pool_cnhw_cpu``."""
    c_, n_, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    total = c_ * n_ * ho * wo
    for k in range(cuda.grid(1), total, cuda.gridsize(1)):
        ox = k % wo
        t = k // wo
        oy = t % ho
        t = t // ho
        n = t % n_
        c = t // n_
        y0 = oy * sh - pt
        x0 = ox * sw - pl
        ya = max(y0, 0)
        yb = min(y0 + kh, h)
        xa = max(x0, 0)
        xb = min(x0 + kw, w)
        if is_max:
            acc = NEG_INF
            for iy in range(ya, yb):
                for ix in range(xa, xb):
                    acc = max(acc, x[c, n, iy, ix])
            out[c, n, oy, ox] = acc
        else:
            acc = F0
            for iy in range(ya, yb):
                for ix in range(xa, xb):
                    acc += x[c, n, iy, ix]
            if include_pad:
                cy = min(y0 + kh, h + pb) - max(y0, -pt)
                cx = min(x0 + kw, w + pr) - max(x0, -pl)
            else:
                cy = yb - ya
                cx = xb - xa
            out[c, n, oy, ox] = acc / (np.float32(cy) * np.float32(cx))


@cuda.jit
def global_avgpool_gpu(x, out, transposed):
    """Mean over H, W of x[C, N, H, W]: out[C, N] (or out[N, C] when ``transposed``)."""
    c_, n_, h, w = x.shape
    inv = F1 / np.float32(h * w)
    for k in range(cuda.grid(1), c_ * n_, cuda.gridsize(1)):
        c = k // n_
        n = k - c * n_
        s = F0
        for iy in range(h):
            for ix in range(w):
                s += x[c, n, iy, ix]
        if transposed:
            out[n, c] = s * inv
        else:
            out[c, n] = s * inv


# -- pointwise / merges ------------------------------------------------------------------------------


@cuda.jit
def act_flat_gpu(x, out, code, a0, a1):
    """out = act(x) on flat arrays."""
    for k in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        out[k] = _act(x[k], code, a0, a1)


@cuda.jit
def affine_gpu(x, scale, shift, chan_axis, out):
    """Per-channel scale/shift of a 2-D view: channel = row (CNHW as [C, N*H*W]) when
    chan_axis == 0, column ([N, K] vectors) when 1."""
    r_, m_ = x.shape
    for k in range(cuda.grid(1), r_ * m_, cuda.gridsize(1)):
        r = k // m_
        s = k - r * m_
        ch = r if chan_axis == 0 else s
        out[r, s] = x[r, s] * scale[ch] + shift[ch]


@cuda.jit
def add_act_gpu(a, b, out, code, a0, a1):
    """out = act(a + b) on flat arrays of equal size (residual add + activation)."""
    for k in range(cuda.grid(1), a.shape[0], cuda.gridsize(1)):
        out[k] = _act(a[k] + b[k], code, a0, a1)


@cuda.jit
def binary_bcast_gpu(a, b, out, is_mul, code, a0, a1):
    """out = act(a + b) or act(a * b) on 4-D arrays, numpy broadcasting of size-1 axes
    (squeeze-excitation gates [C, N, 1, 1] against [C, N, H, W])."""
    d0, d1, d2, d3 = out.shape
    for k in range(cuda.grid(1), d0 * d1 * d2 * d3, cuda.gridsize(1)):
        i3 = k % d3
        t = k // d3
        i2 = t % d2
        t = t // d2
        i1 = t % d1
        i0 = t // d1
        va = a[i0 if a.shape[0] > 1 else 0, i1 if a.shape[1] > 1 else 0,
               i2 if a.shape[2] > 1 else 0, i3 if a.shape[3] > 1 else 0]
        vb = b[i0 if b.shape[0] > 1 else 0, i1 if b.shape[1] > 1 else 0,
               i2 if b.shape[2] > 1 else 0, i3 if b.shape[3] > 1 else 0]
        v = va * vb if is_mul else va + vb
        out[i0, i1, i2, i3] = _act(v, code, a0, a1)


@cuda.jit
def copy_offset4_gpu(src, dst, axis, off):
    """dst[..., off + i, ...] = src[..., i, ...] along ``axis`` of 4-D arrays (concat into
    channel offsets; with off = 0 a strided -> contiguous copy)."""
    d0, d1, d2, d3 = src.shape
    for k in range(cuda.grid(1), d0 * d1 * d2 * d3, cuda.gridsize(1)):
        i3 = k % d3
        t = k // d3
        i2 = t % d2
        t = t // d2
        i1 = t % d1
        i0 = t // d1
        v = src[i0, i1, i2, i3]
        if axis == 0:
            dst[i0 + off, i1, i2, i3] = v
        elif axis == 1:
            dst[i0, i1 + off, i2, i3] = v
        elif axis == 2:
            dst[i0, i1, i2 + off, i3] = v
        else:
            dst[i0, i1, i2, i3 + off] = v


@cuda.jit
def permute4_gpu(x, out, p0, p1, p2, p3):
    """out = numpy.transpose(x, (p0, p1, p2, p3)) for 4-D arrays (layout changes)."""
    d0, d1, d2, d3 = out.shape
    for k in range(cuda.grid(1), d0 * d1 * d2 * d3, cuda.gridsize(1)):
        i3 = k % d3
        t = k // d3
        i2 = t % d2
        t = t // d2
        i1 = t % d1
        i0 = t // d1
        j = cuda.local.array(4, np.int64)
        j[p0] = i0
        j[p1] = i1
        j[p2] = i2
        j[p3] = i3
        out[i0, i1, i2, i3] = x[j[0], j[1], j[2], j[3]]


@cuda.jit
def pad_cnhw_gpu(x, pt, pl, value, out):
    """Constant padding of H, W: out[c, n] = value with x[c, n] at (pt, pl)."""
    c_, n_, ho, wo = out.shape
    h, w = x.shape[2], x.shape[3]
    for k in range(cuda.grid(1), c_ * n_ * ho * wo, cuda.gridsize(1)):
        ox = k % wo
        t = k // wo
        oy = t % ho
        t = t // ho
        n = t % n_
        c = t // n_
        y = oy - pt
        xx = ox - pl
        if y >= 0 and y < h and xx >= 0 and xx < w:
            out[c, n, oy, ox] = x[c, n, y, xx]
        else:
            out[c, n, oy, ox] = value


@cuda.jit
def lrn_cnhw_gpu(x, size, alpha, beta, bias, out):
    """ONNX LRN across channels of x[C, N, H, W]: floor((size-1)/2) channels before,
    ceil((size-1)/2) after."""
    c_, n_, h, w = x.shape
    lo = (size - 1) // 2
    hi = size // 2
    for k in range(cuda.grid(1), c_ * n_ * h * w, cuda.gridsize(1)):
        ix = k % w
        t = k // w
        iy = t % h
        t = t // h
        n = t % n_
        c = t // n_
        s = F0
        for cc in range(max(0, c - lo), min(c_, c + hi + 1)):
            v = x[cc, n, iy, ix]
            s += v * v
        out[c, n, iy, ix] = x[c, n, iy, ix] / math.pow(bias + alpha / size * s, beta)


@cuda.jit
def softmax_rows_gpu(x, out):
    """Softmax over the last axis of a 2-D [R, K] array, one row per thread iteration."""
    r_, k_ = x.shape
    for r in range(cuda.grid(1), r_, cuda.gridsize(1)):
        m = NEG_INF
        for j in range(k_):
            m = max(m, x[r, j])
        s = F0
        for j in range(k_):
            e = math.exp(x[r, j] - m)
            out[r, j] = e
            s += e
        inv = F1 / s
        for j in range(k_):
            out[r, j] = out[r, j] * inv
