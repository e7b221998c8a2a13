"""Channels-last (NHWC) kernels for the depthwise-separable parts of a network: the 1x1
convolution as a GEMM over pixels, the depthwise convolution, a one-group conv with few taps
(RGB stems) on the 1x1's micro-kernel, a 1x1 conv fused with the depthwise conv reading it,
and the layout transposes.

Why a second layout: in CNHW a 1x1 conv with K = 16..256 input channels is a GEMM whose B
(the feature map) must be packed on every call, and packing plus the stores cost about as
much as the FMAs; a depthwise plane needs a zero-padded stage and an epilogue that drops its
garbage columns. Channels-last removes both: a 1x1 conv is ``out[P, O] = x[P, C] @ W^T[C, O]``
where the only matrix that must be packed is the (constant) weights, packed once per layer,
and the pixels' channel rows are broadcast straight from where they lie; a depthwise tap is
one vector FMA over contiguous channels, with borders handled by clipping the tap range (no
padded copy). ONNX Runtime runs these networks in its blocked NCHWc layout for the same
reason. Which steps run channels-last is the plan's decision (``planner.physical.
channels_last_steps``); this module only computes.

Arrays: a channels-last feature map is a C-contiguous float32 [N, H, W, C] array.
"""

from __future__ import annotations

from typing import NamedTuple

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .gemm_cpu import VL
from .kernels_cpu import act
from .runtime import parallel_ranges
from .simd_cpu import activate_in_place, in_register

_NJ = dict(cache=True, nogil=True, fastmath=False)

# Micro-tile of the 1x1 GEMM: MR pixels x NV vectors of output channels. Rows per tile by
# vectors (measured, AVX-512, single thread, 16..256 input channels: 6 rows reach 84-112
# GFLOP/s; 12 rows x 2 vectors fell to 40, the accumulators no longer all in registers). AVX2's
# 16 registers hold at most 12 accumulators + the weight vectors + the broadcast value.
NV_MAX = 4 if VL == 16 else 2
_ROWS = {1: 8, 2: 6, 3: 6, 4: 6} if VL == 16 else {1: 8, 2: 6, 3: 4, 4: 3}


STAGE_ROWS = max(_ROWS.values())  # rows of the staging buffers of a last, partial tile


class _Emit:
    """What both micro-kernels' code generation uses: the VL-float vector type, llvm.fma on
    it, an array argument's element pointer, a vector pointer at an offset, a broadcast."""

    def __init__(self, context, builder, sig, args):
        self.context, self.builder, self.sig, self.args = context, builder, sig, args
        self.vt = ir.VectorType(ir.FloatType(), VL)
        self.i64 = ir.IntType(64)
        self.fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vt, [self.vt] * 3),
                                                  f"llvm.fma.v{VL}f32")
        self.lane0 = ir.Constant(ir.IntType(32), 0)
        self.splat = ir.Constant(ir.VectorType(ir.IntType(32), VL), [0] * VL)

    def ptr(self, k: int, off):
        """&args[k][off] (args[k] an array)."""
        arr = self.context.make_array(self.sig.args[k])(self.context, self.builder, self.args[k])
        return self.builder.gep(arr.data, [off])

    def vec(self, ptr, off):
        return self.builder.bitcast(self.builder.gep(ptr, [off]), self.vt.as_pointer())

    def const(self, v: int):
        return ir.Constant(self.i64, v)

    def bcast(self, v):
        undef = ir.Constant(self.vt, ir.Undefined)
        return self.builder.shuffle_vector(self.builder.insert_element(undef, v, self.lane0), undef, self.splat)

    def zeros(self, n: int) -> list:
        """n vector accumulators (allocas: mem2reg keeps them in registers)."""
        return [cgutils.alloca_once_value(self.builder, ir.Constant(self.vt, [0.0] * VL)) for _ in range(n)]


def _make_pointwise_ukernel(mr: int, nv: int):
    """The micro-kernel for an ``mr`` x ``nv * VL`` tile:
    out[ooff + i*ldo + j] = act(bias[boff + j] + sum_{s < nseg, k < seglen}
        x[xoff + i*ldx + s*ldseg + k] * wp[woff + (s*seglen + k)*nr + j])
    for i < mr, j < nr = nv * VL; accumulators in registers, one store per output. A 1x1 conv
    is one segment (the pixel's channels); a kh x kw conv on a channels-last map is kh
    segments (kernel row s: kw * C contiguous floats, ``ldseg`` = one image row apart). The
    activation (``simd_cpu.in_register`` codes) is applied before the store; other codes store
    the biased sums (the caller applies them)."""
    nr = nv * VL

    @intrinsic
    def ukernel(typingctx, nseg, seglen, ldseg, x, xoff, ldx, wp, woff, out, ooff, ldo, nlast, bias, boff,
                code, a0, a1):
        sig = types.void(nseg, seglen, ldseg, x, xoff, ldx, wp, woff, out, ooff, ldo, nlast, bias, boff,
                         code, a0, a1)

        def codegen(context, builder, sig, args):
            nseg, seglen, ldseg, x, xoff, ldx, wp, woff, out, ooff, ldo, nlast, bias, boff, code, a0, a1 = args
            e = _Emit(context, builder, sig, args)
            vt, i64, fma, vec, bcast, lane0, splat = e.vt, e.i64, e.fma, e.vec, e.bcast, e.lane0, e.splat
            xp, wpp, op, bp = e.ptr(3, xoff), e.ptr(6, woff), e.ptr(8, ooff), e.ptr(12, boff)
            accs = [e.zeros(nv) for _ in range(mr)]

            with cgutils.for_range(builder, nseg) as seg:
                xs = builder.gep(xp, [builder.mul(seg.index, ldseg)])
                rows = [builder.gep(xs, [builder.mul(ldx, ir.Constant(i64, i))]) for i in range(mr)]
                ws = builder.gep(wpp, [builder.mul(builder.mul(seg.index, seglen), ir.Constant(i64, nr))])
                with cgutils.for_range(builder, seglen) as loop:
                    k = loop.index
                    wk = builder.gep(ws, [builder.mul(k, ir.Constant(i64, nr))])
                    wv = [builder.load(vec(wk, ir.Constant(i64, VL * v)), align=4) for v in range(nv)]
                    for i in range(mr):
                        xv = bcast(builder.load(builder.gep(rows[i], [k])))
                        for v in range(nv):
                            builder.store(builder.call(fma, [xv, wv[v], builder.load(accs[i][v])]), accs[i][v])
            bv = [builder.load(vec(bp, ir.Constant(i64, VL * v)), align=4) for v in range(nv)]
            for i in range(mr):
                for v in range(nv):
                    builder.store(builder.fadd(builder.load(accs[i][v]), bv[v]), accs[i][v])
            activate_in_place(builder, [a for row in accs for a in row], code, a0, a1)
            # the last vector stores its first nlast lanes only (a block ending inside a vector:
            # O = 24, 40); the lanes past them belong to the next pixel
            mt = ir.VectorType(ir.IntType(1), VL)
            mstore = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [vt, vt.as_pointer(), ir.IntType(32), mt]),
                f"llvm.masked.store.v{VL}f32.p0v{VL}f32")
            iv = ir.VectorType(i64, VL)
            nsplat = builder.shuffle_vector(builder.insert_element(ir.Constant(iv, ir.Undefined), nlast, lane0),
                                            ir.Constant(iv, ir.Undefined), splat)
            mask = builder.icmp_signed("<", ir.Constant(iv, list(range(VL))), nsplat)
            for i in range(mr):
                orow = builder.gep(op, [builder.mul(ldo, ir.Constant(i64, i))])
                for v in range(nv - 1):
                    builder.store(builder.load(accs[i][v]), vec(orow, ir.Constant(i64, VL * v)), align=4)
                builder.call(mstore, [builder.load(accs[i][nv - 1]), vec(orow, ir.Constant(i64, VL * (nv - 1))),
                                      ir.Constant(ir.IntType(32), 4), mask])
            return context.get_dummy_value()

        return sig, codegen

    return ukernel


_UK1, _UK2, _UK3, _UK4 = (_make_pointwise_ukernel(_ROWS[nv], nv) for nv in (1, 2, 3, 4))
_MR1, _MR2, _MR3, _MR4 = (_ROWS[nv] for nv in (1, 2, 3, 4))


@njit(inline="always")
def _tile(nv, nseg, seglen, ldseg, x, xoff, ldx, wp, woff, out, ooff, ldo, nlast, bias, boff, code, a0, a1):
    if nv == 4:
        _UK4(nseg, seglen, ldseg, x, xoff, ldx, wp, woff, out, ooff, ldo, nlast, bias, boff, code, a0, a1)
    elif nv == 3:
        _UK3(nseg, seglen, ldseg, x, xoff, ldx, wp, woff, out, ooff, ldo, nlast, bias, boff, code, a0, a1)
    elif nv == 2:
        _UK2(nseg, seglen, ldseg, x, xoff, ldx, wp, woff, out, ooff, ldo, nlast, bias, boff, code, a0, a1)
    else:
        _UK1(nseg, seglen, ldseg, x, xoff, ldx, wp, woff, out, ooff, ldo, nlast, bias, boff, code, a0, a1)


@njit(inline="always")
def _rows_of(nv):
    if nv == 4:
        return _MR4
    if nv == 3:
        return _MR3
    if nv == 2:
        return _MR2
    return _MR1


class PointwiseWeights:
    """A 1x1 conv's weights for ``pointwise_nhwc``: W^T [C, O] cut into column blocks of up to
    ``NV_MAX * VL`` output channels, each block stored k-major ([C, block width], contiguous),
    the blocks one after another in ``packed``; ``blocks`` rows are (first channel, vectors,
    offset in ``packed``, output channels stored). A last block ending inside a vector (O =
    24, 40: EfficientNet) is zero-padded to whole vectors; its last vector is stored masked
    (the lanes past O would overwrite the next pixel's channels). ``bias`` is padded alike."""

    def __init__(self, w: np.ndarray, bias: np.ndarray):
        o, c = w.shape[0], w.shape[1]
        opad = -(-o // VL) * VL
        wt = np.zeros((c, opad), np.float32)
        wt[:, :o] = np.asarray(w, np.float32).reshape(o, c).T  # [C, O]
        parts, rows, off, o0 = [], [], 0, 0
        while o0 < opad:
            nv = min(NV_MAX, (opad - o0) // VL)
            parts.append(np.ascontiguousarray(wt[:, o0 : o0 + nv * VL]).reshape(-1))
            rows.append((o0, nv, off, min(nv * VL, o - o0)))
            off += c * nv * VL
            o0 += nv * VL
        self.packed = np.concatenate(parts)
        self.blocks = np.array(rows, np.int64)
        self.bias = np.zeros(opad, np.float32)
        self.bias[:o] = np.asarray(bias, np.float32)
        self.c, self.o = c, o


@njit(inline="always")
def _unstage(out, base, o, otmp, nr, width, rows):
    """out[base + i*o : ... + width] = otmp[i*nr : ... + width] for i < rows."""
    for i in range(rows):
        out[base + i * o : base + i * o + width] = otmp[i * nr : i * nr + width]


_PIXELS_PER_CHUNK = 96  # pixel rows of x kept in L1 / L2 while every column block runs over them


@njit(**_NJ)
def pointwise_nhwc_cpu(x, c, packed, blocks, bias, code, a0, a1, lo, hi, out, o, xtmp, otmp):
    """out[p, :] = act(x[p, :] @ W^T + bias) for pixels p in [lo, hi); x, out flat [P * c],
    [P * o]. ``xtmp`` (STAGE_ROWS * c floats) and ``otmp`` (STAGE_ROWS * NV_MAX * VL) stage a
    last group of fewer than MR pixels (rows past the range are zero)."""
    post = not in_register(code)
    for p0 in range(lo, hi, _PIXELS_PER_CHUNK):
        p1 = min(hi, p0 + _PIXELS_PER_CHUNK)
        for b in range(blocks.shape[0]):
            o0, nv, woff, width = blocks[b, 0], blocks[b, 1], blocks[b, 2], blocks[b, 3]
            mr = _rows_of(nv)
            nr = nv * VL
            p = p0
            nlast = width - (nv - 1) * VL
            while p + mr <= p1:
                _tile(nv, 1, c, 0, x, p * c, c, packed, woff, out, p * o + o0, o, nlast, bias, o0, code, a0, a1)
                p += mr
            if p < p1:
                rem = p1 - p
                xtmp[: mr * c] = 0.0
                xtmp[: rem * c] = x[p * c : p1 * c]
                _tile(nv, 1, c, 0, xtmp, 0, c, packed, woff, otmp, 0, nr, VL, bias, o0, code, a0, a1)
                _unstage(out, p * o + o0, o, otmp, nr, width, rem)
        if post:
            for q in range(p0 * o, p1 * o):
                out[q] = act(out[q], code, a0, a1)


def pointwise_nhwc(x: np.ndarray, pw: PointwiseWeights, act_spec, out: np.ndarray) -> np.ndarray:
    """1x1 stride-1 conv of a channels-last map x [N, H, W, C] into out [N, H, W, O], bias and
    activation (``cpu.act_spec``) fused; pixels split over the threads."""
    n, h, w, c = x.shape
    if c != pw.c or out.shape != (n, h, w, pw.o):
        raise ValueError(f"pointwise_nhwc: input {x.shape} / output {out.shape} do not match weights "
                         f"[{pw.o}, {pw.c}]")
    code, a0, a1 = act_spec
    xf, of = x.reshape(-1), out.reshape(-1)

    def part(lo, hi):
        xtmp = np.empty(STAGE_ROWS * c, np.float32)
        otmp = np.empty(STAGE_ROWS * NV_MAX * VL, np.float32)
        pointwise_nhwc_cpu(xf, c, pw.packed, pw.blocks, pw.bias, code, a0, a1, lo, hi, of, pw.o, xtmp, otmp)

    parallel_ranges(n * h * w, part, 64)
    return out


# -- depthwise ---------------------------------------------------------------------------------

DW_R = 8  # output pixels per depthwise micro-kernel call (8 accumulators + kw weights + 1 input)


def _make_depthwise_ukernel(kw: int, sw: int):
    """The depthwise micro-kernel of a kw-wide window at column stride sw: for one vector of
    VL channels and a block of DW_R output pixels of one row,
    out[ooff + r*ldpix] = act(bias + sum_{i < nrows, j < kw} x[xoff + i*ldrow + (r*sw + j)*ldpix]
    * w[woff + i*ldwrow + j*ldpix]) for r < nout. Input columns u = r*sw + j outside [ulo, uhi)
    are padding: skipped, never loaded. Each loaded input vector feeds every output of the
    block it falls in (up to kw FMAs); the kw weights of a kernel row stay in registers."""
    ncols = (DW_R - 1) * sw + kw

    @intrinsic
    def ukernel(typingctx, x, xoff, ldrow, nrows, w, woff, ldwrow, ldpix, out, ooff, ulo, uhi, nout,
                bias, boff, code, a0, a1):
        sig = types.void(x, xoff, ldrow, nrows, w, woff, ldwrow, ldpix, out, ooff, ulo, uhi, nout,
                         bias, boff, code, a0, a1)

        def codegen(context, builder, sig, args):
            (x, xoff, ldrow, nrows, w, woff, ldwrow, ldpix, out, ooff, ulo, uhi, nout,
             bias, boff, code, a0, a1) = args
            e = _Emit(context, builder, sig, args)
            fma, vec, const = e.fma, e.vec, e.const
            xp, wp, op, bp = e.ptr(0, xoff), e.ptr(4, woff), e.ptr(8, ooff), e.ptr(13, boff)
            accs = e.zeros(DW_R)

            with cgutils.for_range(builder, nrows) as loop:
                i = loop.index
                xr = builder.gep(xp, [builder.mul(i, ldrow)])
                wr = builder.gep(wp, [builder.mul(i, ldwrow)])
                wv = [builder.load(vec(wr, builder.mul(const(j), ldpix)), align=4) for j in range(kw)]
                for u in range(ncols):
                    uu = const(u)
                    inside = builder.and_(builder.icmp_signed(">=", uu, ulo), builder.icmp_signed("<", uu, uhi))
                    with builder.if_then(inside):
                        xv = builder.load(vec(xr, builder.mul(uu, ldpix)), align=4)
                        for j in range(kw):
                            if (u - j) % sw == 0 and 0 <= (u - j) // sw < DW_R:
                                a = accs[(u - j) // sw]
                                builder.store(builder.call(fma, [xv, wv[j], builder.load(a)]), a)
            bv = builder.load(vec(bp, const(0)), align=4)
            for a in accs:
                builder.store(builder.fadd(builder.load(a), bv), a)
            activate_in_place(builder, accs, code, a0, a1)
            for r, a in enumerate(accs):
                with builder.if_then(builder.icmp_signed("<", const(r), nout)):
                    builder.store(builder.load(a), vec(op, builder.mul(const(r), ldpix)), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return ukernel


_DW31, _DW32, _DW51, _DW52 = (_make_depthwise_ukernel(k, s) for k, s in ((3, 1), (3, 2), (5, 1), (5, 2)))


@njit(inline="always")
def _dw_block(kw, sw, x, xoff, ldrow, nrows, w, woff, ldwrow, ldpix, out, ooff, ulo, uhi, nout,
              bias, boff, code, a0, a1):
    if kw == 3 and sw == 1:
        _DW31(x, xoff, ldrow, nrows, w, woff, ldwrow, ldpix, out, ooff, ulo, uhi, nout, bias, boff, code, a0, a1)
    elif kw == 3:
        _DW32(x, xoff, ldrow, nrows, w, woff, ldwrow, ldpix, out, ooff, ulo, uhi, nout, bias, boff, code, a0, a1)
    elif sw == 1:
        _DW51(x, xoff, ldrow, nrows, w, woff, ldwrow, ldpix, out, ooff, ulo, uhi, nout, bias, boff, code, a0, a1)
    else:
        _DW52(x, xoff, ldrow, nrows, w, woff, ldwrow, ldpix, out, ooff, ulo, uhi, nout, bias, boff, code, a0, a1)


@njit(**_NJ)
def depthwise_nhwc_cpu(x, w, bias, hh, ww, c, kh, kw, sh, sw, pt, pl, ho, wo, code, a0, a1, lo, hi, out):
    """Depthwise conv (multiplier 1, no dilation) of a channels-last map (x flat [N*H*W*C])
    with w flat [kh, kw, C]: output rows r in [lo, hi) of the N * Ho rows of out (flat
    [N*Ho*Wo*C]). Taps on the padding are skipped (kernel rows clipped per output row,
    columns per block), so no padded copy exists. 3- and 5-wide windows at column stride 1 or
    2 with C a multiple of VL run the micro-kernel; anything else a plain loop per pixel and
    tap."""
    post = not in_register(code)
    fast = c % VL == 0 and ((kw == 3 or kw == 5) and (sw == 1 or sw == 2))
    for r in range(lo, hi):
        n = r // ho
        oh = r - n * ho
        ih0 = oh * sh - pt
        i0 = max(0, -ih0)
        i1 = min(kh, hh - ih0)
        xrow = ((n * hh + ih0 + i0) * ww) * c
        orow = (n * ho + oh) * wo * c
        if fast:
            for ow0 in range(0, wo, DW_R):
                iw0 = ow0 * sw - pl
                nout = min(DW_R, wo - ow0)
                for cv in range(0, c, VL):
                    _dw_block(kw, sw, x, xrow + iw0 * c + cv, ww * c, i1 - i0, w, i0 * kw * c + cv, kw * c, c,
                              out, orow + ow0 * c + cv, -iw0, ww - iw0, nout, bias, cv, code, a0, a1)
        else:
            for ow in range(wo):
                iw0 = ow * sw - pl
                j0 = max(0, -iw0)
                j1 = min(kw, ww - iw0)
                o = orow + ow * c
                for q in range(c):
                    out[o + q] = 0.0
                for i in range(i0, i1):
                    for j in range(j0, j1):
                        xo = xrow + ((i - i0) * ww + iw0 + j) * c
                        wo_ = (i * kw + j) * c
                        for q in range(c):
                            out[o + q] += x[xo + q] * w[wo_ + q]
                for q in range(c):
                    out[o + q] = out[o + q] + bias[q]
        if post or not fast:  # activations the micro-kernel does not apply in registers
            for q in range(orow, orow + wo * c):
                out[q] = act(out[q], code, a0, a1)


def depthwise_nhwc(x: np.ndarray, dw: DepthwiseWeights, stride, pads, act_spec, out: np.ndarray) -> np.ndarray:
    """Depthwise conv of channels-last x [N, H, W, C] into out [N, Ho, Wo, C]; ``pads`` (top,
    left, ...), bias and activation fused; output rows split over the threads."""
    w_hwc, bias = dw
    code, a0, a1 = act_spec
    n, h, w, c = x.shape
    kh, kw = w_hwc.shape[0], w_hwc.shape[1]
    ho, wo = out.shape[1], out.shape[2]
    xf, wf, of = x.reshape(-1), w_hwc.reshape(-1), out.reshape(-1)
    parallel_ranges(n * ho, lambda lo, hi: depthwise_nhwc_cpu(
        xf, wf, bias, h, w, c, kh, kw, stride[0], stride[1], pads[0], pads[1], ho, wo, code, a0, a1,
        lo, hi, of), 2)
    return out


# -- a 1x1 conv and the depthwise conv reading it, fused ----------------------------------------


@njit(**_NJ)
def pointwise_depthwise_nhwc_cpu(x, c, packed, blocks, pbias, pcode, pa0, pa1, w, dbias, hh, ww, e,
                                 kh, kw, sh, sw, pt, pl, ho, wo, dcode, da0, da1, lo, hi, out,
                                 ring, tags, xtmp, otmp):
    """A 1x1 conv (x flat [N*H*W*c] -> e channels, ``PointwiseWeights`` arrays, activation
    pcode) and the depthwise conv reading it (taps w flat [kh, kw, e], activation dcode):
    output rows r in [lo, hi) of the depthwise conv's N * Ho rows of out. The 1x1 conv's
    output rows live only in ``ring`` (2 * kh rows of W * e floats, L2-sized): row ih of
    image n is computed once, when the first output row needing it comes, into slot ih % kh
    and copied to slot ih % kh + kh, so any kh consecutive rows lie contiguous from slot
    (first row) % kh on, as the depthwise micro-kernel reads them. ``tags[slot]`` holds
    n * H + ih of the row in it (-1: none)."""
    row = ww * e
    tags[:] = -1
    dpost = not in_register(dcode)
    for r in range(lo, hi):
        n = r // ho
        oh = r - n * ho
        ih0 = oh * sh - pt
        a = max(0, ih0)
        b = min(hh, ih0 + kh)
        for ih in range(a, b):
            slot = ih % kh
            key = n * hh + ih
            if tags[slot] != key:
                p0 = key * ww
                pointwise_nhwc_cpu(x[p0 * c : (p0 + ww) * c], c, packed, blocks, pbias, pcode, pa0, pa1, 0, ww,
                                   ring[slot * row : (slot + 1) * row], e, xtmp, otmp)
                ring[(slot + kh) * row : (slot + kh + 1) * row] = ring[slot * row : (slot + 1) * row]
                tags[slot] = key
        start = (a % kh) * row
        i0 = a - ih0
        orow = r * wo * e
        for ow0 in range(0, wo, DW_R):
            iw0 = ow0 * sw - pl
            for cv in range(0, e, VL):
                _dw_block(kw, sw, ring, start + iw0 * e + cv, row, b - a, w, i0 * kw * e + cv, kw * e, e,
                          out, orow + ow0 * e + cv, -iw0, ww - iw0, min(DW_R, wo - ow0), dbias, cv, dcode, da0, da1)
        if dpost:
            for q in range(orow, orow + wo * e):
                out[q] = act(out[q], dcode, da0, da1)


def pointwise_depthwise_nhwc(x: np.ndarray, pw: PointwiseWeights, pw_act, dw: "DepthwiseWeights", stride, pads,
                             dw_act, out: np.ndarray) -> np.ndarray:
    """depthwise(1x1(x)) of a channels-last map x [N, H, W, C] into out [N, Ho, Wo, E]
    (``PhysicalPlan.pointwise_depthwise``): the 1x1 conv's output never exists whole; each
    thread keeps the rows its depthwise rows read in an L2-sized ring. The sums are the
    unfused convs' bit for bit (the same micro-kernels on the same values)."""
    n, h, w, c = x.shape
    e = pw.o
    w_hwc, dbias = dw
    kh, kw = w_hwc.shape[0], w_hwc.shape[1]
    ho, wo = out.shape[1], out.shape[2]
    if c != pw.c or w_hwc.shape[2] != e or out.shape != (n, ho, wo, e) or e % VL:
        raise ValueError(f"pointwise_depthwise_nhwc: input {x.shape}, 1x1 [{e}, {pw.c}], depthwise "
                         f"{w_hwc.shape}, output {out.shape} do not match")
    pcode, pa0, pa1 = pw_act
    dcode, da0, da1 = dw_act
    xf, wf, of = x.reshape(-1), w_hwc.reshape(-1), out.reshape(-1)

    def part(lo, hi):
        ring = np.empty(2 * kh * w * e, np.float32)
        tags = np.empty(kh, np.int64)
        xtmp = np.empty(STAGE_ROWS * c, np.float32)
        otmp = np.empty(STAGE_ROWS * NV_MAX * VL, np.float32)
        pointwise_depthwise_nhwc_cpu(xf, c, pw.packed, pw.blocks, pw.bias, pcode, pa0, pa1, wf, dbias, h, w, e,
                                     kh, kw, stride[0], stride[1], pads[0], pads[1], ho, wo, dcode, da0, da1,
                                     lo, hi, of, ring, tags, xtmp, otmp)

    parallel_ranges(n * ho, part, 2)
    return out


class DepthwiseWeights(NamedTuple):
    taps: np.ndarray  # [kh, kw, C]: one contiguous channel vector per tap
    bias: np.ndarray

    @classmethod
    def of(cls, w4: np.ndarray, bias: np.ndarray) -> "DepthwiseWeights":
        """From the conv's [C, 1, kh, kw] weights."""
        return cls(np.ascontiguousarray(np.asarray(w4, np.float32)[:, 0].transpose(1, 2, 0)),
                   np.ascontiguousarray(bias, np.float32))


# -- one-group convolution with few taps (the RGB stems) --------------------------------------


class DirectConvWeights(PointwiseWeights):
    """A one-group conv's weights [O, C, kh, kw] as GEMM weights over the taps in
    channels-last order (K row = (kernel row, kernel column, channel))."""

    def __init__(self, w4: np.ndarray, bias: np.ndarray):
        o = w4.shape[0]
        super().__init__(np.ascontiguousarray(np.asarray(w4, np.float32).transpose(0, 2, 3, 1)).reshape(o, -1), bias)


@njit(**_NJ)
def conv_direct_nhwc_cpu(x, hh, ww, c, kh, kw, sh, sw, pt, pl, ho, wo, packed, blocks, bias, o,
                       code, a0, a1, lo, hi, out, xtmp, otmp):
    """One-group conv of a channels-last map (x flat [N*H*W*C]) for output rows r in [lo, hi)
    of the N * Ho rows of out (flat [N*Ho*Wo*O]). Output pixels whose window lies inside
    the map columns run the GEMM micro-kernel straight on the input (one segment per kernel
    row inside the map: kw * C contiguous floats); the others (left / right borders, a last
    partial tile) have their im2col rows staged in ``xtmp`` with zeros on the padding."""
    kfull = kh * kw * c
    seglen = kw * c
    owa = min(wo, (pl + sw - 1) // sw)  # first output column whose window starts inside
    owb = max(owa, min(wo, (ww - kw + pl) // sw + 1))  # past the last one ending inside
    post = not in_register(code)
    for r in range(lo, hi):
        n = r // ho
        oh = r - n * ho
        ih0 = oh * sh - pt
        i0 = max(0, -ih0)
        i1 = min(kh, hh - ih0)
        xrow = ((n * hh + ih0 + i0) * ww) * c
        orow = r * wo * o
        for b in range(blocks.shape[0]):
            o0, nv, woff, width = blocks[b, 0], blocks[b, 1], blocks[b, 2], blocks[b, 3]
            mr = _rows_of(nv)
            nr = nv * VL
            ow = owa
            while ow + mr <= owb:
                _tile(nv, i1 - i0, seglen, ww * c, x, xrow + (ow * sw - pl) * c, sw * c, packed,
                      woff + i0 * seglen * nr, out, orow + ow * o + o0, o, width - (nv - 1) * VL, bias, o0,
                      code, a0, a1)
                ow += mr
            # the rest, staged: columns [0, owa), [ow, wo)
            nrest = owa + (wo - ow)
            for g0 in range(0, nrest, mr):
                g1 = min(nrest, g0 + mr)
                xtmp[: mr * kfull] = 0.0
                for t in range(g0, g1):
                    col = t if t < owa else ow + (t - owa)
                    iw0 = col * sw - pl
                    for i in range(i0, i1):
                        for j in range(kw):
                            iw = iw0 + j
                            if 0 <= iw < ww:
                                src = ((n * hh + ih0 + i) * ww + iw) * c
                                dst = (t - g0) * kfull + (i * kw + j) * c
                                xtmp[dst : dst + c] = x[src : src + c]
                _tile(nv, 1, kfull, 0, xtmp, 0, kfull, packed, woff, otmp, 0, nr, VL, bias, o0, code, a0, a1)
                for t in range(g0, g1):
                    col = t if t < owa else ow + (t - owa)
                    d = orow + col * o + o0
                    out[d : d + width] = otmp[(t - g0) * nr : (t - g0) * nr + width]
        if post:
            for q in range(orow, orow + wo * o):
                out[q] = act(out[q], code, a0, a1)


def conv_direct_nhwc(x: np.ndarray, pw: DirectConvWeights, params: dict, act_spec, out: np.ndarray) -> np.ndarray:
    """A one-group conv (``DirectConvWeights``) of channels-last x [N, H, W, C] into out
    [N, Ho, Wo, O], bias and activation fused; output rows split over the threads."""
    n, h, w, c = x.shape
    kh, kw = params["kernel"]
    sh, sw = params["stride"]
    t, l = params["pads"][:2]
    ho, wo = out.shape[1], out.shape[2]
    code, a0, a1 = act_spec
    xf, of = x.reshape(-1), out.reshape(-1)

    def part(lo, hi):
        xtmp = np.empty(STAGE_ROWS * pw.c, np.float32)
        otmp = np.empty(STAGE_ROWS * NV_MAX * VL, np.float32)
        conv_direct_nhwc_cpu(xf, h, w, c, kh, kw, sh, sw, t, l, ho, wo, pw.packed, pw.blocks, pw.bias, pw.o,
                           code, a0, a1, lo, hi, of, xtmp, otmp)

    parallel_ranges(n * ho, part, 2)
    return out


# -- layout transposes -------------------------------------------------------------------------
# (plain loops, one image row per iteration, channel-outer: each source row is read once,
# contiguously, and its scatter stays inside one L1-resident output row; measured 2-5x faster
# than numpy's transposed copy and than channel-inner or 16x16-tiled forms)


@njit(**_NJ)
def _cnhw_to_nhwc_rows(x, out, lo, hi):
    """out[n, y, :, c] = x[c, n, y, :] for image rows r = n * H + y in [lo, hi) (x may be a
    transposed view of an NCHW batch)."""
    c_, n_, hh, ww = x.shape
    for r in range(lo, hi):
        n = r // hh
        y = r - n * hh
        o = out[n, y]
        for c in range(c_):
            src = x[c, n, y]
            for q in range(ww):
                o[q, c] = src[q]


@njit(**_NJ)
def _nhwc_to_cnhw_rows(x, out, lo, hi):
    n_, hh, ww, c_ = x.shape
    for r in range(lo, hi):
        n = r // hh
        y = r - n * hh
        src = x[n, y]
        for c in range(c_):
            o = out[c, n, y]
            for q in range(ww):
                o[q] = src[q, c]


def cnhw_to_nhwc(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """[C, N, H, W] -> [N, H, W, C], image rows split over the threads."""
    parallel_ranges(x.shape[1] * x.shape[2], lambda lo, hi: _cnhw_to_nhwc_rows(x, out, lo, hi), 4)
    return out


def nchw_to_nhwc(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """A model's NCHW batch [N, C, H, W] -> [N, H, W, C]."""
    return cnhw_to_nhwc(x.transpose(1, 0, 2, 3), out)


def nhwc_to_cnhw(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """[N, H, W, C] -> [C, N, H, W], image rows split over the threads."""
    parallel_ranges(x.shape[0] * x.shape[1], lambda lo, hi: _nhwc_to_cnhw_rows(x, out, lo, hi), 4)
    return out
