"""Batched patch operators of the incremental executor, in the CHWB layout.

Why a second layout: the incremental plan runs every layer on a batch of B *small* tensors
(read-in contexts of a few cells per side). In CNHW every im2col copy would be a row of a few
floats; in CHWB (``[C, h, w, B]``, queries innermost) every copy moves B contiguous floats and
a stride-1 convolution needs no im2col at all: flattening each channel as (y, x, b), tap
(i, j) of output column (oy, x, b) reads input column (oy, x, b) + (i*dh*wR + j*dw)*B, so the
layer is kh*kw accumulated GEMMs ``W_tap[O, C] @ buf[C, off : off + ho*wR*B]`` over shifted
windows of the gathered buffer. Columns with x >= wo are computed and dropped (waste wR / wo,
e.g. 16/14 for VGG16's late layers); strided convolutions use an im2col of B-long copies.

Kernels are serial ``nogil`` numba functions over a range, run on the CPU executor's thread
pool with single-threaded BLAS (see ``kernels_cpu`` for why one pool).
"""

from __future__ import annotations

import math

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..graph import Node, Op
from ..planner.algorithms import by_phase_planes, polyphase_taps
from . import blas_cpu, gather_cpu, kernels_cpu, simd_cpu, winograd1d_cpu, winograd_cpu
from .conv_cpu import ConvWeights, conv1x1, conv_gemm
from .runtime import num_threads, parallel_chunks, parallel_ranges, scratch

_NJ = dict(cache=True, nogil=True, fastmath=False)


@njit(**_NJ)
def shift_epilogue_chwb_cpu(acc, o0, q0, q1, wr, wo, nb, b, code, a0, a1, out):
    """Write the valid columns (x < wo) of an accumulated block acc[O', q1-q0] (columns
    (oy, x, b) over a wr-wide grid; q0, q1 multiples of nb) with bias + activation into
    out[o0 + o, oy, x, :] (out C-contiguous). The valid cells of one grid row are one
    contiguous run in both, written by the vectorized ``bias_act_at``."""
    t0 = q0 // nb
    t1 = q1 // nb
    ho = out.shape[1]
    of = out.reshape(-1)
    for o in range(acc.shape[0]):
        bo = b[o0 + o]
        arow = acc[o]
        t = t0
        while t < t1:
            oy = t // wr
            x = t - oy * wr
            run = min(wr - x, t1 - t)  # grid cells of this row inside the block
            n = min(run, max(wo - x, 0))
            if n > 0:
                kernels_cpu.bias_act_at(of, (((o0 + o) * ho + oy) * wo + x) * nb, arow, (t - t0) * nb, n * nb,
                               bo, code, a0, a1)
            t += run


@njit(**_NJ)
def im2col_chwb_cpu(buf, c0, cg, kh, kw, sh, sw, dh, dw, ho, wo, p0, p1, cols):
    """cols[(c,i,j), (p - p0) * B + b] = buf[c0 + c, oy*sh + i*dh, ox*sw + j*dw, b] for output
    pixels p = oy * wo + ox in [p0, p1)."""
    nb = buf.shape[3]
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for p in range(p0, p1):
                    oy = p // wo
                    ox = p - oy * wo
                    base = (p - p0) * nb
                    src = buf[c0 + c, oy * sh + i * dh, ox * sw + j * dw]
                    for q in range(nb):
                        cols[row, base + q] = src[q]


@njit(**_NJ)
def polyphase_chwb_cpu(buf, sh, sw, phases, out, lo, hi):
    """out[c, k, y, x, b] = buf[c, y*sh + p, x*sw + q, b] for phase k = (p, q) = phases[k]
    (0 past the buffer), channels lo..hi."""
    hr, wr = buf.shape[1], buf.shape[2]
    hp, wp = out.shape[2], out.shape[3]
    for c in range(lo, hi):
        for k in range(phases.shape[0]):
            p = phases[k, 0]
            q = phases[k, 1]
            for y in range(hp):
                yy = y * sh + p
                for x in range(wp):
                    xx = x * sw + q
                    if yy < hr and xx < wr:
                        out[c, k, y, x, :] = buf[c, yy, xx, :]
                    else:
                        out[c, k, y, x, :] = 0.0


@intrinsic
def _window_dot16(typingctx, src, base, taps, ntaps, wts, woff, dst, doff, nl, bias, code, a0, a1):
    """dst[doff + l] = act(sum_t wts[woff + t] * src[base + taps[t] + l] + bias) for lanes
    l < nl (1..16), the sum in one register in tap order (as the loop it replaced); code < 0:
    the plain sum (no bias, no activation: the caller's pass applies an exp-based one). Masked
    loads and stores: nothing past lane nl is touched."""
    sig = types.void(src, base, taps, ntaps, wts, woff, dst, doff, nl, bias, code, a0, a1)

    def codegen(context, builder, sig, args):
        src, base, taps, ntaps, wts, woff, dst, doff, nl, bias, code, a0, a1 = args
        vt, ld, st, four, zero, lanes = simd_cpu.masked16(builder, nl)
        sp = context.make_array(sig.args[0])(context, builder, src).data
        tp = context.make_array(sig.args[2])(context, builder, taps).data
        wp = context.make_array(sig.args[4])(context, builder, wts).data
        dp = context.make_array(sig.args[6])(context, builder, dst).data
        undef = ir.Constant(vt, ir.Undefined)

        def bcast(x):
            return builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(ir.IntType(32), 0)), undef,
                                          ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))

        acc = cgutils.alloca_once_value(builder, zero)
        with cgutils.for_range(builder, ntaps) as loop:
            t = loop.index
            v = builder.call(ld, [builder.bitcast(builder.gep(sp, [builder.add(base, builder.load(builder.gep(tp, [t])))]),
                                                  vt.as_pointer()), four, lanes, zero])
            wv = bcast(builder.load(builder.gep(wp, [builder.add(woff, t)])))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(wv, v)), acc)
        with builder.if_then(builder.icmp_signed(">=", code, ir.Constant(code.type, 0))):
            builder.store(builder.fadd(builder.load(acc), bcast(bias)), acc)
            simd_cpu.activate_in_place(builder, [acc], code, a0, a1)
        builder.call(st, [builder.load(acc), builder.bitcast(builder.gep(dp, [doff]), vt.as_pointer()), four, lanes])
        return context.get_dummy_value()

    return sig, codegen


@njit(**_NJ)
def depthwise_chwb_cpu(buf, w, b, sh, sw, dh, dw, code, a0, a1, out, lo, hi):
    """Depthwise conv of read-in contexts buf [C, hR, wR, B] -> out [C, ho, wo, B] (channels
    lo..hi): each output cell's B queries, 16 at a time, summed over the window in one vector
    register (``_window_dot16``). The loop it replaced re-loaded and re-stored the cell once
    per tap and ran scalar below B = 64 (LLVM's vector body is 16 lanes x 4)."""
    _, hr, wr, nb = buf.shape
    ho, wo = out.shape[1], out.shape[2]
    kh, kw = w.shape[2], w.shape[3]
    bf = buf.reshape(-1)
    of = out.reshape(-1)
    wf = np.ascontiguousarray(w).reshape(-1)
    taps = np.empty(kh * kw, np.int64)
    for i in range(kh):
        for j in range(kw):
            taps[i * kw + j] = (i * dh * wr + j * dw) * nb
    fused = simd_cpu.in_register(code)
    for c in range(lo, hi):
        bc = b[c]
        for oy in range(ho):
            for ox in range(wo):
                o = ((c * ho + oy) * wo + ox) * nb
                s0 = ((c * hr + oy * sh) * wr + ox * sw) * nb
                for q0 in range(0, nb, 16):
                    n = min(16, nb - q0)
                    _window_dot16(bf, s0 + q0, taps, kh * kw, wf, c * kh * kw, of, o + q0, n, bc,
                                  code if fused else -1, a0, a1)
                    if not fused:
                        kernels_cpu.bias_act_at(of, o + q0, of, o + q0, n, bc, code, a0, a1)


# The pooling kernels: each (c, oy, ox) output cell is B contiguous queries, reduced over the
# window's taps 16 queries at a time in one vector register (``_window_reduce16``). Plain
# numba loops over the B queries ran scalar at B < 64 (LLVM's vector body there is 16 lanes x
# 4 interleaved: Inception3's batch of 27 never reached it), and the (c, oy, ox) cell was
# re-loaded and re-stored once per tap.


@intrinsic
def _window_reduce16(typingctx, src, base, taps, ntaps, dst, doff, nl, is_max, sy, yoff, sx, xoff):
    """dst[doff + l] = reduce_t src[base + taps[t] + l] for lanes l < nl (1..16): the maximum
    (is_max != 0; NaN-propagating as ``v > acc ? v : acc``) or the sum times
    sy[yoff + l] * sx[xoff + l] (the average pool's separable divisors). Masked loads and
    stores: nothing past lane nl is touched."""
    sig = types.void(src, base, taps, ntaps, dst, doff, nl, is_max, sy, yoff, sx, xoff)

    def codegen(context, builder, sig, args):
        src, base, taps, ntaps, dst, doff, nl, is_max, sy, yoff, sx, xoff = args
        vt, ld, st, four, zero, lanes = simd_cpu.masked16(builder, nl)
        sp = context.make_array(sig.args[0])(context, builder, src).data
        tp = context.make_array(sig.args[2])(context, builder, taps).data
        dp = context.make_array(sig.args[4])(context, builder, dst).data

        def load(ptr, off):
            return builder.call(ld, [builder.bitcast(builder.gep(ptr, [off]), vt.as_pointer()), four, lanes, zero])

        use_max = builder.icmp_signed("!=", is_max, ir.Constant(is_max.type, 0))
        acc = cgutils.alloca_once_value(builder, load(sp, builder.add(base, builder.load(tp))))
        with cgutils.for_range_slice(builder, ir.Constant(ntaps.type, 1), ntaps, ir.Constant(ntaps.type, 1)) as (t, _):
            v = load(sp, builder.add(base, builder.load(builder.gep(tp, [t]))))
            a = builder.load(acc)
            mx = builder.select(builder.fcmp_ordered(">", v, a), v, a)
            builder.store(builder.select(use_max, mx, builder.fadd(a, v)), acc)
        res = builder.load(acc)
        with builder.if_then(builder.not_(use_max)):
            yp = context.make_array(sig.args[8])(context, builder, sy).data
            xp = context.make_array(sig.args[10])(context, builder, sx).data
            builder.store(builder.fmul(res, builder.fmul(load(yp, yoff), load(xp, xoff))), acc)
        builder.call(st, [builder.load(acc), builder.bitcast(builder.gep(dp, [doff]), vt.as_pointer()), four, lanes])
        return context.get_dummy_value()

    return sig, codegen


@njit(**_NJ)
def _window_taps(kh, kw, wr, nb):
    taps = np.empty(kh * kw, np.int64)
    for i in range(kh):
        for j in range(kw):
            taps[i * kw + j] = (i * wr + j) * nb
    return taps


@njit(**_NJ)
def _pool_chwb(buf, kh, kw, sh, sw, is_max, inv_y, inv_x, out, lo, hi):
    _, hr, wr, nb = buf.shape
    ho, wo = out.shape[1], out.shape[2]
    bf = buf.reshape(-1)
    of = out.reshape(-1)
    iy = inv_y.reshape(-1)
    ix = inv_x.reshape(-1)
    taps = _window_taps(kh, kw, wr, nb)
    for c in range(lo, hi):
        for oy in range(ho):
            for ox in range(wo):
                o = ((c * ho + oy) * wo + ox) * nb
                s0 = ((c * hr + oy * sh) * wr + ox * sw) * nb
                for q0 in range(0, nb, 16):
                    _window_reduce16(bf, s0 + q0, taps, kh * kw, of, o + q0, min(16, nb - q0), is_max,
                                     iy, oy * nb + q0, ix, ox * nb + q0)


@njit(**_NJ)
def maxpool_chwb_cpu(buf, kh, kw, sh, sw, out, lo, hi):
    dummy = np.zeros(16, np.float32)
    _pool_chwb(buf, kh, kw, sh, sw, 1, dummy, dummy, out, lo, hi)


@njit(**_NJ)
def avgpool_chwb_cpu(buf, inv_y, inv_x, kh, kw, sh, sw, out, lo, hi):
    """Average pool over zero-filled read-in contexts; the divisor of each query's window uses
    absolute coordinates (origin rloc[q]) exactly as the full kernel does."""
    _pool_chwb(buf, kh, kw, sh, sw, 0, inv_y, inv_x, out, lo, hi)


@njit(**_NJ)
def avg_divisors_cpu(rloc, axis, n_out, stride, k, size, p0, p1, include_pad):
    """1 / (cells counted along one axis) per (output index, query): the avg-pool divisor is
    separable into a row part and a column part."""
    inv = np.empty((n_out, rloc.shape[0]), np.float32)
    for o in range(n_out):
        for q in range(rloc.shape[0]):
            st = rloc[q, axis] + o * stride
            if include_pad:
                cnt = min(st + k, size + p1) - max(st, -p0)
            else:
                cnt = min(st + k, size) - max(st, 0)
            inv[o, q] = np.float32(1.0) / np.float32(cnt)
    return inv


# -- drivers -------------------------------------------------------------------------------------


def _new(alloc, shape) -> np.ndarray:
    """A float32 buffer from ``alloc(shape)`` (the incremental executor's arena, whose pages
    are already faulted in) or a fresh array."""
    return alloc(shape) if alloc is not None else np.empty(shape, np.float32)


def gather(view, patch, ploc, rloc, size, fill, tail: int = 0, alloc=None) -> np.ndarray:
    """Read-in contexts [C, hR, wR, B] (plus ``tail`` spare floats after the last channel, for
    the shifted-window GEMM's overhang)."""
    c = view.shape[0]
    nb = ploc.shape[0]
    n = c * size[0] * size[1] * nb
    flat = _new(alloc, (n + tail,))
    out = flat[:n].reshape(c, size[0], size[1], nb)
    return gather_cpu.gather(view, patch, ploc, rloc, size, fill, out)


def stitch(view, patch, ploc, alloc=None) -> np.ndarray:
    """Full tensors [C, B, H, W] (CNHW): per query, the view with its patch pasted in."""
    c = view.shape[0]
    out = _new(alloc, (c, ploc.shape[0]) + view.shape[1:])
    return gather_cpu.stitch(view, patch, ploc, out)


SHIFT_MAX_WASTE = 0.6
SHIFT_MIN_C = 16


def conv_chwb(buf: np.ndarray, node: Node, cw: ConvWeights, act, size, alloc=None) -> np.ndarray:
    """Convolution (padding 0) of gathered read-in contexts buf [C, hR, wR, B] -> [O, ho, wo, B]."""
    p = node.params
    c, hr, wr, nb = buf.shape
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    dh, dw = p["dilation"]
    ho, wo = size
    g = p["groups"]
    o = cw.w4.shape[0]
    code, a0, a1 = act
    out = _new(alloc, (o, ho, wo, nb))
    if g == c == o and cw.w4.shape[1] == 1 and g > 1:
        parallel_ranges(c, lambda lo, hi: depthwise_chwb_cpu(buf, cw.w4, cw.bias, sh, sw, dh, dw,
                                                             code, a0, a1, out, lo, hi))
        return out
    cg, og = c // g, o // g
    if winograd_cpu.eligible(p, c, g, (ho, wo)):
        kern, filters = cw.winograd3x3(p, c, (ho, wo))  # F(4x4, 3x3) or F(2x2, 3x3)
        kern.conv(buf, filters, cw.bias, act, out)
        return out
    if winograd1d_cpu.eligible(p, c, g, (ho, wo)):
        if winograd1d_cpu.filter_axis(p) == 0:  # r x 1: the read-in is the layout the kernel runs on
            winograd1d_cpu.conv(buf, cw.winograd1d(), cw.bias, act, out)
        else:  # 1 x r: on the read-in with rows and columns swapped, and back
            yt = np.empty((o, wo, ho, nb), np.float32)
            winograd1d_cpu.conv(np.ascontiguousarray(buf.transpose(0, 2, 1, 3)), cw.winograd1d(), cw.bias, act, yt)
            out[...] = yt.transpose(0, 2, 1, 3)
        return out
    if by_phase_planes(p):
        phases, offs, hp, wp = polyphase_taps(kh, kw, sh, sw, ho, wo, nb)
        ph = _new(alloc, (c, len(phases), hp, wp, nb))
        parallel_ranges(c, lambda lo, hi: polyphase_chwb_cpu(buf, sh, sw, phases, ph, lo, hi))
        conv_rows(ph.reshape(c, -1), cw, offs, ho, wo, wp, nb, act, out.reshape(o, -1))
        return out
    if kh == kw == 1 and sh == sw == 1 and g == 1 and (hr, wr) == (ho, wo):
        # a 1x1 conv is one GEMM on the read-in as it lies, output columns written in place
        # (the shifted-window route's scratch + epilogue pass cost 1x1 patches ~2x: Inception3's
        # Mixed_6b 1x1 patch convs ran at 165-220 GFLOP/s)
        with blas_cpu.single_threaded_blas():
            conv1x1(buf.reshape(c, -1), cw, 1, act, out.reshape(o, -1))
        return out
    with blas_cpu.single_threaded_blas():
        # shifted-window GEMMs need K = C large enough for BLAS to be efficient
        if g == 1 and sh == sw == 1 and c >= SHIFT_MIN_C and (kh * kw == 1 or wr <= (1 + SHIFT_MAX_WASTE) * wo):
            _conv_shift(buf, cw, kh, kw, dh, dw, hr, wr, ho, wo, nb, act, out)
            return out
        rows = cg * kh * kw
        npix = ho * wo
        per = max(1, min(npix, (384 * 1024) // max(rows * nb, 1)))
        nchunks = -(-npix // per)
        out2 = out.reshape(o, npix * nb)

        def one(ci):
            p0 = ci * per
            p1 = min(p0 + per, npix)
            # contiguous for the last, shorter chunk too: one compiled layout of the kernel
            cols = scratch("work", rows * per * nb)[: rows * (p1 - p0) * nb].reshape(rows, (p1 - p0) * nb)
            for gi in range(g):
                im2col_chwb_cpu(buf, gi * cg, cg, kh, kw, sh, sw, dh, dw, ho, wo, p0, p1, cols)
                ys = out2[gi * og : (gi + 1) * og, p0 * nb : p1 * nb]
                conv_gemm(cw, gi, cols, (0,), 0, (p1 - p0) * nb, ys, act=act)

        parallel_chunks(nchunks, one)
    return out


def conv_rows(src, cw, offs, ho, wo, wp, nb, act, out2):
    """Output row oy of a conv over [C, *] planes whose rows are wp cells of nb floats:
    out2[:, oy*wo*nb : (oy+1)*wo*nb] = act(sum_t W_t @ src[:, oy*wp*nb + offs[t] :] + bias),
    rows spread over the threads (split into segments when the row count would leave a thread
    idle at the end: ResNet's 7 rows on 2 threads are 14 half rows, not 4 + 3 rows)."""
    t = num_threads()
    if wo * nb < GRID_MAX_ROW_COLS and (wp == wo or wp <= GRID_MAX_WASTE * wo):
        _conv_grid(src, cw, offs, ho, wo, wp, nb, act, out2)
        return
    nseg = min(t // math.gcd(ho, t), wo) if ho % t else 1
    bounds = [wo * i // nseg for i in range(nseg + 1)]

    def one(si):
        oy, k = divmod(si, nseg)
        x0, x1 = bounds[k], bounds[k + 1]
        ys = out2[:, (oy * wo + x0) * nb : (oy * wo + x1) * nb]
        conv_gemm(cw, 0, src, offs, (oy * wp + x0) * nb, (x1 - x0) * nb, ys, act=act)

    parallel_chunks(ho * nseg, one)


# Output rows shorter than this many columns (wo * B) make per-row GEMMs too narrow (ResNet18's
# strided convs: 7 or 9 cells x 64 queries ran at ~75% of the wide GEMM's rate); up to this
# overhang (wp / wo) the whole grid runs as wide GEMMs instead (see ``_conv_grid``).
GRID_MAX_ROW_COLS = 1024
GRID_MAX_WASTE = 1.12  # 10 / 9 (ResNet18 layer3.0.conv1: 1.24x faster); 8 / 7 measured even


def _conv_grid(src, cw, offs, ho, wo, wp, nb, act, out2):
    """``conv_rows`` over the whole [ho, wp] grid at once: grid column (oy, x, b) reads every
    tap at the same offsets, so a chunk of consecutive grid columns is ONE tap GEMM of any
    width; columns x >= wo (the wp - wo overhang of each row) are computed and dropped by the
    epilogue. With wp == wo nothing is dropped: a 1x1 strided conv's single phase plane is
    one plain GEMM. Chunks are whole cells, at least two per thread."""
    code, a0, a1 = act
    o = out2.shape[0]
    t = num_threads()
    cells = ho * wp - (wp - wo)  # the last row's overhang is never needed
    nch = max(2 * t, -(-cells * nb // 4096))
    nch = -(-nch // t) * t
    per = -(-cells // nch)
    nchunks = -(-cells // per)
    out = out2.reshape(o, ho, wo, nb)

    def one(ci):
        q0 = ci * per * nb
        q1 = min(q0 + per * nb, cells * nb)
        acc = scratch("work", o * (q1 - q0)).reshape(o, q1 - q0)
        conv_gemm(cw, 0, src, offs, q0, q1 - q0, acc)
        shift_epilogue_chwb_cpu(acc, 0, q0, q1, wp, wo, nb, cw.bias, code, a0, a1, out)

    parallel_chunks(nchunks, one)


def _with_tail(buf: np.ndarray, n: int) -> np.ndarray:
    """The n floats from ``buf``'s first element on, as a 1-D view of the memory ``buf`` lives
    in (the gather leaves a tail of spare floats after it) where that memory holds them, else
    a zero-padded copy. ``buf.base`` is the *owner* of the memory: an arena slab, of which
    ``buf`` may be any slice (numpy collapses view chains), so the view starts at buf's own
    offset into it, not at the owner's start."""
    base = buf.base
    if base is not None and buf.flags.c_contiguous and isinstance(base, np.ndarray) and base.dtype == np.float32 \
            and base.flags.c_contiguous:
        off, rem = divmod(buf.__array_interface__["data"][0] - base.__array_interface__["data"][0], 4)
        if rem == 0 and 0 <= off and off + n <= base.size:
            return base.reshape(-1)[off : off + n]
    flat = np.zeros(n, np.float32)
    flat[: buf.size] = buf.reshape(-1)
    return flat


def _conv_shift(buf, cw, kh, kw, dh, dw, hr, wr, ho, wo, nb, act, out):
    c = buf.shape[0]
    o = out.shape[0]
    if wr != wo and wo * nb >= SEGMENT_MIN_COLS:
        _conv_shift_rows(buf, cw, kh, kw, dh, dw, hr, wr, ho, wo, nb, act, out)
        return
    code, a0, a1 = act
    chan = hr * wr * nb
    # the gathered buffer owns a tail of spare floats after its last channel (see gather), so
    # the overhanging reads of dropped columns stay inside the allocation
    tail = (kw - 1) * dw * nb
    flat = _with_tail(buf, c * chan + tail)
    b2 = np.lib.stride_tricks.as_strided(flat, (c, chan + tail), (chan * 4, 4))
    offs = np.array([(i * dh * wr + j * dw) * nb for i in range(kh) for j in range(kw)], np.int64)
    ncols = ho * wr * nb
    qc = max(nb, min(ncols, (512 * 1024) // max(c + o, 1))) // nb * nb  # whole (oy, x) columns
    nchunks = -(-ncols // qc)

    def one(ci):
        q0 = ci * qc
        q1 = min(q0 + qc, ncols)
        acc = scratch("work", o * qc).reshape(o, qc)[:, : q1 - q0]
        conv_gemm(cw, 0, b2, offs, q0, q1 - q0, acc)
        shift_epilogue_chwb_cpu(acc, 0, q0, q1, wr, wo, nb, cw.bias, code, a0, a1, out)

    parallel_chunks(nchunks, one)


# Below this many output columns per row (wo * B) the per-row GEMMs get too narrow and the
# whole-grid variant (which computes and drops the wr - wo overhang columns) is faster.
SEGMENT_MIN_COLS = 256


def _conv_shift_rows(buf, cw, kh, kw, dh, dw, hr, wr, ho, wo, nb, act, out):
    """The shifted-window GEMMs over output-row segments: the columns (oy, x0..x1, b) of one
    output row are contiguous in the gathered buffer at every tap, so each segment's GEMMs
    read exactly the valid columns (no wr - wo overhang: 2 of 14 columns at VGG16's 12x12
    patches) and write straight into ``out`` ([O, ho, wo, B], bias + activation in place)."""
    c = buf.shape[0]
    o = out.shape[0]
    b2 = np.ascontiguousarray(buf).reshape(c, hr * wr * nb)
    out2 = out.reshape(o, ho * wo * nb)
    offs = np.array([(i * dh * wr + j * dw) * nb for i in range(kh) for j in range(kw)], np.int64)
    xc = max(1, min(wo, (512 * 1024) // max(c + o, 1) // nb))  # x cells per segment
    segs = [((oy * wr + x0) * nb, (oy * wo + x0) * nb, (min(x0 + xc, wo) - x0) * nb)
            for oy in range(ho) for x0 in range(0, wo, xc)]

    def one(si):
        s0, d0, n = segs[si]
        ys = out2[:, d0 : d0 + n]
        conv_gemm(cw, 0, b2, offs, s0, n, ys, act=act)

    parallel_chunks(len(segs), one)


def maxpool_chwb(buf, node: Node, size, alloc=None) -> np.ndarray:
    kh, kw = node.params["kernel"]
    sh, sw = node.params["stride"]
    out = _new(alloc, (buf.shape[0],) + tuple(size) + (buf.shape[3],))
    parallel_ranges(buf.shape[0], lambda lo, hi: maxpool_chwb_cpu(buf, kh, kw, sh, sw, out, lo, hi))
    return out


def avgpool_chwb(buf, node: Node, rloc, in_hw, size, alloc=None) -> np.ndarray:
    p = node.params
    t, l, b, r = p["pads"]
    out = _new(alloc, (buf.shape[0],) + tuple(size) + (buf.shape[3],))
    (kh, kw), (sh, sw) = p["kernel"], p["stride"]
    inc = bool(p.get("count_include_pad", False))
    inv_y = avg_divisors_cpu(rloc, 0, size[0], sh, kh, in_hw[0], t, b, inc)
    inv_x = avg_divisors_cpu(rloc, 1, size[1], sw, kw, in_hw[1], l, r, inc)
    parallel_ranges(buf.shape[0], lambda lo, hi: avgpool_chwb_cpu(
        buf, inv_y, inv_x, kh, kw, sh, sw, out, lo, hi))
    return out


def window_tail(node: Node, nb: int) -> int:
    """Spare floats the shifted-window conv may read past the last channel."""
    if node.op is not Op.CONV:
        return 0
    kw = node.params["kernel"][1]
    dw = node.params["dilation"][1]
    return (kw - 1) * dw * nb
