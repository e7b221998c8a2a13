"""Our own single-threaded float32 GEMM for convolutions: ``C[M, N] (+)= W[M, K] @ B[K, N]``
where row k of B is read at an arbitrary offset of one source buffer (a "tap GEMM").

Why our own instead of OpenBLAS' ``sgemm`` (which ``blas_cpu.gemm`` binds):
- a stride-1 convolution on a zero-padded buffer is ``sum_taps W_tap @ buf[:, off_tap + q]``;
  with BLAS that is kh*kw separate calls, each re-reading and re-writing the whole output
  block (beta = 1) and each packing its own copy of the shifted input. Here the taps are just
  more rows of K (row k = (c, tap) is read at ``c * ldb + off_tap``), so a layer is ONE GEMM:
  the shifted rows are packed once per K-block into a small L1-resident strip (the im2col
  happens 48 columns at a time, never materialized) and the output is written once;
- the weight panels are packed once per layer (``pack_weights``), not on every call;
- the micro-kernel reaches the machine's FMA peak: on the 2-core AVX-512 (Zen 5) target it runs
  at 262 GFLOP/s per core from L1, where OpenBLAS 0.3.31's SkylakeX sgemm sustains 136-226 on
  the convolutions' shapes (bench/RESULTS.md, "full").

The micro-kernel is emitted as LLVM IR (``numba.extending.intrinsic``) with explicit
``<16 x float>`` vectors: numba has no vector types, and its auto-vectorizer cannot keep an
MR x NR accumulator tile in registers across the K loop (the tile would live in memory).
Layout (BLIS-style): a tile of MR = 8 output rows x NR = 48 columns (3 zmm per row, 24
accumulators); per k it loads 3 vectors of the packed B strip and broadcasts 8 weights.
Everything around it (packing, blocking, edge tiles) is plain numba.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels_cpu import bias_act_at
from .runtime import scratch
from .simd_cpu import activate_in_place, in_register



def _shape_for_host() -> tuple[int, int, int]:
    """(VL floats per vector, MR, NV): 16 x (8 x 3) with AVX-512 (32 vector registers: 24
    accumulators), else 8 x (6 x 2) (AVX2's 16 registers: 12 accumulators, the classic
    Haswell tile). ``KRYPTON_GEMM_VL=8`` forces the AVX2 shape (the tests run it in a
    subprocess with its own numba cache: numba's cache key has the host's CPU features, which
    decide the shape, but not this variable)."""
    import os

    import llvmlite.binding as llb

    vl = os.environ.get("KRYPTON_GEMM_VL")
    if vl is not None and (vl not in ("8", "16") or not os.environ.get("NUMBA_CACHE_DIR")):
        # the shape is compiled into the cached kernels, and numba's cache key does not see it
        raise ValueError(f"KRYPTON_GEMM_VL={vl!r}: allowed 8 or 16, and only with a NUMBA_CACHE_DIR "
                         "of its own (the tile shape is compiled into the cached kernels)")
    if vl is None:
        try:
            vl = "16" if "+avx512f" in llb.get_host_cpu_features().flatten() else "8"
        except RuntimeError:
            vl = "8"
    return (16, 8, 3) if vl == "16" else (8, 6, 2)


VL, MR, NV = _shape_for_host()  # floats per vector, rows per micro-tile, vectors per row
NR = VL * NV  # output columns per micro-tile
KC = 256  # K block: one packed B strip (KC x NR floats, 48 KiB at NR = 48)
NC = (768 // NR) * NR  # columns per packed B block (KC x NC floats = 768 KiB, in L2)

_NJ = dict(cache=True, nogil=True, fastmath=False)


_NO_EPILOGUE = -1  # the micro-kernel's code for "store the sums as they are"


@intrinsic
def _ukernel(typingctx, kc, a, aoff, b, boff, c, coff, ldc, accumulate, bias, bofs, code, a0, a1):
    """c[coff + i*ldc + j] (+)= sum_{k < kc} a[aoff + k*MR + i] * b[boff + k*NR + j] for i < MR,
    j < NR (accumulate != 0: add to c; else overwrite it); then, unless code is
    ``_NO_EPILOGUE``, c = act(c + bias[bofs + i]) applied in registers before the one store
    (code one of ``simd_cpu.in_register``'s; ``simd_cpu.activate_in_place``)."""
    sig = types.void(kc, a, aoff, b, boff, c, coff, ldc, accumulate, bias, bofs, code, a0, a1)

    def codegen(context, builder, sig, args):
        kc, a, aoff, b, boff, c, coff, ldc, accumulate, bias, bofs, code, a0, a1 = args
        vt = ir.VectorType(ir.FloatType(), VL)
        i64 = kc.type
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]),
                                             f"llvm.fma.v{VL}f32")
        ap = builder.gep(context.make_array(sig.args[1])(context, builder, a).data, [aoff])
        bp = builder.gep(context.make_array(sig.args[3])(context, builder, b).data, [boff])
        cp = builder.gep(context.make_array(sig.args[5])(context, builder, c).data, [coff])
        biasp = context.make_array(sig.args[9])(context, builder, bias).data
        zero = ir.Constant(vt, [0.0] * VL)
        # allocas in the entry block: mem2reg turns them into the 24 register accumulators
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(NV)] for _ in range(MR)]
        splat = ir.Constant(ir.VectorType(ir.IntType(32), VL), [0] * VL)
        undef = ir.Constant(vt, ir.Undefined)
        lane0 = ir.Constant(ir.IntType(32), 0)

        def bcast(s):
            return builder.shuffle_vector(builder.insert_element(undef, s, lane0), undef, splat)

        with cgutils.for_range(builder, kc) as loop:
            k = loop.index
            bk = builder.gep(bp, [builder.mul(k, ir.Constant(i64, NR))])
            ak = builder.gep(ap, [builder.mul(k, ir.Constant(i64, MR))])
            bv = [builder.load(builder.bitcast(builder.gep(bk, [ir.Constant(i64, VL * v)]), vt.as_pointer()),
                               align=4) for v in range(NV)]
            for i in range(MR):
                sv = bcast(builder.load(builder.gep(ak, [ir.Constant(i64, i)])))
                for v in range(NV):
                    builder.store(builder.call(fma, [sv, bv[v], builder.load(accs[i][v])]), accs[i][v])
        ptrs = [[builder.bitcast(builder.gep(builder.gep(cp, [builder.mul(ldc, ir.Constant(ldc.type, i))]),
                                             [ir.Constant(ldc.type, VL * v)]), vt.as_pointer())
                 for v in range(NV)] for i in range(MR)]
        with builder.if_then(builder.icmp_signed("!=", accumulate, ir.Constant(accumulate.type, 0))):
            for i in range(MR):
                for v in range(NV):
                    builder.store(builder.fadd(builder.load(ptrs[i][v], align=4), builder.load(accs[i][v])), accs[i][v])

        with builder.if_then(builder.icmp_signed(">=", code, ir.Constant(code.type, 0))):
            for i in range(MR):
                bi = bcast(builder.load(builder.gep(biasp, [builder.add(bofs, ir.Constant(bofs.type, i))])))
                for v in range(NV):
                    builder.store(builder.fadd(builder.load(accs[i][v]), bi), accs[i][v])
            activate_in_place(builder, [a for row in accs for a in row], code, a0, a1)
        for i in range(MR):
            for v in range(NV):
                builder.store(builder.load(accs[i][v]), ptrs[i][v], align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy_strip(typingctx, src, soff, dst, doff):
    """dst[doff : doff + NR] = src[soff : soff + NR] as NV unaligned vector moves (numba's own
    loop would not vectorize: its signed indices carry negative-index wraparound)."""
    sig = types.void(src, soff, dst, doff)

    def codegen(context, builder, sig, args):
        src, soff, dst, doff = args
        vt = ir.VectorType(ir.FloatType(), VL)
        sp = builder.gep(context.make_array(sig.args[0])(context, builder, src).data, [soff])
        dp = builder.gep(context.make_array(sig.args[2])(context, builder, dst).data, [doff])
        for v in range(NV):
            off = ir.Constant(soff.type, VL * v)
            val = builder.load(builder.bitcast(builder.gep(sp, [off]), vt.as_pointer()), align=4)
            builder.store(val, builder.bitcast(builder.gep(dp, [off]), vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def pack_weights(w: np.ndarray) -> np.ndarray:
    """W [M, K] -> MR-row panels (rows past M are zero), K-block by K-block: block kb holds
    panel p's [kc, MR] run at ``(kb * KC * npan + p * kc) * MR`` (kc = that block's depth). The
    micro-kernel reads the MR weights of one k as one contiguous run, and one K block of all
    panels is one contiguous stream. Returned as [npan, K * MR] (the flat order is the above)."""
    m, k = w.shape
    npan = -(-m // MR)
    wp = np.zeros((npan * MR, k), np.float32)
    wp[:m] = w
    blocks = [wp[:, k0 : k0 + KC].reshape(npan, MR, -1).transpose(0, 2, 1).reshape(-1) for k0 in range(0, k, KC)]
    return np.concatenate(blocks).reshape(npan, k * MR)


def pack_stack(u, n: int | None = None) -> np.ndarray:
    """``pack_weights`` of each matrix u[k] [M, K] (any float dtype), stacked as
    [n, panels, K * MR] (the Winograd transforms' filters: one packed U per product). ``u``:
    an array (n = len(u)) or a function k -> u[k] with ``n`` given, which builds one matrix
    at a time."""
    get = u if callable(u) else u.__getitem__
    n = len(u) if n is None else n
    first = pack_weights(np.ascontiguousarray(get(0), np.float32))
    out = np.empty((n,) + first.shape, np.float32)
    out[0] = first
    for k in range(1, n):
        out[k] = pack_weights(np.ascontiguousarray(get(k), np.float32))
    return out


@njit(**_NJ)
def _pack_block(src, offs, ldb, col, k0, kc, ncols, bp):
    """Pack B rows k0 .. k0+kc (row k = c * T + t is src[c * ldb + offs[t] + col :]) over
    ``ncols`` columns into NR-wide strips bp[s, kk, :NR] (columns past ncols are zero). Rows
    go in groups of 8, strip by strip: 8 sequential read streams, contiguous 8-row writes."""
    ntap = offs.shape[0]
    nfull = ncols // NR
    rem = ncols - nfull * NR
    bases = np.empty(8, np.int64)
    for g0 in range(0, kc, 8):
        g1 = min(g0 + 8, kc)
        for kk in range(g0, g1):
            k = k0 + kk
            c = k // ntap
            bases[kk - g0] = c * ldb + offs[k - c * ntap] + col
        for s in range(nfull):
            for kk in range(g0, g1):
                _copy_strip(src, bases[kk - g0] + s * NR, bp, (s * kc + kk) * NR)
        if rem:
            for kk in range(g0, g1):
                row = (nfull * kc + kk) * NR
                base = bases[kk - g0] + nfull * NR
                for j in range(rem):
                    bp[row + j] = src[base + j]
                for j in range(rem, NR):
                    bp[row + j] = 0.0


_NO_BIAS = np.zeros(0, np.float32)


@njit(**_NJ)
def tap_gemm_cpu(wp, m, src, offs, ldb, src0, ncols, out, out0, ldo, accumulate, bp, tile):
    """out[out0 + i*ldo + j] (+)= sum_k W[i, k] * src[src0 + c*ldb + offs[t] + j] for i < m,
    j < ncols, k = c * len(offs) + t, W packed by ``pack_weights``. ``bp`` (KC*NC floats) and
    ``tile`` (MR*NR) are the caller's per-thread scratch."""
    tap_gemm_act_cpu(wp, m, src, offs, ldb, src0, ncols, out, out0, ldo, accumulate, bp, tile,
                     _NO_BIAS, 0, np.float32(0.0), np.float32(0.0), False)


@njit(**_NJ)
def tap_gemm_act_cpu(wp, m, src, offs, ldb, src0, ncols, out, out0, ldo, accumulate, bp, tile,
                     bias, code, a0, a1, epi):
    """``tap_gemm_cpu``, and with ``epi`` the epilogue out = act(out + bias[i]) (``kernels_cpu``
    codes) fused in: on full micro-tiles in the micro-kernel's registers before its one store
    (``simd_cpu.in_register`` activations), else applied to each tile right after its last K
    block, while the tile is in L1 -- not a separate pass over the whole output (which had to
    come back from L2 / memory: ~6% of Inception3's whole-map 1x1 convs)."""
    npan = wp.shape[0]
    kt = wp.shape[1] // MR
    wf = wp.reshape(-1)
    # B is always packed: reading a 1x1 conv's rows where they lie (ldb apart, one map each)
    # measured 10-25% slower at K = 16..64 -- the rows alias in the L1 sets
    for c0 in range(0, ncols, NC):
        nc = min(NC, ncols - c0)
        for k0 in range(0, kt, KC):
            kc = min(KC, kt - k0)
            acc = 1 if (accumulate or k0 > 0) else 0
            last = epi and k0 + kc == kt  # the epilogue goes with this K block
            in_reg = last and in_register(code)
            _pack_block(src, offs, ldb, src0 + c0, k0, kc, nc, bp)
            for p in range(npan):
                mv = min(MR, m - p * MR)
                aoff = (k0 * npan + p * kc) * MR
                for s in range(-(-nc // NR)):
                    j0 = s * NR
                    nv = min(NR, nc - j0)
                    boff = s * kc * NR
                    full = nv == NR and mv == MR
                    if full:
                        _ukernel(kc, wf, aoff, bp, boff, out, out0 + p * MR * ldo + c0 + j0, ldo, acc,
                                 bias, p * MR, code if in_reg else _NO_EPILOGUE, a0, a1)
                    else:
                        _ukernel(kc, wf, aoff, bp, boff, tile, 0, NR, 0, bias, 0, _NO_EPILOGUE, a0, a1)
                        for i in range(mv):
                            o = out0 + (p * MR + i) * ldo + c0 + j0
                            if acc:
                                for j in range(nv):
                                    out[o + j] += tile[i * NR + j]
                            else:
                                for j in range(nv):
                                    out[o + j] = tile[i * NR + j]
                    if last and not (full and in_reg):
                        for i in range(mv):
                            o = out0 + (p * MR + i) * ldo + c0 + j0
                            bias_act_at(out, o, out, o, nv, bias[p * MR + i], code, a0, a1)


def _flat(a: np.ndarray) -> np.ndarray:
    """1-D float32 view over a 2-D view's memory, from its first element to its last (a
    contiguous one by ``reshape``, ~20x cheaper than ``as_strided``)."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    return np.lib.stride_tricks.as_strided(a, ((a.shape[0] - 1) * (a.strides[0] // 4) + a.shape[1],), (4,))


def tap_gemm(wp: np.ndarray, m: int, src: np.ndarray, offs: np.ndarray, col0: int, ncols: int,
             out: np.ndarray, accumulate: bool = False, bias=None, act=None) -> None:
    """``out[:m, :ncols] (+)= sum_{c, t} W[:, c*T + t] * src[c, col0 + offs[t] : ... + ncols]``,
    then with ``bias`` ([m] float32) ``out = act(out + bias[:, None])`` (``act``: the
    (code, a0, a1) of ``cpu.act_spec``; default none) fused into the tiles' last K block.

    src: 2-D float32 view [C, *] with unit-stride rows (row stride = ldb); out: 2-D float32
    view [m, >= ncols] with unit-stride rows; offs: int64 tap offsets (T of them, [0] for a
    plain GEMM); wp: ``pack_weights`` of W [m, C*T]."""
    assert src.dtype == np.float32 and out.dtype == np.float32 and src.strides[-1] == 4 and out.strides[-1] == 4
    if m == 0 or ncols == 0:
        return
    if col0 + int(offs.max()) + ncols > src.shape[1] or out.shape[0] < m or out.shape[1] < ncols:
        raise ValueError(f"tap_gemm: reads past src {src.shape} or writes past out {out.shape}")

    bp, tile = scratch("gemm_bp", KC * NC), scratch("gemm_tile", MR * NR)
    if act is not None and bias is None:
        raise ValueError("tap_gemm: an activation needs the bias it is fused with")
    code, a0, a1 = act if act is not None else (0, np.float32(0.0), np.float32(0.0))
    tap_gemm_act_cpu(wp, m, _flat(src), offs, src.strides[0] // 4, col0, ncols, _flat(out), 0,
                     out.strides[0] // 4, accumulate, bp, tile, _NO_BIAS if bias is None else bias,
                     code, a0, a1, bias is not None)
