"""numba CPU kernels (``<op>_<variant>_cpu``). All compiled with ``cache=True``.

Layout: feature maps are ``[C, N, H, W]`` ("CNHW"): channels outermost, so a convolution over
a whole batch is ONE matrix product ``W[O, C*kh*kw] @ cols[C*kh*kw, N*Ho*Wo]`` whose result is
already the next layer's ``[O, N, Ho, Wo]`` tensor (no transposes between layers), concat along
channels is contiguous, and per-(c, n) planes are contiguous for pooling.
Batches of small tensors (the incremental read-in contexts) therefore form one large GEMM.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# activation codes shared by the fused epilogue and the standalone pointwise kernel
ACT_NONE, ACT_RELU, ACT_CLIP, ACT_LEAKY, ACT_SIGMOID, ACT_HSIGMOID, ACT_HSWISH = range(7)


@njit(inline="always")
def _act(v, code, a0, a1):
    if code == 1:
        return v if v > 0.0 else np.float32(0.0)
    if code == 2:
        return min(max(v, a0), a1)
    if code == 3:
        return v if v >= 0.0 else v * a0
    if code == 4:
        return np.float32(1.0) / (np.float32(1.0) + math.exp(-v))
    if code == 5:
        return min(max(a0 * v + a1, np.float32(0.0)), np.float32(1.0))
    if code == 6:
        return v * min(max(v / np.float32(6.0) + np.float32(0.5), np.float32(0.0)), np.float32(1.0))
    return v


@njit(parallel=True, cache=True)
def im2col_cnhw_cpu(x, c0, cg, kh, kw, sh, sw, dh, dw, pt, pl, ho, wo, j0, j1, cols):
    """cols[(c,i,j), q] = x[c0+c, n, oy*sh+i*dh-pt, ox*sw+j*dw-pl] for column j0+q = (n,oy,ox);
    zero outside the input (convolution padding)."""
    _, _, h, w = x.shape
    rows = cg * kh * kw
    plane = ho * wo
    for r in prange(rows):
        c = r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        jj = j0
        while jj < j1:
            n = jj // plane
            rem = jj - n * plane
            oy = rem // wo
            ox0 = rem - oy * wo
            cnt = min(wo - ox0, j1 - jj)
            iy = oy * sh + i * dh - pt
            base = jj - j0
            if iy < 0 or iy >= h:
                for q in range(cnt):
                    cols[r, base + q] = 0.0
            else:
                for q in range(cnt):
                    ix = (ox0 + q) * sw + j * dw - pl
                    if 0 <= ix < w:
                        cols[r, base + q] = x[c0 + c, n, iy, ix]
                    else:
                        cols[r, base + q] = 0.0
            jj += cnt


@njit(parallel=True, cache=True)
def bias_act_cpu(y, b, code, a0, a1):
    """In place: y[o, :] = act(y[o, :] + b[o]) on a (possibly strided) 2-D view."""
    for o in prange(y.shape[0]):
        bo = b[o]
        for q in range(y.shape[1]):
            y[o, q] = _act(y[o, q] + bo, code, a0, a1)


@njit(parallel=True, cache=True)
def act_cpu(x, out, code, a0, a1):
    """out = act(x), both flat contiguous."""
    for i in prange(x.size):
        out[i] = _act(x[i], code, a0, a1)


@njit(parallel=True, cache=True)
def affine_cnhw_cpu(x, scale, shift, out):
    """Per-channel scale/shift of a [C, M] view (M = N*H*W)."""
    for c in prange(x.shape[0]):
        s = scale[c]
        t = shift[c]
        for q in range(x.shape[1]):
            out[c, q] = x[c, q] * s + t


@njit(parallel=True, cache=True)
def depthwise_conv_cpu(x, w, b, sh, sw, dh, dw, pt, pl, code, a0, a1, out):
    """Direct depthwise convolution (groups == C == O, multiplier 1) with fused epilogue."""
    c_, n_, h, wd = x.shape
    _, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    kh, kw = w.shape[2], w.shape[3]
    for cn in prange(c_ * n_):
        c = cn // n_
        n = cn - c * n_
        for oy in range(ho):
            for ox in range(wo):
                acc = np.float32(0.0)
                for i in range(kh):
                    iy = oy * sh + i * dh - pt
                    if iy < 0 or iy >= h:
                        continue
                    for j in range(kw):
                        ix = ox * sw + j * dw - pl
                        if 0 <= ix < wd:
                            acc += x[c, n, iy, ix] * w[c, 0, i, j]
                out[c, n, oy, ox] = _act(acc + b[c], code, a0, a1)


@njit(parallel=True, cache=True)
def pool_cnhw_cpu(x, kh, kw, sh, sw, pt, pl, pb, pr, is_max, include_pad, out):
    """Max / average pooling over each [H, W] plane of x[C, N, H, W].

    Max: cells outside the input are -inf (never chosen). Average: divisor counts cells inside
    the input, plus, with include_pad, cells inside the declared padding (never those beyond,
    which only ceil mode reaches)."""
    c_, n_, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    for cn in prange(c_ * n_):
        c = cn // n_
        n = cn - c * n_
        for oy in range(ho):
            y0 = oy * sh - pt
            ya = max(y0, 0)
            yb = min(y0 + kh, h)
            for ox in range(wo):
                x0 = ox * sw - pl
                xa = max(x0, 0)
                xb = min(x0 + kw, w)
                if is_max:
                    m = -np.inf
                    for iy in range(ya, yb):
                        for ix in range(xa, xb):
                            v = x[c, n, iy, ix]
                            if v > m:
                                m = v
                    out[c, n, oy, ox] = m
                else:
                    s = np.float32(0.0)
                    for iy in range(ya, yb):
                        for ix in range(xa, xb):
                            s += x[c, n, iy, ix]
                    if include_pad:
                        cnt = (min(y0 + kh, h + pb) - max(y0, -pt)) * (min(x0 + kw, w + pr) - max(x0, -pl))
                    else:
                        cnt = (yb - ya) * (xb - xa)
                    out[c, n, oy, ox] = s / np.float32(cnt)


@njit(parallel=True, cache=True)
def lrn_cnhw_cpu(x, size, alpha, beta, bias, out):
    c_, n_, h, w = x.shape
    lo = (size - 1) // 2
    hi = size // 2
    for cn in prange(c_ * n_):
        c = cn // n_
        n = cn - c * n_
        ca = max(0, c - lo)
        cb = min(c_, c + hi + 1)
        for iy in range(h):
            for ix in range(w):
                s = np.float32(0.0)
                for k in range(ca, cb):
                    v = x[k, n, iy, ix]
                    s += v * v
                out[c, n, iy, ix] = x[c, n, iy, ix] / (bias + alpha / size * s) ** beta


@njit(parallel=True, cache=True)
def add_act_cpu(a, b, out, code, a0, a1):
    """out = act(a + b) on flat contiguous arrays of equal size (residual add + ReLU)."""
    for i in prange(a.size):
        out[i] = _act(a[i] + b[i], code, a0, a1)
