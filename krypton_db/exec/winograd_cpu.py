"""Winograd F(2x2, 3x3) convolution on CHWB buffers (3x3, stride 1, dilation 1, one group).

Why: a 3x3 convolution computed directly costs 9 multiply-adds per output per input channel;
Winograd's minimal filtering algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural
Networks", 2016) computes each 2x2 output tile from a 4x4 input tile with 16 element-wise
products per channel pair: 2.25x fewer multiplications, and the products over the channels are
16 independent GEMMs ``M[k] = U[k] (O x C) @ V[k] (C x tiles)``. VGG16 and ResNet's 3x3 convs
are most of their FLOPs (cuDNN, oneDNN and NNPACK ship the same algorithm). F(2x2, 3x3) is the
smallest variant: its transforms use only 0, +-1 and +-1/2, so it is as accurate in float32 as
the direct convolution (tests compare both with the float64 reference).

  input  V = B^T d B   (d: 4x4 input tile per channel)     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
  filter U = G g G^T   (g: 3x3 filter, once per layer)      G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]
  output Y = A^T M A   (M: the 4x4 products summed over C)  A^T = [1 1 1 0; 0 1 -1 -1]

Layout: GEMM column j = tile * B + b (queries innermost, like CHWB), so both transforms are
loops over B contiguous floats. The columns are processed in chunks sized so that V and M
([16, C or O, chunk] each) stay in the last-level cache; per chunk the 16 GEMMs run on
``gemm_cpu``'s tap GEMM with the 16 transformed filters packed once per layer.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from ..planner import algorithms
from . import gemm_cpu, kernels_cpu
from .runtime import balanced_chunks, num_threads, parallel_chunks, parallel_ranges, run_parts, scratch

_NJ = dict(cache=True, nogil=True, fastmath=False)
_MR, _KC = gemm_cpu.MR, gemm_cpu.KC  # the packed weights' panel height and K block
VL = gemm_cpu.VL  # lanes of the vector transforms (16 with AVX-512, else 8)


# The transforms' inner loops read 16 (write 16) streams of B-contiguous floats; LLVM's
# vectorizer gives up on the pointer-overlap checks that many streams need, so the vector
# bodies (VL queries at a time) are emitted as IR here, and numba loops drive them.


def _vec_ptr(builder, base, off, vt):
    return builder.bitcast(builder.gep(base, [off]), vt.as_pointer())


@intrinsic
def _in_tile_vec(typingctx, bf, r0, ub, rstride, vf, o, plane):
    """VL lanes of V = B^T d B: d[i][j] = bf[r0 + i*rstride + j*ub + lane] -> vf[o + k*plane + lane]."""
    sig = types.void(bf, r0, ub, rstride, vf, o, plane)

    def codegen(context, builder, sig, args):
        bf, r0, ub, rstride, vf, o, plane = args
        vt = ir.VectorType(ir.FloatType(), VL)
        bp = context.make_array(sig.args[0])(context, builder, bf).data
        vp = context.make_array(sig.args[4])(context, builder, vf).data
        d = [[None] * 4 for _ in range(4)]
        for i in range(4):
            row = builder.add(r0, builder.mul(rstride, ir.Constant(rstride.type, i)))
            for j in range(4):
                off = builder.add(row, builder.mul(ub, ir.Constant(ub.type, j)))
                d[i][j] = builder.load(_vec_ptr(builder, bp, off, vt), align=4)
        sub, add = builder.fsub, builder.fadd
        t = [[sub(d[0][j], d[2][j]) for j in range(4)], [add(d[1][j], d[2][j]) for j in range(4)],
             [sub(d[2][j], d[1][j]) for j in range(4)], [sub(d[1][j], d[3][j]) for j in range(4)]]
        for i in range(4):
            vals = (sub(t[i][0], t[i][2]), add(t[i][1], t[i][2]), sub(t[i][2], t[i][1]), sub(t[i][1], t[i][3]))
            for j in range(4):
                off = builder.add(o, builder.mul(plane, ir.Constant(plane.type, 4 * i + j)))
                builder.store(vals[j], _vec_ptr(builder, vp, off, vt), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _out_tile_vec(typingctx, mf, s, plane, bias, relu, of, q00, ub, rstride, full_x, full_y):
    """VL lanes of Y = A^T M A + bias (then max(., 0) when relu): M[k] = mf[s + k*plane + lane]
    -> of[q00 + i*rstride + j*ub + lane] for the cells inside the output (full_x / full_y)."""
    sig = types.void(mf, s, plane, bias, relu, of, q00, ub, rstride, full_x, full_y)

    def codegen(context, builder, sig, args):
        mf, s, plane, bias, relu, of, q00, ub, rstride, full_x, full_y = args
        vt = ir.VectorType(ir.FloatType(), VL)
        mp = context.make_array(sig.args[0])(context, builder, mf).data
        op = context.make_array(sig.args[5])(context, builder, of).data
        m = [[builder.load(_vec_ptr(builder, mp, builder.add(s, builder.mul(plane, ir.Constant(plane.type, 4 * i + j))), vt),
                           align=4) for j in range(4)] for i in range(4)]
        sub, add = builder.fsub, builder.fadd
        p = [add(add(m[0][j], m[1][j]), m[2][j]) for j in range(4)]
        r = [sub(sub(m[1][j], m[2][j]), m[3][j]) for j in range(4)]
        undef = ir.Constant(vt, ir.Undefined)
        bv = builder.shuffle_vector(builder.insert_element(undef, bias, ir.Constant(ir.IntType(32), 0)), undef,
                                    ir.Constant(ir.VectorType(ir.IntType(32), VL), [0] * VL))
        zero = ir.Constant(vt, [0.0] * VL)
        use_relu = builder.icmp_signed("!=", relu, ir.Constant(relu.type, 0))

        def finish(v):
            v = add(v, bv)
            return builder.select(use_relu, builder.select(builder.fcmp_ordered(">", v, zero), v, zero), v)

        def put(v, off):
            builder.store(finish(v), _vec_ptr(builder, op, off, vt), align=4)

        fx = builder.icmp_signed("!=", full_x, ir.Constant(full_x.type, 0))
        fy = builder.icmp_signed("!=", full_y, ir.Constant(full_y.type, 0))
        q10 = builder.add(q00, rstride)
        put(add(add(p[0], p[1]), p[2]), q00)
        with builder.if_then(fx):
            put(sub(sub(p[1], p[2]), p[3]), builder.add(q00, ub))
        with builder.if_then(fy):
            put(add(add(r[0], r[1]), r[2]), q10)
            with builder.if_then(fx):
                put(sub(sub(r[1], r[2]), r[3]), builder.add(q10, ub))
        return context.get_dummy_value()

    return sig, codegen

_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])

# V / M scratch per column chunk and thread (floats; 8 MiB): the 16 packed filters of the
# layer are read once per chunk, so chunks are as wide as this allows (240 columns at 512
# channels; 96 made the 512-channel GEMMs 25% slower). 16 MiB (480 columns) measured no
# faster in exact mode (ResNet18 2.61-2.82 vs 2.65-2.91 s, VGG16 1.78-1.96 vs 1.84-2.04 s per
# explanation, alternating processes) and held ResNet18's peak RSS 13 MB higher.
CHUNK_FLOATS = 1 << 21
# which convs run here: ``planner.algorithms.winograd_f2``
eligible = algorithms.winograd_f2


def transform_filters(w4: np.ndarray, g: np.ndarray = _G) -> np.ndarray:
    """W [O, C, 3, 3] -> the alpha^2 ``gemm_cpu``-packed matrices U[k] [O, C] (k = alpha * row
    + col of G g G^T; G [alpha, 3]: F(2x2, 3x3)'s by default, alpha = 4), computed in float64
    and written straight into ``gemm_cpu.pack_weights``' layout, stacked as [alpha^2, panels,
    C * MR] (``[k]`` is one packed U). One pass over W, rows split over the threads: per-k
    matrix products and packing copies (the previous way) cost ~125 ms per 512 x 512 conv,
    most of it in page faults of their temporaries, on the first explanation's path."""
    o, c = w4.shape[:2]
    a = g.shape[0]
    npan = -(-o // gemm_cpu.MR)
    out = np.zeros((a * a, npan, c * gemm_cpu.MR), np.float32)
    w = np.ascontiguousarray(w4, np.float32)
    gg = np.ascontiguousarray(g, np.float64)
    flat = out.reshape(a * a, -1)
    parallel_ranges(o, lambda lo, hi: _transform_pack_cpu(w, gg, npan, flat, lo, hi))
    return out


@njit(**_NJ)
def _transform_pack_cpu(w, g, npan, out, lo, hi):
    """Rows lo..hi of every U[k] = G w[i, kk] G^T (module ``transform_filters``), as
    ``pack_weights`` places them: (i, kk) of a [O, C] matrix at ((kb * KC * npan + p * kc +
    kk - kb * KC) * MR + r), p = i // MR, r = i % MR, kb = kk // KC, kc = that K block's
    depth."""
    c = w.shape[1]
    a = g.shape[0]
    t = np.empty((a, 3))
    for i in range(lo, hi):
        p = i // _MR
        r = i - p * _MR
        for kk in range(c):
            kb = kk // _KC
            kc = min(_KC, c - kb * _KC)
            off = (kb * _KC * npan + p * kc + kk - kb * _KC) * _MR + r
            for x in range(a):  # t = G w (a x 3)
                for j in range(3):
                    acc = 0.0
                    for q in range(3):
                        acc += g[x, q] * np.float64(w[i, kk, q, j])
                    t[x, j] = acc
            for x in range(a):  # U = t G^T (a x a)
                for y in range(a):
                    acc = 0.0
                    for j in range(3):
                        acc += t[x, j] * g[y, j]
                    out[x * a + y, off] = acc


@njit(**_NJ)
def gemms_cpu(filters, o, c, vm, sl, n, bp, tile):
    """The GEMMs of one column chunk (one per transformed filter: 16 here, 36 for F(4x4, 3x3),
    alpha for the 1-D ones): M[k] (slot k of ``vm``, [O, n]) = U[k] @ V[k] (slot k + 1,
    [C, n]), slots ``sl`` floats apart. One call instead of Python-level tap_gemm calls (their
    argument checks and views were ~3% of a ResNet18 explanation)."""
    zero = np.zeros(1, np.int64)
    for k in range(filters.shape[0]):
        gemm_cpu.tap_gemm_cpu(filters[k], o, vm, zero, n, (k + 1) * sl, n, vm, k * sl, n, False, bp, tile)


@njit(**_NJ)
def gemms_range_cpu(filters, o, vm, sl, n, k0, k1, first, bp, tile):
    """GEMMs k0..k1 of ``gemms_cpu``; with ``first`` non-empty, GEMM k0's M goes there ([O,
    n]) instead of slot k0: another thread may still be reading that slot (V[k0 - 1])."""
    zero = np.zeros(1, np.int64)
    for k in range(k0, k1):
        if k == k0 and first.size > 0:
            gemm_cpu.tap_gemm_cpu(filters[k], o, vm, zero, n, (k + 1) * sl, n, first, 0, n, False, bp, tile)
        else:
            gemm_cpu.tap_gemm_cpu(filters[k], o, vm, zero, n, (k + 1) * sl, n, vm, k * sl, n, False, bp, tile)


@njit(inline="always")
def _tile_span(t, ntx, nb, j0, j1):
    """Tile t's top-left input/output cell (2ty, 2tx) and its queries [b0, b1) inside the
    column range [j0, j1) (columns j = t * B + b), with the column offset of its b = 0."""
    ty = t // ntx
    return 2 * ty, 2 * (t - ty * ntx), max(j0 - t * nb, 0), min(j1 - t * nb, nb), np.uint64(t * nb - j0)


@njit(inline="always")
def _in_tile(src, r0, ub, rs, b0, b1, vf, o, plane):
    """V = B^T d B of one tile for queries [b0, b1): d[i][j] = src[r0 + i*rs + j*ub + b],
    V[k] -> vf[o + k*plane + b]; VL queries at a time, then one by one."""
    bv = b0
    while bv + VL <= b1:
        _in_tile_vec(src, r0 + np.uint64(bv), ub, rs, vf, o + np.uint64(bv), plane)
        bv += VL
    r1 = r0 + rs
    r2 = r1 + rs
    r3 = r2 + rs
    for b in range(bv, b1):
        ubb = np.uint64(b)
        d00 = src[r0 + ubb]
        d01 = src[r0 + ub + ubb]
        d02 = src[r0 + 2 * ub + ubb]
        d03 = src[r0 + 3 * ub + ubb]
        d10 = src[r1 + ubb]
        d11 = src[r1 + ub + ubb]
        d12 = src[r1 + 2 * ub + ubb]
        d13 = src[r1 + 3 * ub + ubb]
        d20 = src[r2 + ubb]
        d21 = src[r2 + ub + ubb]
        d22 = src[r2 + 2 * ub + ubb]
        d23 = src[r2 + 3 * ub + ubb]
        d30 = src[r3 + ubb]
        d31 = src[r3 + ub + ubb]
        d32 = src[r3 + 2 * ub + ubb]
        d33 = src[r3 + 3 * ub + ubb]
        # rows: B^T d
        a0 = d00 - d20
        a1 = d01 - d21
        a2 = d02 - d22
        a3 = d03 - d23
        e0 = d10 + d20
        e1 = d11 + d21
        e2 = d12 + d22
        e3 = d13 + d23
        f0 = d20 - d10
        f1 = d21 - d11
        f2 = d22 - d12
        f3 = d23 - d13
        g0 = d10 - d30
        g1 = d11 - d31
        g2 = d12 - d32
        g3 = d13 - d33
        q = o + ubb
        # columns: (.) B
        vf[q] = a0 - a2
        vf[q + plane] = a1 + a2
        vf[q + 2 * plane] = a2 - a1
        vf[q + 3 * plane] = a1 - a3
        vf[q + 4 * plane] = e0 - e2
        vf[q + 5 * plane] = e1 + e2
        vf[q + 6 * plane] = e2 - e1
        vf[q + 7 * plane] = e1 - e3
        vf[q + 8 * plane] = f0 - f2
        vf[q + 9 * plane] = f1 + f2
        vf[q + 10 * plane] = f2 - f1
        vf[q + 11 * plane] = f1 - f3
        vf[q + 12 * plane] = g0 - g2
        vf[q + 13 * plane] = g1 + g2
        vf[q + 14 * plane] = g2 - g1
        vf[q + 15 * plane] = g1 - g3


@njit(**_NJ)
def input_transform_cpu(buf, ntx, j0, j1, vf, v0, vplane):
    """vf[v0 + k * vplane + c * n + j - j0] = (B^T d B)[k] (n = j1 - j0) for columns
    j = t * B + b in [j0, j1): d = buf[c, 2ty : 2ty + 4, 2tx : 2tx + 4, b] of tile
    t = ty * ntx + tx (cells past the buffer read as 0)."""
    nc, hr, wr, nb = buf.shape
    n = j1 - j0
    bf = buf.reshape(-1)
    plane = np.uint64(vplane)
    ub = np.uint64(nb)
    rs = np.uint64(wr * nb)
    # an edge tile of an odd-sized output (4x4 window past the buffer) is copied into a
    # zero-filled 4x4 staging tile first, then runs the same vector body (7 of the 16 tiles
    # of a 7x7 map: a scalar body there cost a third of the transform)
    stage = np.zeros(16 * nb, np.float32)
    for c in range(nc):
        cb = np.uint64(c * hr * wr * nb)
        vb = np.uint64(v0 + c * n)
        t = j0 // nb
        while t * nb < j1:
            y0, x0, b0, b1, col = _tile_span(t, ntx, nb, j0, j1)
            if y0 + 4 <= hr and x0 + 4 <= wr:
                _in_tile(bf, cb + np.uint64((y0 * wr + x0) * nb), ub, rs, b0, b1, vf, vb + col, plane)
            else:
                for i in range(4):
                    for j in range(4):
                        y = y0 + i
                        x = x0 + j
                        s0 = (4 * i + j) * nb
                        if y < hr and x < wr:
                            r = c * hr * wr * nb + (y * wr + x) * nb
                            stage[s0 + b0 : s0 + b1] = bf[r + b0 : r + b1]
                        else:
                            stage[s0 + b0 : s0 + b1] = 0.0
                _in_tile(stage, np.uint64(0), ub, np.uint64(4 * nb), b0, b1, vf, vb + col, plane)
            t += 1


@njit(**_NJ)
def output_transform_cpu(mf, m0, mplane, ntx, j0, j1, bias, code, a0, a1, out):
    """out[o, 2ty + i, 2tx + j, b] = act((A^T M A)[i, j] + bias[o]) with M[k][o][j - j0] at
    mf[m0 + k * mplane + o * n + j - j0] (n = j1 - j0), for columns j = t * B + b in [j0, j1)
    (outputs past out's ho x wo are dropped)."""
    no, ho, wo, nb = out.shape
    n = j1 - j0
    of = out.reshape(-1)
    plane = np.uint64(mplane)
    ub = np.uint64(nb)
    for o in range(no):
        bo = bias[o]
        mb = np.uint64(m0 + o * n)
        ob = np.uint64(o * ho * wo * nb)
        t = j0 // nb
        while t * nb < j1:
            y0, x0, b0, b1, col = _tile_span(t, ntx, nb, j0, j1)
            full_y = y0 + 2 <= ho
            full_x = x0 + 2 <= wo
            q00 = ob + np.uint64((y0 * wo + x0) * nb)
            q10 = q00 + np.uint64(wo * nb)
            bv = b0
            if code <= 1:  # no activation or ReLU: vector bodies
                rs = np.uint64(wo * nb)
                while bv + VL <= b1:
                    ubv = np.uint64(bv)
                    _out_tile_vec(mf, mb + col + ubv, plane, bo, code, of, q00 + ubv, ub, rs, full_x, full_y)
                    bv += VL
            for b in range(bv, b1):
                ubb = np.uint64(b)
                s = mb + col + ubb
                m00 = mf[s]
                m01 = mf[s + plane]
                m02 = mf[s + 2 * plane]
                m03 = mf[s + 3 * plane]
                m10 = mf[s + 4 * plane]
                m11 = mf[s + 5 * plane]
                m12 = mf[s + 6 * plane]
                m13 = mf[s + 7 * plane]
                m20 = mf[s + 8 * plane]
                m21 = mf[s + 9 * plane]
                m22 = mf[s + 10 * plane]
                m23 = mf[s + 11 * plane]
                m30 = mf[s + 12 * plane]
                m31 = mf[s + 13 * plane]
                m32 = mf[s + 14 * plane]
                m33 = mf[s + 15 * plane]
                # rows: A^T M
                p0 = m00 + m10 + m20
                p1 = m01 + m11 + m21
                p2 = m02 + m12 + m22
                p3 = m03 + m13 + m23
                r0 = m10 - m20 - m30
                r1 = m11 - m21 - m31
                r2 = m12 - m22 - m32
                r3 = m13 - m23 - m33
                of[q00 + ubb] = kernels_cpu.act(p0 + p1 + p2 + bo, code, a0, a1)
                if full_x:
                    of[q00 + ub + ubb] = kernels_cpu.act(p1 - p2 - p3 + bo, code, a0, a1)
                if full_y:
                    of[q10 + ubb] = kernels_cpu.act(r0 + r1 + r2 + bo, code, a0, a1)
                    if full_x:
                        of[q10 + ub + ubb] = kernels_cpu.act(r1 - r2 - r3 + bo, code, a0, a1)
            t += 1


def conv(buf: np.ndarray, filters: np.ndarray, bias: np.ndarray, act, out: np.ndarray) -> None:
    """3x3 stride-1 convolution (padding 0) of buf [C, hR, wR, B] into out [O, ho, wo, B]
    (ho <= hR - 2, wo <= wR - 2) with bias + activation; ``filters`` from
    ``transform_filters``."""
    c, nb = buf.shape[0], buf.shape[3]
    o, ho, wo, _ = out.shape
    code, a0, a1 = act
    ntx = -(-wo // 2)

    def body(j0, j1, vm, sl):
        input_transform_cpu(buf, ntx, j0, j1, vm, sl, sl)
        gemms(filters, o, c, vm, sl, j1 - j0)
        output_transform_cpu(vm, 0, sl, ntx, j0, j1, bias, code, a0, a1, out)

    run_chunks(-(-ho // 2) * ntx * nb, len(filters), max(c, o), CHUNK_FLOATS, body)


# Column chunks at most this wide split their GEMMs over the threads by product (k): a few
# queries make one chunk of a few tiles (one brain-MRI VGG16 position: 64 columns in block5),
# which the column split of ``run_chunks`` leaves to one thread.
SPLIT_BY_PRODUCT_MAX_COLUMNS = 2 * gemm_cpu.NR


def gemms(filters, o: int, c: int, vm, sl: int, n: int) -> None:
    """``gemms_cpu`` with the calling thread's GEMM scratch; a thin chunk's products are
    spread over the threads (each range's first product is written apart and copied into its
    slot after the join: the slot still holds the previous range's last input)."""
    nprod = filters.shape[0]
    t = min(num_threads(), nprod)
    if t <= 1 or n > SPLIT_BY_PRODUCT_MAX_COLUMNS:
        gemms_cpu(filters, o, c, vm, sl, n, scratch("gemm_bp", gemm_cpu.KC * gemm_cpu.NC), scratch("gemm_tile", gemm_cpu.MR * gemm_cpu.NR))
        return
    bounds = [nprod * i // t for i in range(t + 1)]
    firsts = [np.empty(0, np.float32)] + [np.empty(o * n, np.float32) for _ in range(t - 1)]

    def part(i):
        gemms_range_cpu(filters, o, vm, sl, n, bounds[i], bounds[i + 1], firsts[i],
                        scratch("gemm_bp", gemm_cpu.KC * gemm_cpu.NC), scratch("gemm_tile", gemm_cpu.MR * gemm_cpu.NR))

    run_parts(part, t)
    for i in range(1, t):
        k = bounds[i]
        vm[k * sl : k * sl + o * n] = firsts[i]


def run_chunks(ncols: int, nprod: int, cmax: int, chunk_floats: int, body) -> None:
    """The Winograd drivers' common frame (2-D F(2x2) / F(4x4), 1-D F(m, r)): the ``ncols``
    GEMM columns in balanced chunks of whole micro-tiles (about ``chunk_floats`` of V / M
    scratch each), spread over the threads; ``body(j0, j1, vm, sl)`` transforms, multiplies
    and transforms back columns [j0, j1) in ``vm``: nprod + 1 slots of ``sl`` = max(C, O) x n
    floats, V[k] in slot k + 1 and M[k] in slot k (GEMM k writes over V[k - 1], which GEMM
    k - 1 has consumed: half the memory of V + M)."""

    slots = nprod + 1
    per, nchunks = balanced_chunks(ncols, max(gemm_cpu.NR, chunk_floats // (slots * cmax)), gemm_cpu.NR)

    def one(ci):
        j0 = ci * per
        j1 = min(j0 + per, ncols)
        sl = cmax * (j1 - j0)
        body(j0, j1, scratch("work", slots * cmax * per)[: slots * sl], sl)

    parallel_chunks(nchunks, one)
