"""One-dimensional Winograd F(m, r) for r x 1 and 1 x r convolutions on CHWB-like buffers
(stride 1, dilation 1, one group): Inception's factorized 1x7 / 7x1 and 1x3 / 3x1 layers.

Why: Inception3 spends 45% of an exact explanation's multiply-adds in 1x7 / 7x1 convs and 7%
in 1x3 / 3x1 ones, all on whole 17x17 / 8x8 maps. Computed directly each output costs r
multiply-adds per input channel; F(m, r) computes m outputs along the filter's axis from
alpha = m + r - 1 inputs with alpha products per channel pair (Lavin & Gray 2016, the 1-D
case of ``winograd_cpu``'s F(2x2, 3x3)): F(4, 7) does 10 products for 28, 2.8x fewer
(2.4x on a 17-row map, whose 5 tiles compute 20 rows), F(4, 3) 2x on 8 rows. As in
the 2-D case the products over the channels are alpha independent GEMMs
``M[k] = U[k] (O x C) @ V[k] (C x columns)`` on ``gemm_cpu``'s tap GEMM.

The transforms are Toom-Cook's for the interpolation points in ``POINTS`` plus the point at
infinity: ``A^T`` (m x alpha), ``G`` (alpha x r) in closed form, ``B^T`` (alpha x alpha) the
unique solution of ``sum_t A^T[j, t] G[t, k] B^T[t, i] = [i == j + k]`` (solved in float64
and checked). Points were chosen for float32 accuracy: on a 7x1 conv of post-ReLU inputs
with 192 channels, F(4, 7) with +-3/4 as its last pair errs by 5e-6 of the largest output
against float64 (+-4: 1.9e-5; F(2, 7): 1.2e-6, but 1.2-1.35x slower on Inception3's convs);
F(4, 3) is the 1-D F(4x4, 3x3)'s, ~4x the direct error. On the zoo Inception3 the
probabilities stay within 3.7e-6 of ONNX Runtime's (1.7e-6 direct).

Layout: the filter's axis is the buffer's second one: ``buf [C, A, L, B]`` with the conv
running along A, and (L, B) one contiguous run of ``L * B`` floats per row. A 7x1 conv on a
CHWB read-in is that layout as is (A = rows, L = columns); a 1x7 conv runs on the transposed
[C, W, H, B] buffer the dense path builds (``cpu._conv_winograd1d``). GEMM column
j = (tile row t) * L * B + l, so both transforms are loops over contiguous runs.
"""

from __future__ import annotations

from functools import lru_cache

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from ..graph import ACT_NONE, ACT_RELU
from ..planner import algorithms
from . import gemm_cpu, kernels_cpu, winograd_cpu
from .transpose_cpu import T as VL
from .transpose_cpu import lanes_below, masked_ops

_NJ = dict(cache=True, nogil=True, fastmath=False)

# m per filter length, and the finite interpolation points (alpha - 1 of them)
POINTS = {
    7: (4, (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 0.75, -0.75)),
    3: (4, (0.0, 1.0, -1.0, 2.0, -2.0)),
}
# V / M scratch per column chunk and thread (floats): 4 Mi (winograd_cpu's) made ~1150-column
# chunks whose 10 V / M slots spill the L2; 1 Mi: Inception3's 17x17 1x7 / 7x1 convs 3-9%
# faster, the 8x8 ones unchanged (512 Ki: those 20% slower)
CHUNK_FLOATS = 1 << 20


@lru_cache(maxsize=None)
def transforms(m: int, r: int, points: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A^T [m, alpha], G [alpha, r], B^T [alpha, alpha]) in float64 for F(m, r)."""
    a = m + r - 1
    pts = np.asarray(points, np.float64)
    if pts.size != a - 1 or len(set(points)) != pts.size:
        raise ValueError(f"F({m}, {r}) needs {a - 1} distinct finite points, got {points}")
    at = np.zeros((m, a))
    g = np.zeros((a, r))
    for i, p in enumerate(pts):
        ni = np.prod([p - q for q in pts if q != p])
        at[:, i] = p ** np.arange(m)
        g[i] = p ** np.arange(r) / ni
    at[m - 1, a - 1] = 1.0
    g[a - 1, r - 1] = 1.0
    # sum_t AT[j, t] G[t, k] BT[t, i] = [i == j + k]: one linear system in BT's a*a entries
    coef = np.einsum("jt,tk->jkt", at, g).reshape(m * r, a)
    sys_ = np.zeros((m * r, a, a, a))  # (j, k), i, (t, i')
    for i in range(a):
        sys_[:, i, :, i] = coef
    rhs = np.zeros((m, r, a))
    for j in range(m):
        for k in range(r):
            rhs[j, k, j + k] = 1.0
    lhs = sys_.reshape(m * r * a, a * a)
    bt = np.linalg.lstsq(lhs, rhs.reshape(-1), rcond=None)[0]
    if np.abs(lhs @ bt - rhs.reshape(-1)).max() > 1e-9:
        raise ValueError(f"no Toom-Cook B^T for F({m}, {r}) with points {points}")
    bt = bt.reshape(a, a)
    bt[np.abs(bt) < 1e-12] = 0.0  # exact zeros: the transforms skip them
    return at, g, bt


# which convs run here: ``planner.algorithms.winograd1d`` (filter lengths: its
# WINOGRAD1D_TILE, whose keys ``POINTS`` must cover)
filter_axis = algorithms.winograd1d_axis
eligible = algorithms.winograd1d


def transform_filters(w4: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """W [O, C, r, 1] or [O, C, 1, r] -> (the alpha ``gemm_cpu``-packed U[k] = (G g)[k] [O, C]
    stacked [alpha, panels, C * MR], A^T and B^T as float32, whether the vector bodies apply:
    they bake in the transforms of ``POINTS`` as of import)."""
    o, c, kh, kw = w4.shape
    r = kh if kw == 1 else kw
    m, pts = POINTS[r]
    at, g, bt = transforms(m, r, pts)
    u = np.einsum("ki,oci->koc", g, w4.reshape(o, c, r).astype(np.float64))
    return gemm_cpu.pack_stack(u), at.astype(np.float32), bt.astype(np.float32), _BAKED.get(r) == (m, pts)


def linear_vec(coef: np.ndarray):
    """An intrinsic for VL lanes of ``y = coef @ x`` (coef [R, A] baked in as constants):
    ``f(src, s0, sst, dst, d0, dst_st, nl, nin, nout, bias, relu)`` reads
    x_i = src[s0 + i * sst + lane] (i < nin; rows past nin are zero and not read), writes
    act(y_k + bias) to dst[d0 + k * dst_st + lane] for k < nout, lanes < nl (masked loads and
    stores: nothing past a run's end is touched). The transforms' inner loops over the
    coefficient arrays ran as ~70 passes over each row run; this keeps the A inputs in
    registers (numba has no vector types, hence the IR, as in ``winograd_cpu``)."""
    rows, cols = coef.shape
    cf = [[float(np.float32(coef[k, i])) for i in range(cols)] for k in range(rows)]

    @intrinsic
    def vec(typingctx, src, s0, sst, dst, d0, dst_st, nl, nin, nout, bias, relu):
        sig = types.void(src, s0, sst, dst, d0, dst_st, nl, nin, nout, bias, relu)

        def codegen(context, builder, sig, args):
            src, s0, sst, dst, d0, dst_st, nl, nin, nout, bias, relu = args
            vt = ir.VectorType(ir.FloatType(), VL)
            mt = ir.VectorType(ir.IntType(1), VL)
            ld, st = masked_ops(builder)
            four = ir.Constant(ir.IntType(32), 4)
            zero = ir.Constant(vt, [0.0] * VL)
            lanes = lanes_below(builder, nl)
            none = ir.Constant(mt, [0] * VL)
            sp = context.make_array(sig.args[0])(context, builder, src).data
            dp = context.make_array(sig.args[3])(context, builder, dst).data
            xs = []
            for i in range(cols):
                mask = builder.select(builder.icmp_signed("<", ir.Constant(nin.type, i), nin), lanes, none)
                off = builder.add(s0, builder.mul(sst, ir.Constant(sst.type, i)))
                ptr = builder.bitcast(builder.gep(sp, [off]), vt.as_pointer())
                xs.append(builder.call(ld, [ptr, four, mask, zero]))
            undef = ir.Constant(vt, ir.Undefined)
            bv = builder.shuffle_vector(builder.insert_element(undef, bias, ir.Constant(ir.IntType(32), 0)), undef,
                                        ir.Constant(ir.VectorType(ir.IntType(32), VL), [0] * VL))
            use_relu = builder.icmp_signed("!=", relu, ir.Constant(relu.type, 0))
            for k in range(rows):
                acc = None
                for i in range(cols):
                    c = cf[k][i]
                    if c == 0.0:
                        continue
                    term = xs[i] if c == 1.0 else builder.fmul(ir.Constant(vt, [c] * VL), xs[i])
                    acc = term if acc is None else builder.fadd(acc, term)
                v = builder.fadd(acc if acc is not None else zero, bv)
                v = builder.select(use_relu, builder.select(builder.fcmp_ordered(">", v, zero), v, zero), v)
                with builder.if_then(builder.icmp_signed("<", ir.Constant(nout.type, k), nout)):
                    off = builder.add(d0, builder.mul(dst_st, ir.Constant(dst_st.type, k)))
                    builder.call(st, [v, builder.bitcast(builder.gep(dp, [off]), vt.as_pointer()), four, lanes])
            return context.get_dummy_value()

        return sig, codegen

    return vec


_BAKED = dict(POINTS)  # the transforms the vector bodies are built from
_AT7, _, _BT7 = transforms(POINTS[7][0], 7, POINTS[7][1])
_AT3, _, _BT3 = transforms(POINTS[3][0], 3, POINTS[3][1])
_IN7, _OUT7 = linear_vec(_BT7), linear_vec(_AT7)
_IN3, _OUT3 = linear_vec(_BT3), linear_vec(_AT3)
_A7, _A3 = _BT7.shape[0], _BT3.shape[0]


@njit(inline="always")
def _in_vec(a, src, s0, sst, dst, d0, dst_st, nl, nin):
    if a == _A7:
        _IN7(src, s0, sst, dst, d0, dst_st, nl, nin, _A7, np.float32(0.0), 0)
    else:
        _IN3(src, s0, sst, dst, d0, dst_st, nl, nin, _A3, np.float32(0.0), 0)


@njit(inline="always")
def _out_vec(a, src, s0, sst, dst, d0, dst_st, nl, nout, bias, relu):
    if a == _A7:
        _OUT7(src, s0, sst, dst, d0, dst_st, nl, _A7, nout, bias, relu)
    else:
        _OUT3(src, s0, sst, dst, d0, dst_st, nl, _A3, nout, bias, relu)


@njit(**_NJ)
def input_transform_cpu(buf, m, bt, j0, j1, vf, v0, vplane, vec):
    """vf[v0 + k * vplane + c * n + j - j0] = sum_i B^T[k, i] d_i for columns j in [j0, j1)
    (n = j1 - j0), j = t * L * B + l: d_i = buf[c, m * t + i] at flat offset l of the row
    (rows past the buffer read as 0). ``vec``: bt is the baked-in B^T of its r (``_IN7`` /
    ``_IN3``), VL lanes at a time; else loops over bt's entries."""
    nc, ha, nl, nb = buf.shape
    a = bt.shape[0]
    run = nl * nb
    n = j1 - j0
    bf = buf.reshape(-1)
    for c in range(nc):
        cb = c * ha * run
        vb = v0 + c * n
        t = j0 // run
        while t * run < j1:
            l0 = max(j0 - t * run, 0)
            l1 = min(j1 - t * run, run)
            ln = l1 - l0
            col = t * run + l0 - j0
            if vec:
                nin = min(a, ha - m * t)
                q = l0
                while q < l1:
                    _in_vec(a, bf, cb + m * t * run + q, run, vf, vb + col + q - l0, vplane, min(VL, l1 - q), nin)
                    q += VL
                t += 1
                continue
            for k in range(a):
                dst = np.uint64(vb + k * vplane + col)
                first = True
                for i in range(a):
                    cf = bt[k, i]
                    row = m * t + i
                    if cf == 0.0 or row >= ha:
                        continue
                    s = np.uint64(cb + row * run + l0)
                    if first:
                        for q in range(np.uint64(ln)):
                            vf[dst + q] = cf * bf[s + q]
                        first = False
                    else:
                        for q in range(np.uint64(ln)):
                            vf[dst + q] += cf * bf[s + q]
                if first:
                    for q in range(np.uint64(ln)):
                        vf[dst + q] = 0.0
            t += 1


@njit(**_NJ)
def output_transform_cpu(mf, m0, mplane, at, j0, j1, bias, code, a0, a1, out, vec):
    """out[o, m * t + jj, l] = act(sum_k A^T[jj, k] M[k][o, j - j0] + bias[o]) for columns
    j = t * L * B + l in [j0, j1), M[k][o][q] at mf[m0 + k * mplane + o * n + q] (rows past
    out's are dropped). ``vec``: at is the baked-in A^T (``_OUT7`` / ``_OUT3``), used for no
    activation and ReLU."""
    no, ho, nl, nb = out.shape
    m, a = at.shape
    run = nl * nb
    n = j1 - j0
    of = out.reshape(-1)
    for o in range(no):
        bo = bias[o]
        mb = m0 + o * n
        t = j0 // run
        while t * run < j1:
            l0 = max(j0 - t * run, 0)
            l1 = min(j1 - t * run, run)
            un = np.uint64(l1 - l0)
            col = t * run + l0 - j0
            if vec and code <= 1:
                nout = min(m, ho - m * t)
                q = l0
                while q < l1:
                    _out_vec(a, mf, mb + col + q - l0, mplane, of, (o * ho + m * t) * run + q, run,
                             min(VL, l1 - q), nout, bo, code)
                    q += VL
                t += 1
                continue
            for jj in range(m):
                row = m * t + jj
                if row >= ho:
                    break
                dst = np.uint64((o * ho + row) * run + l0)
                for q in range(un):
                    of[dst + q] = bo
                for k in range(a):
                    cf = at[jj, k]
                    if cf == 0.0:
                        continue
                    s = np.uint64(mb + k * mplane + col)
                    for q in range(un):
                        of[dst + q] += cf * mf[s + q]
                if code == ACT_RELU:
                    for q in range(un):
                        v = of[dst + q]
                        of[dst + q] = v if v > 0.0 else np.float32(0.0)
                elif code != ACT_NONE:
                    for q in range(un):
                        of[dst + q] = kernels_cpu.act(of[dst + q], code, a0, a1)
            t += 1


def conv(buf: np.ndarray, packed, bias: np.ndarray, act, out: np.ndarray) -> None:
    """Convolution along axis 1 (padding 0) of buf [C, A, L, B] into out [O, Ao, L, B]
    (Ao <= A - r + 1) with bias + activation; ``packed`` from ``transform_filters``."""
    filters, at, bt, vec = packed
    c = buf.shape[0]
    o, ho, nl, nb = out.shape
    if buf.shape[2:] != out.shape[2:]:
        raise ValueError(f"winograd1d: buffer {buf.shape} and output {out.shape} differ off the filter axis")
    m, a = at.shape
    code, a0, a1 = act

    def body(j0, j1, vm, sl):
        input_transform_cpu(buf, m, bt, j0, j1, vm, sl, sl, vec)
        winograd_cpu.gemms(filters, o, c, vm, sl, j1 - j0)
        output_transform_cpu(vm, 0, sl, at, j0, j1, bias, code, a0, a1, out, vec)

    winograd_cpu.run_chunks(-(-ho // m) * nl * nb, a, max(c, o), CHUNK_FLOATS, body)
