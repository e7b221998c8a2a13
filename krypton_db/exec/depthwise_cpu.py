"""Depthwise convolution (groups == C == O, multiplier 1) on the CPU: CNHW layout, bias and
activation fused.

Hand-written rather than BLAS: each output needs only kh*kw MACs of one plane, so a GEMM
would be [1, kh*kw] @ [kh*kw, Ho*Wo] per plane (an im2col copy per 9 FLOPs).

Stage layout (one channel, a block of up to ``nb`` images of it): the images' zero-padded
planes side by side, image k's padded column X at stage column k*pitch + X, its padded row Y at
stage row Y. ``pitch`` (>= padded width) is chosen so that no output's window reaches the next
image's data: only zeros lie between two images, and the block shares one stage. Columns are
split into ``sw`` phases (stage[ph, Y, u] = padded[Y, u*sw + ph]), so every tap of every
output row reads ONE contiguous run: output row oy of all images of the block is the grid row
acc[oy, k*ip + ox] (ip = pitch / sw; grid values with ox >= wo are computed and dropped by the
epilogue). Long runs across a block of small planes are what make 14x14 and 7x7 planes fast;
before, each plane's short rows were all loop overhead.

Taps: 3x3 and 5x5 windows with stride 1 or 2 (no dilation) are register-blocked: each loaded
input vector feeds several output rows (3x3: 4 rows, 5x5: 2 rows in two passes over the
kernel rows, so the 25 weights and the accumulators fit in registers), so an output is
stored once per pass instead of loaded and stored once per kernel row. Other windows: one
pass per kernel row per output row.

The loops take array views at their start, not offsets: LLVM vectorizes these loops (many
load streams, several store streams) only when loads and stores share one index; with
separate offsets it falls back to scalar code (measured 5-10x slower)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels_cpu import copy_at, copy_strided_at, bias_act_at

DW_STAGE = 32768  # floats of one block's stage (128 KiB: L2-resident); sets the images per block


@njit(inline="always")
def _dot3(buf, p, c1, c2, u):
    return (u[0] * buf[p] + u[1] * buf[p + c1]) + u[2] * buf[p + c2]


@njit(inline="always")
def _dot5(buf, p, c1, c2, c3, c4, u):
    return ((u[0] * buf[p] + u[1] * buf[p + c1]) + (u[2] * buf[p + c2] + u[3] * buf[p + c3])) \
        + u[4] * buf[p + c4]


@njit(inline="always")
def _row3(w, c, i):
    return (w[c, 0, i, 0], w[c, 0, i, 1], w[c, 0, i, 2])


@njit(inline="always")
def _row5(w, c, i):
    return (w[c, 0, i, 0], w[c, 0, i, 1], w[c, 0, i, 2], w[c, 0, i, 3], w[c, 0, i, 4])


@njit(inline="always")
def _k3_rows4(acc, buf, n, rw, S, c1, c2, u0, u1, u2):
    """acc[r*rw + g] = 3x3 window of output row r < 4 (input rows r*S + i, i < 3), g < n.
    ``S`` is a literal at each call site, so the shared rows' loads are one load each."""
    for g in range(np.uint64(n)):
        a0 = (_dot3(buf, g + np.uint64((0 * S + 0) * rw), c1, c2, u0) + _dot3(buf, g + np.uint64((0 * S + 1) * rw), c1, c2, u1)) \
            + _dot3(buf, g + np.uint64((0 * S + 2) * rw), c1, c2, u2)
        a1 = (_dot3(buf, g + np.uint64((1 * S + 0) * rw), c1, c2, u0) + _dot3(buf, g + np.uint64((1 * S + 1) * rw), c1, c2, u1)) \
            + _dot3(buf, g + np.uint64((1 * S + 2) * rw), c1, c2, u2)
        a2 = (_dot3(buf, g + np.uint64((2 * S + 0) * rw), c1, c2, u0) + _dot3(buf, g + np.uint64((2 * S + 1) * rw), c1, c2, u1)) \
            + _dot3(buf, g + np.uint64((2 * S + 2) * rw), c1, c2, u2)
        a3 = (_dot3(buf, g + np.uint64((3 * S + 0) * rw), c1, c2, u0) + _dot3(buf, g + np.uint64((3 * S + 1) * rw), c1, c2, u1)) \
            + _dot3(buf, g + np.uint64((3 * S + 2) * rw), c1, c2, u2)
        acc[g] = a0
        acc[g + np.uint64(rw)] = a1
        acc[g + np.uint64(2 * rw)] = a2
        acc[g + np.uint64(3 * rw)] = a3


@njit(inline="always")
def _k5_rows2_first(acc, buf, n, rw, S, c1, c2, c3, c4, u0, u1, u2):
    """acc[r*rw + g] = kernel rows 0..2 of a 5x5 window, output rows r < 2."""
    for g in range(np.uint64(n)):
        a0 = (_dot5(buf, g, c1, c2, c3, c4, u0) + _dot5(buf, g + np.uint64(rw), c1, c2, c3, c4, u1)) \
            + _dot5(buf, g + np.uint64(2 * rw), c1, c2, c3, c4, u2)
        a1 = (_dot5(buf, g + np.uint64(S * rw), c1, c2, c3, c4, u0) + _dot5(buf, g + np.uint64((S + 1) * rw), c1, c2, c3, c4, u1)) \
            + _dot5(buf, g + np.uint64((S + 2) * rw), c1, c2, c3, c4, u2)
        acc[g] = a0
        acc[g + np.uint64(rw)] = a1


@njit(inline="always")
def _k5_rows2_last(acc, buf, n, rw, S, c1, c2, c3, c4, u3, u4):
    """acc[r*rw + g] += kernel rows 3, 4 of a 5x5 window, output rows r < 2."""
    for g in range(np.uint64(n)):
        a0 = _dot5(buf, g + np.uint64(3 * rw), c1, c2, c3, c4, u3) + _dot5(buf, g + np.uint64(4 * rw), c1, c2, c3, c4, u4)
        a1 = _dot5(buf, g + np.uint64((S + 3) * rw), c1, c2, c3, c4, u3) + _dot5(buf, g + np.uint64((S + 4) * rw), c1, c2, c3, c4, u4)
        acc[g] += a0
        acc[g + np.uint64(rw)] += a1


@njit(inline="always")
def _any_row(acc, buf, n, w, c, i, kw, coff, first):
    """acc[g] (= if ``first`` else +=) sum_j w[c, 0, i, j] * buf[coff[j] + g]: one kernel row
    of any width for one output row."""
    if kw == 3:
        u = _row3(w, c, i)
        src = buf[coff[0]:]
        d1 = np.uint64(coff[1] - coff[0])
        d2 = np.uint64(coff[2] - coff[0])
        if first:
            for g in range(np.uint64(n)):
                acc[g] = _dot3(src, g, d1, d2, u)
        else:
            for g in range(np.uint64(n)):
                acc[g] += _dot3(src, g, d1, d2, u)
        return
    for j in range(kw):
        wij = w[c, 0, i, j]
        src = buf[coff[j]:]
        if first and j == 0:
            for g in range(np.uint64(n)):
                acc[g] = wij * src[g]
        else:
            for g in range(np.uint64(n)):
                acc[g] += wij * src[g]


@njit(nogil=True, cache=True)
def depthwise_conv_cpu(x, w, b, sh, sw, dh, dw, pt, pl, code, a0, a1, lo, hi, out):
    """out[c, n] = act(depthwise conv of x[c, n] + b[c]) for the (c, n) planes lo..hi-1 (x, out
    C-contiguous CNHW; weights [C, 1, kh, kw]); see the module doc for the stage layout."""
    n_, h, wd = x.shape[1], x.shape[2], x.shape[3]
    ho, wo = out.shape[2], out.shape[3]
    kh, kw = w.shape[2], w.shape[3]
    blocked3 = kh == 3 and kw == 3 and dh == 1 and dw == 1 and sh == sw and sh <= 2
    blocked5 = kh == 5 and kw == 5 and dh == 1 and dw == 1 and sh == sw and sh <= 2
    rows = 4 if blocked3 else 2 if blocked5 else 1  # output rows per register block
    hoq = (ho + rows - 1) // rows * rows
    # pitch: image k's padded columns are [k*pitch, k*pitch + reach]; zeros at [0, pl) and
    # (pl + wd - 1, reach] of each must not hold the next image's data (starts at pitch + pl)
    reach = (wo - 1) * sw + (kw - 1) * dw
    pitch = max(pl + wd, reach - pl + 1, wo * sw)
    pitch = (pitch + sw - 1) // sw * sw
    ip = pitch // sw
    srows = max(pt + h, (hoq - 1) * sh + (kh - 1) * dh + 1) + 1  # + 1: the last grid row's tail
    nb = max(1, min(n_, DW_STAGE // (sw * srows * ip)))
    rw = nb * ip
    cplane = srows * rw  # one column phase of the stage
    buf = np.zeros(sw * cplane, np.float32)
    acc = np.empty(hoq * rw, np.float32)
    coff = np.empty((kh, kw), np.int64)  # stage offset of tap (i, j) for output row 0
    for i in range(kh):
        for j in range(kw):
            coff[i, j] = (j * dw) % sw * cplane + i * dh * rw + (j * dw) // sw
    cj = np.empty(5, np.uint64)  # the fast paths' column offsets (column phase, then shift)
    for j in range(5):
        cj[j] = np.uint64(j % sw * cplane + j // sw)
    c1, c2, c3, c4 = cj[1], cj[2], cj[3], cj[4]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    cn = lo
    while cn < hi:
        c = cn // n_
        nimg = min(nb, n_ - (cn - c * n_), hi - cn)
        for k in range(nimg):
            for y in range(h):
                src = ((cn + k) * h + y) * wd
                dst = (pt + y) * rw + k * ip
                if sw == 1:
                    copy_at(buf, dst + pl, xf, src, wd)
                else:
                    for ph in range(sw):
                        # stage column u of phase ph holds input column u*sw + ph - pl
                        ua = max(0, (pl - ph + sw - 1) // sw)
                        ub = max(ua, (wd + pl - ph + sw - 1) // sw)
                        copy_strided_at(buf, ph * cplane + dst + ua, xf, src + ua * sw + ph - pl, ub - ua, sw)
        if blocked3:
            u0, u1, u2 = _row3(w, c, 0), _row3(w, c, 1), _row3(w, c, 2)
            for oy0 in range(0, ho, 4):
                if sh == 1:
                    _k3_rows4(acc[oy0 * rw:], buf[oy0 * rw:], rw, rw, 1, c1, c2, u0, u1, u2)
                else:
                    _k3_rows4(acc[oy0 * rw:], buf[2 * oy0 * rw:], rw, rw, 2, c1, c2, u0, u1, u2)
        elif blocked5:
            u0, u1, u2, u3, u4 = _row5(w, c, 0), _row5(w, c, 1), _row5(w, c, 2), _row5(w, c, 3), _row5(w, c, 4)
            for oy0 in range(0, ho, 2):
                if sh == 1:
                    _k5_rows2_first(acc[oy0 * rw:], buf[oy0 * rw:], rw, rw, 1, c1, c2, c3, c4, u0, u1, u2)
                    _k5_rows2_last(acc[oy0 * rw:], buf[oy0 * rw:], rw, rw, 1, c1, c2, c3, c4, u3, u4)
                else:
                    _k5_rows2_first(acc[oy0 * rw:], buf[2 * oy0 * rw:], rw, rw, 2, c1, c2, c3, c4, u0, u1, u2)
                    _k5_rows2_last(acc[oy0 * rw:], buf[2 * oy0 * rw:], rw, rw, 2, c1, c2, c3, c4, u3, u4)
        else:
            for oy in range(ho):
                for i in range(kh):
                    _any_row(acc[oy * rw:], buf[oy * sh * rw:], rw, w, c, i, kw, coff[i], i == 0)
        bc = b[c]
        for k in range(nimg):
            for oy in range(ho):
                bias_act_at(of, ((cn + k) * ho + oy) * wo, acc, oy * rw + k * ip, wo, bc, code, a0, a1)
        cn += nimg
