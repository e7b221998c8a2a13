"""numba CPU kernels (``<op>_<variant>_cpu``) and the BLAS binding they work with.

Layout: feature maps are ``[C, N, H, W]`` ("CNHW"): channels outermost, so a convolution over
a whole batch is ONE matrix product ``W[O, C*kh*kw] @ cols[C*kh*kw, N*Ho*Wo]`` whose result is
already the next layer's ``[O, N, Ho, Wo]`` tensor (no transposes between layers), concat along
channels is contiguous, and per-(c, n) planes are contiguous for pooling.
Batches of small tensors (the incremental read-in contexts) therefore form one large GEMM.

Threading design (why the kernels here are serial ``nogil`` functions over a *range*):
the executor runs its own small pool of Python threads (one per core) and calls single-threaded
OpenBLAS ``sgemm`` and these kernels from each of them on disjoint column chunks / planes.
Measured on the 2-core target, the alternative (OpenBLAS' own threads for the GEMM, numba's
OpenMP pool for im2col and the epilogue) lost most of its time to the two pools fighting over
the cores: OpenBLAS workers busy-wait after every call, so an OpenMP bias pass run right after a
GEMM chunk took 5 ms instead of 12 us. With one pool there is no hand-over at all, and each
thread's im2col block, GEMM output block and epilogue stay in its own core's cache.

Convolutions run on our own tap GEMM (``gemm_cpu``: all kh*kw taps in one call, packed
weights, an AVX-512 micro-kernel that does not depend on which kernel the BLAS build selects).
``gemm`` here serves the fully connected layers (and the convolutions when
``KRYPTON_GEMM=openblas``, for comparison): ``sgemm`` is called through ctypes on numpy's own
OpenBLAS (found in the process maps), not through ``np.matmul``, because the callers need what
matmul cannot express: ``beta = 1`` accumulation and arbitrary leading dimensions (output
blocks written straight into a strided result). Without an OpenBLAS in the process, ``gemm``
falls back to ``np.matmul`` on the same views (slower, still correct).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# activation codes shared by the fused epilogue and the standalone pointwise kernel (graph.OPS)
from ..graph import (ACT_CLIP, ACT_ELU, ACT_HSIGMOID, ACT_HSWISH, ACT_LEAKY,  # noqa: E402
                     ACT_NONE, ACT_RELU, ACT_SIGMOID)
from .simd_cpu import copy_stride2_at


# -- activations ----------------------------------------------------------------------------------


@njit(inline="always")
def act(v, code, a0, a1):
    if code == ACT_RELU:
        return v if v > 0.0 else np.float32(0.0)
    if code == ACT_CLIP:
        return min(max(v, a0), a1)
    if code == ACT_LEAKY:
        return v if v >= 0.0 else v * a0
    if code == ACT_SIGMOID:
        return np.float32(1.0) / (np.float32(1.0) + math.exp(-v))
    if code == ACT_HSIGMOID:
        return min(max(a0 * v + a1, np.float32(0.0)), np.float32(1.0))
    if code == ACT_HSWISH:
        return v * min(max(v / np.float32(6.0) + np.float32(0.5), np.float32(0.0)), np.float32(1.0))
    if code == ACT_ELU:
        return v if v >= 0.0 else a0 * math.expm1(v)
    return v


@njit(inline="always")
def bias_act_at(dst, doff, src, soff, n, bo, code, a0, a1):
    """dst[doff:doff+n] = act(src[soff:soff+n] + bo) on 1-D arrays; one branch-free loop per
    common code, unsigned indices (no negative-index wraparound), so the loops vectorize."""
    ud = np.uint64(doff)
    us = np.uint64(soff)
    un = np.uint64(n)
    if code == ACT_NONE:
        for q in range(un):
            dst[ud + q] = src[us + q] + bo
    elif code == ACT_RELU:
        for q in range(un):
            v = src[us + q] + bo
            dst[ud + q] = v if v > 0.0 else np.float32(0.0)
    elif code == ACT_CLIP:
        for q in range(un):
            dst[ud + q] = min(max(src[us + q] + bo, a0), a1)
    elif code == ACT_HSWISH:
        for q in range(un):
            v = src[us + q] + bo
            dst[ud + q] = v * min(max(v * np.float32(1.0 / 6.0) + np.float32(0.5), np.float32(0.0)), np.float32(1.0))
    else:
        for q in range(un):
            dst[ud + q] = act(src[us + q] + bo, code, a0, a1)


@njit(inline="always")
def _bias_act_row(dst, src, bo, code, a0, a1):
    bias_act_at(dst, 0, src, 0, dst.shape[0], bo, code, a0, a1)


# -- convolution helpers ---------------------------------------------------------------------------


@njit(inline="always")
def _segments(q0, q1, hs, ws, width):
    """Split flat positions [q0, q1) of a grid [*, hs, ws] into row segments: rows of
    (image, row, first column, offset from q0, length); only the first ``width`` columns of
    each grid row are kept (segments entirely past it are dropped)."""
    nmax = (q1 - q0) // ws + 2
    seg = np.empty((nmax, 5), np.int64)
    img = hs * ws
    n = q0 // img
    rem = q0 - n * img
    yy = rem // ws
    xx = rem - yy * ws
    q = q0
    k = 0
    while q < q1:
        cnt = min(ws - xx, q1 - q)
        keep = min(cnt, width - xx)
        if keep > 0:
            seg[k, 0] = n
            seg[k, 1] = yy
            seg[k, 2] = xx
            seg[k, 3] = q - q0
            seg[k, 4] = keep
            k += 1
        q += cnt
        xx = 0
        yy += 1
        if yy == hs:
            yy = 0
            n += 1
    return seg[:k]


@njit(inline="always")
def _valid_cols(off, stride, width, count):
    """[a, b): the output columns ox < count whose input column ox*stride + off is in
    [0, width)."""
    a = 0 if off >= 0 else min(count, (-off + stride - 1) // stride)
    b = 0 if width - off <= 0 else min(count, (width - off + stride - 1) // stride)
    return a, max(a, b)


@njit(inline="always")
def _zero_at(d, off, n):
    u = np.uint64(off)
    for q in range(np.uint64(n)):
        d[u + q] = 0.0


@njit(inline="always")
def copy_at(d, doff, s, soff, n):
    ud = np.uint64(doff)
    us = np.uint64(soff)
    for q in range(np.uint64(n)):
        d[ud + q] = s[us + q]


@njit(inline="always")
def copy_strided_at(d, doff, s, soff, n, step):
    """d[doff + q] = s[soff + q*step] for q < n (stride 2 as vector shuffles: ``simd_cpu``)."""
    if step == 1:
        copy_at(d, doff, s, soff, n)
        return
    if step == 2:
        copy_stride2_at(d, doff, s, soff, n)
        return
    ud = np.uint64(doff)
    us = np.uint64(soff)
    ust = np.uint64(step)
    for q in range(np.uint64(n)):
        d[ud + q] = s[us + q * ust]


@njit(nogil=True, cache=True)
def im2col_chunk_cpu(x, c0, cg, kh, kw, sh, sw, dh, dw, pt, pl, ho, wo, j0, j1, cols):
    """cols[(c,i,j), q] = x[c0+c, n, oy*sh+i*dh-pt, ox*sw+j*dw-pl] for column j0+q = (n,oy,ox);
    zero outside the input (convolution padding). Serial: one thread fills its own chunk.
    The chunk's row segments are computed once and reused for every (c, i, j) row; inner
    loops use flat unsigned offsets (numba then drops the negative-index wraparound selects
    and vectorizes the copies). x must be C-contiguous, cols a C-contiguous [rows, >= j1-j0]."""
    n_, h, w = x.shape[1], x.shape[2], x.shape[3]
    xf = x.reshape(-1)
    cf = cols.reshape(-1)
    ldc = cols.shape[1]
    seg = _segments(j0, j1, ho, wo, wo)
    for r in range(cg * kh * kw):
        c = r // (kh * kw)
        i = (r // kw) % kh
        j = r % kw
        off = j * dw - pl
        oxa, oxb = _valid_cols(off, sw, w, wo)
        rbase = r * ldc
        cbase = (c0 + c) * n_
        for k in range(seg.shape[0]):
            n, oy, ox0, base, cnt = seg[k, 0], seg[k, 1], seg[k, 2], seg[k, 3], seg[k, 4]
            d0 = rbase + base
            iy = oy * sh + i * dh - pt
            if iy < 0 or iy >= h:
                _zero_at(cf, d0, cnt)
                continue
            ox1 = ox0 + cnt
            a = min(max(ox0, oxa), ox1)
            b = max(min(ox1, oxb), a)
            _zero_at(cf, d0, a - ox0)
            src = ((cbase + n) * h + iy) * w
            if sw == 1:
                copy_at(cf, d0 + a - ox0, xf, src + a + off, b - a)
            elif b > a:
                copy_strided_at(cf, d0 + a - ox0, xf, src + a * sw + off, b - a, sw)
            _zero_at(cf, d0 + b - ox0, ox1 - b)


@njit(nogil=True, cache=True)
def subsample_cnhw_cpu(x, sh, sw, lo, hi, out):
    """out[c, n, y, xx] = x[c, n, y * sh, xx * sw] over the (c, n) planes lo..hi-1 (flat
    c * N + n): the input of a 1x1 strided conv without padding, which is then a plain GEMM."""
    h, w = x.shape[2], x.shape[3]
    ho, wo = out.shape[2], out.shape[3]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for cn in range(lo, hi):
        for y in range(ho):
            copy_strided_at(of, (cn * ho + y) * wo, xf, (cn * h + y * sh) * w, wo, sw)


@njit(nogil=True, cache=True)
def polyphase_cnhw_cpu(x, pt, pl, sh, sw, phases, out, lo, hi):
    """out[c, k, y, xx, n] = x[c, n, y*sh + p - pt, xx*sw + q - pl] for phase k = (p, q) =
    phases[k], zero outside x (channels lo..hi): the CHWB phase planes of a strided conv."""
    n_, h, w = x.shape[1], x.shape[2], x.shape[3]
    hp, wp = out.shape[2], out.shape[3]
    for c in range(lo, hi):
        for k in range(phases.shape[0]):
            p = phases[k, 0]
            q = phases[k, 1]
            for y in range(hp):
                yy = y * sh + p - pt
                for xx in range(wp):
                    xs = xx * sw + q - pl
                    if yy < 0 or yy >= h or xs < 0 or xs >= w:
                        for n in range(n_):
                            out[c, k, y, xx, n] = 0.0
                    else:
                        for n in range(n_):
                            out[c, k, y, xx, n] = x[c, n, yy, xs]


@njit(nogil=True, cache=True)
def phasegrid_chunk_cpu(x, c0, cg, pt, pl, sh, sw, phases, hp, wp, p0, p1, buf):
    """buf[c * K + k, p - p0] = x[c0+c, n, yy*sh + ph - pt, xx*sw + q - pl] for phase k = (ph, q)
    = phases[k] (K of them) and flat positions p = (n, yy, xx) in [p0, p1) of the phase grid
    [N, hp, wp]; zero outside x and past the last image: the phase planes of a strided conv
    in the shifted-window layout, each row a strided copy (stride 2: vector shuffles). With
    stride 1 and the one phase (0, 0) it is the stride-1 shifted-window conv's zero-padded
    grid [N, hs, wp] (rows / images sharing their padding). x C-contiguous, buf a
    C-contiguous [>= cg * K, >= p1 - p0]."""
    n_, h, w = x.shape[1], x.shape[2], x.shape[3]
    nph = phases.shape[0]
    xf = x.reshape(-1)
    bf = buf.reshape(-1)
    ldb = buf.shape[1]
    seg = _segments(p0, p1, hp, wp, wp)
    for c in range(cg):
        cbase = (c0 + c) * n_
        for kp in range(nph):
            ph = phases[kp, 0]
            q = phases[kp, 1]
            # grid columns xx whose input column xx*sw + q - pl lies in [0, w)
            lo_x = max(0, (pl - q + sw - 1) // sw)
            hi_x = max(0, (w + pl - q + sw - 1) // sw)
            rbase = (c * nph + kp) * ldb
            for k in range(seg.shape[0]):
                n, yy, xx0, base, cnt = seg[k, 0], seg[k, 1], seg[k, 2], seg[k, 3], seg[k, 4]
                d0 = rbase + base
                y = yy * sh + ph - pt
                if n >= n_ or y < 0 or y >= h:
                    _zero_at(bf, d0, cnt)
                    continue
                xx1 = xx0 + cnt
                a = min(max(xx0, lo_x), xx1)
                b = max(min(xx1, hi_x), a)
                _zero_at(bf, d0, a - xx0)
                if b > a:
                    copy_strided_at(bf, d0 + a - xx0, xf, ((cbase + n) * h + y) * w + a * sw + q - pl, b - a, sw)
                _zero_at(bf, d0 + b - xx0, xx1 - b)


@njit(nogil=True, cache=True)
def shift_epilogue_cpu(s, o0, q0, q1, hs, wp, ho, wo, b, code, a0, a1, out):
    """out[o0+o, n, y, x] = act(s[o, q - q0] + b[o0+o]) for the padded-grid positions
    q = (n, y, x) in [q0, q1) that are real outputs (y < ho, x < wo). s: a row-major [og, >=m]
    block (row stride s.strides[0]), out C-contiguous."""
    n_ = out.shape[1]
    of = out.reshape(-1)
    seg = _segments(q0, q1, hs, wp, wo)
    for o in range(s.shape[0]):
        bo = b[o0 + o]
        srow = s[o]
        obase = (o0 + o) * n_
        for k in range(seg.shape[0]):
            n, yy, xx0, base, cnt = seg[k, 0], seg[k, 1], seg[k, 2], seg[k, 3], seg[k, 4]
            if yy < ho:
                bias_act_at(of, ((obase + n) * ho + yy) * wo + xx0, srow, base, cnt, bo, code, a0, a1)


@njit(nogil=True, cache=True)
def bias_act_rows_cpu(y, b, code, a0, a1):
    """In place: y[o, :] = act(y[o, :] + b[o]) on a (row-strided) 2-D view."""
    for o in range(y.shape[0]):
        _bias_act_row(y[o], y[o], b[o], code, a0, a1)


@njit(parallel=True, cache=True)
def bias_act_cpu(y, b, code, a0, a1):
    """In place: y[o, :] = act(y[o, :] + b[o]) on a (possibly strided) 2-D view."""
    for o in prange(y.shape[0]):
        _bias_act_row(y[o], y[o], b[o], code, a0, a1)


@njit(nogil=True, cache=True)
def avgpool_s1_cnhw_cpu(x, kh, kw, pt, pl, inv, lo, hi, out):
    """Stride-1 average pooling over the (c, n) planes lo..hi-1 of x[C, N, H, W]: out = (window
    sum) * inv, inv [Ho * Wo] the per-cell reciprocal divisor (count_include_pad or not).

    Inception's branch pools (3x3, stride 1, on 17x17 and 8x8 maps) have rows too short for
    per-row loops (``pool_cnhw_cpu`` spent its time in loop overhead); as in
    the depthwise conv (``depthwise_cpu``) each plane is copied into a zero-padded buffer of row width wp, and
    the separable sums are single long loops over that flat grid: horizontal window sums, then
    vertical sums of kh rows (grid columns >= Wo are dropped)."""
    h, wd = x.shape[2], x.shape[3]
    ho, wo = out.shape[2], out.shape[3]
    wp = max(pl + wd, wo + kw - 1)
    hp = max(pt + h, ho + kh - 1)
    pad = np.zeros(hp * wp + kw, np.float32)
    hs = np.zeros(hp * wp, np.float32)
    acc = np.empty(ho * wp, np.float32)
    xf = x.reshape(-1)
    of = out.reshape(-1)
    uh = np.uint64(hp * wp)
    ua = np.uint64(ho * wp)
    uwp = np.uint64(wp)
    for cn in range(lo, hi):
        for y in range(h):  # the padding cells stay 0 from the allocation
            copy_at(pad, (pt + y) * wp + pl, xf, (cn * h + y) * wd, wd)
        if kw == 3:  # the common window in one pass each way (a pass per tap was 2/3 of it)
            for g in range(uh):
                hs[g] = pad[g] + pad[g + np.uint64(1)] + pad[g + np.uint64(2)]
        else:
            for g in range(uh):
                hs[g] = pad[g]
            for j in range(1, kw):
                uj = np.uint64(j)
                for g in range(uh):
                    hs[g] += pad[g + uj]
        if kh == 3:
            for g in range(ua):
                acc[g] = hs[g] + hs[g + uwp] + hs[g + uwp + uwp]
        else:
            for g in range(ua):
                acc[g] = hs[g]
            for i in range(1, kh):
                ui = np.uint64(i) * uwp
                for g in range(ua):
                    acc[g] += hs[g + ui]
        ob = np.uint64(cn * ho * wo)
        for oy in range(np.uint64(ho)):
            for ox in range(np.uint64(wo)):
                of[ob + oy * np.uint64(wo) + ox] = acc[oy * uwp + ox] * inv[oy * np.uint64(wo) + ox]


@njit(nogil=True, cache=True)
def maxpool_cnhw_cpu(x, kh, kw, sh, sw, pt, pl, lo, hi, out):
    """Max pooling over the [H, W] planes lo..hi-1 (flat c*N + n) of x[C, N, H, W]; cells
    outside the input are -inf (never chosen). Separable, and every inner loop contiguous so
    it vectorizes: per output row, the window rows' maximum lands in a row buffer whose
    padding cells stay -inf; at stride 2 that row is split into its even and odd cells
    (vector shuffles), so tap j reads ``(even, odd)[j % 2][ox + j // 2]`` instead of the
    stride-2 gather ``row[2 * ox + j]`` (which numba compiles to scalar loads: Inception3's
    147x147 3x3/2 pool ran at 1/6 of ORT's speed that way)."""
    h, w = x.shape[2], x.shape[3]
    ho, wo = out.shape[2], out.shape[3]
    wpad = max(pl + w, (wo - 1) * sw + kw)
    vpad = np.full(wpad, -np.inf, np.float32)  # cells outside [pl, pl + w) stay -inf
    vin = vpad[pl : pl + w]
    ne = wo + (kw - 1) // 2 if sw == 2 else 0
    no = wo + (kw - 2) // 2 if sw == 2 and kw >= 2 else 0
    ev = np.empty(ne, np.float32)
    od = np.empty(no, np.float32)
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for cn in range(lo, hi):
        for oy in range(ho):
            y0 = oy * sh - pt
            ya = max(y0, 0)
            yb = min(y0 + kh, h)
            orow = of[(cn * ho + oy) * wo : (cn * ho + oy + 1) * wo]
            if yb <= ya:  # a window wholly in the padding (ceil mode)
                orow[:] = -np.inf
                continue
            r0 = xf[(cn * h + ya) * w : (cn * h + ya + 1) * w]
            if yb - ya == 3:  # the common 3-row window as one loop (loop overhead dominates)
                r1 = xf[(cn * h + ya + 1) * w : (cn * h + ya + 2) * w]
                r2 = xf[(cn * h + ya + 2) * w : (cn * h + ya + 3) * w]
                for q in range(w):
                    vin[q] = max(max(r0[q], r1[q]), r2[q])
            elif yb - ya == 2:
                r1 = xf[(cn * h + ya + 1) * w : (cn * h + ya + 2) * w]
                for q in range(w):
                    vin[q] = max(r0[q], r1[q])
            else:
                for q in range(w):
                    vin[q] = r0[q]
                for iy in range(ya + 1, yb):
                    xr = xf[(cn * h + iy) * w : (cn * h + iy + 1) * w]
                    for q in range(w):
                        vin[q] = max(vin[q], xr[q])
            if sw == 2:
                copy_stride2_at(ev, 0, vpad, 0, ne)
                if no > 0:
                    copy_stride2_at(od, 0, vpad, 1, no)
                if kw == 3:
                    e1 = ev[1 : 1 + wo]
                    for ox in range(wo):
                        orow[ox] = max(max(ev[ox], od[ox]), e1[ox])
                elif kw == 2:
                    for ox in range(wo):
                        orow[ox] = max(ev[ox], od[ox])
                else:
                    for ox in range(wo):
                        orow[ox] = ev[ox]
                    for j in range(1, kw):
                        src = ev[j // 2 : j // 2 + wo] if j % 2 == 0 else od[j // 2 : j // 2 + wo]
                        for ox in range(wo):
                            orow[ox] = max(orow[ox], src[ox])
            elif sw == 1 and kw == 3:
                v1 = vpad[1 : 1 + wo]
                v2 = vpad[2 : 2 + wo]
                for ox in range(wo):
                    orow[ox] = max(max(vpad[ox], v1[ox]), v2[ox])
            elif sw == 1:
                for ox in range(wo):
                    orow[ox] = vpad[ox]
                for j in range(1, kw):
                    src = vpad[j : j + wo]
                    for ox in range(wo):
                        orow[ox] = max(orow[ox], src[ox])
            else:
                for ox in range(wo):
                    m = vpad[ox * sw]
                    for j in range(1, kw):
                        m = max(m, vpad[ox * sw + j])
                    orow[ox] = m


@njit(nogil=True, cache=True)
def pool_cnhw_cpu(x, kh, kw, sh, sw, pt, pl, pb, pr, is_max, include_pad, lo, hi, out):
    """Max / average pooling over the [H, W] planes lo..hi-1 (flat c*N + n) of x[C, N, H, W].

    Max: ``maxpool_cnhw_cpu``. Average (here): divisor counts cells inside the input, plus, with
    include_pad, cells inside the declared padding (never those beyond, which only ceil mode
    reaches). Rows are reduced tap by tap into a row accumulator over the output columns where
    the tap is inside the input (branch-free inner loops)."""
    if is_max:
        maxpool_cnhw_cpu(x, kh, kw, sh, sw, pt, pl, lo, hi, out)
        return
    n_, h, w = x.shape[1], x.shape[2], x.shape[3]
    ho, wo = out.shape[2], out.shape[3]
    acc = np.empty(wo, np.float32)
    hsum = np.empty((h if (sw == 1 and sh == 1) else 0, wo), np.float32)
    xa = np.empty(kw, np.int64)
    xb = np.empty(kw, np.int64)
    cx = np.empty(wo, np.float32)
    for j in range(kw):
        off = j - pl
        xa[j] = 0 if off >= 0 else min(wo, (-off + sw - 1) // sw)
        xb[j] = max(xa[j], 0 if w - off <= 0 else min(wo, (w - off + sw - 1) // sw))
    for ox in range(wo):
        x0 = ox * sw - pl
        if include_pad:
            cx[ox] = min(x0 + kw, w + pr) - max(x0, -pl)
        else:
            cx[ox] = min(x0 + kw, w) - max(x0, 0)
    for cn in range(lo, hi):
        c = cn // n_
        n = cn - c * n_
        for oy in range(ho):
            y0 = oy * sh - pt
            ya = max(y0, 0)
            yb = min(y0 + kh, h)
            if sw == 1 and sh == 1:
                # stride 1 (Inception's 3x3 branch pools): separable -- the horizontal window
                # sums of each input row are computed once (hsum) and shared by the kh output
                # rows that read it; then kh row additions per output row
                if oy == 0:
                    for iy in range(h):
                        xr = x[c, n, iy]
                        hr_ = hsum[iy]
                        hr_[:] = 0.0
                        for j in range(kw):
                            off = j - pl
                            for ox in range(xa[j], xb[j]):
                                hr_[ox] += xr[ox + off]
                acc[:] = 0.0
                for iy in range(ya, yb):
                    hr_ = hsum[iy]
                    for ox in range(wo):
                        acc[ox] += hr_[ox]
            else:
                acc[:] = 0.0
                for iy in range(ya, yb):
                    xr = x[c, n, iy]
                    for j in range(kw):
                        off = j - pl
                        for ox in range(xa[j], xb[j]):
                            acc[ox] += xr[ox * sw + off]
            if include_pad:
                cy = np.float32(min(y0 + kh, h + pb) - max(y0, -pt))
            else:
                cy = np.float32(yb - ya)
            orow = out[c, n, oy]
            for ox in range(wo):
                orow[ox] = acc[ox] / (cy * cx[ox])


# -- pointwise (flat ranges, called per thread) ------------------------------------------------------


@njit(nogil=True, cache=True)
def act_range_cpu(x, out, code, a0, a1, lo, hi):
    """out[lo:hi] = act(x[lo:hi]), both flat contiguous."""
    _bias_act_row(out[lo:hi], x[lo:hi], np.float32(0.0), code, a0, a1)


@njit(nogil=True, cache=True)
def add_act_range_cpu(a, b, out, code, a0, a1, lo, hi):
    """out = act(a + b) on [lo, hi) of flat contiguous arrays of equal size (residual add)."""
    if code == ACT_RELU:
        for i in range(lo, hi):
            v = a[i] + b[i]
            out[i] = v if v > 0.0 else np.float32(0.0)
    elif code == ACT_NONE:
        for i in range(lo, hi):
            out[i] = a[i] + b[i]
    else:
        for i in range(lo, hi):
            out[i] = act(a[i] + b[i], code, a0, a1)


@njit(nogil=True, cache=True)
def affine_rows_cpu(x, scale, shift, out, lo, hi):
    """Per-channel scale/shift of rows lo..hi-1 of a [C, M] view (M = N*H*W)."""
    for c in range(lo, hi):
        s = scale[c]
        t = shift[c]
        xr = x[c]
        orow = out[c]
        for q in range(x.shape[1]):
            orow[q] = xr[q] * s + t


@njit(parallel=True, cache=True)
def act_cpu(x, out, code, a0, a1):
    """out = act(x), both flat contiguous."""
    for i in prange(x.size):
        out[i] = act(x[i], code, a0, a1)


@njit(parallel=True, cache=True)
def affine_cnhw_cpu(x, scale, shift, out):
    """Per-channel scale/shift of a [C, M] view (M = N*H*W)."""
    for c in prange(x.shape[0]):
        s = scale[c]
        t = shift[c]
        for q in range(x.shape[1]):
            out[c, q] = x[c, q] * s + t


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
        out[i] = act(a[i] + b[i], code, a0, a1)
