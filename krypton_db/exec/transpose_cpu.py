"""Vectorized float32 transposes (and the 16-float moves around them) for the layout changes
of the CPU executors: the gather's [queries, cells] -> [cells, queries] blocks, CNHW <-> CHWB
around the dense convolutions that run on CHWB kernels (Winograd bands, phase planes, the
shifted-window GEMMs).

A 16 x 16 tile is held in sixteen 16-lane vectors and transposed by four rounds of two-source
shuffles, emitted as LLVM IR: numba has no vector types, and its scalar loops (the previous
kernels) moved 1-1.5 values per cycle; this runs at ~8 G values/s per core on the 2-core
AVX-512 target (hardware gathers, tried for the gather, reached 3.9). Ragged edges use the
same tile with masked loads / stores: no edge runs scalar, nothing past an edge is touched.
"""

from __future__ import annotations

import llvmlite.ir as ir
from numba import njit, types
from numba.extending import intrinsic

from .simd_cpu import lanes_below, masked_ops

_NJ = dict(cache=True, nogil=True, fastmath=False)

T = 16  # tile side: 16 floats per vector on AVX-512 (LLVM splits them into halves on AVX2)


def _rounds() -> list[tuple[int, list[int], list[int]]]:
    """The transpose network: in round s (s = 8, 4, 2, 1), rows i and i + s (bit s of i clear)
    swap their off-diagonal s x s blocks, i.e. row i keeps the first s lanes of every 2s-lane
    group and takes row i+s's first s lanes after them; row i+s gets the second halves. After
    the four rounds, row i holds column i. Shuffle masks index a's lanes 0..15, b's 16..31."""
    out = []
    s = T // 2
    while s >= 1:
        lo, hi = [], []
        for lane in range(T):
            g, w = divmod(lane, 2 * s)
            lo.append(g * 2 * s + w if w < s else T + g * 2 * s + w - s)
            hi.append(g * 2 * s + s + w if w < s else T + g * 2 * s + w)
        out.append((s, lo, hi))
        s //= 2
    return out


_ROUNDS = _rounds()


def _shuffle_transpose(builder, rows: list) -> list:
    """The 16 row vectors of a tile -> its 16 column vectors (``_rounds``' network)."""
    mt = ir.VectorType(ir.IntType(32), T)
    for s, lo, hi in _ROUNDS:
        new = list(rows)
        for i in range(T):
            if not i & s:
                new[i] = builder.shuffle_vector(rows[i], rows[i + s], ir.Constant(mt, lo))
                new[i + s] = builder.shuffle_vector(rows[i], rows[i + s], ir.Constant(mt, hi))
        rows = new
    return rows


@intrinsic
def _transpose16(typingctx, src, soff, sld, dst, doff, dld):
    """dst[doff + j*dld + i] = src[soff + i*sld + j] for i, j < 16 (a 16 x 16 tile; rows of
    either side at any float offset)."""
    sig = types.void(src, soff, sld, dst, doff, dld)

    def codegen(context, builder, sig, args):
        src, soff, sld, dst, doff, dld = args
        vt = ir.VectorType(ir.FloatType(), T)
        sp = builder.gep(context.make_array(sig.args[0])(context, builder, src).data, [soff])
        dp = builder.gep(context.make_array(sig.args[3])(context, builder, dst).data, [doff])
        rows = [builder.load(builder.bitcast(builder.gep(sp, [builder.mul(sld, ir.Constant(sld.type, i))]),
                                             vt.as_pointer()), align=4) for i in range(T)]
        rows = _shuffle_transpose(builder, rows)
        for i in range(T):
            ptr = builder.gep(dp, [builder.mul(dld, ir.Constant(dld.type, i))])
            builder.store(rows[i], builder.bitcast(ptr, vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _transpose16p(typingctx, src, soff, sld, dst, doff, dld, nr, nc):
    """The part i < nr, j < nc (1..16 each) of ``_transpose16``'s tile: masked loads of the
    nr source rows (lanes < nc), masked stores of the nc destination rows (lanes < nr);
    nothing outside the part is read or written."""
    sig = types.void(src, soff, sld, dst, doff, dld, nr, nc)

    def codegen(context, builder, sig, args):
        src, soff, sld, dst, doff, dld, nr, nc = args
        vt = ir.VectorType(ir.FloatType(), T)
        ld, st = masked_ops(builder)
        four = ir.Constant(ir.IntType(32), 4)
        sp = builder.gep(context.make_array(sig.args[0])(context, builder, src).data, [soff])
        dp = builder.gep(context.make_array(sig.args[3])(context, builder, dst).data, [doff])
        cols = lanes_below(builder, nc)
        last = builder.sub(nr, ir.Constant(nr.type, 1))
        rows = []
        for i in range(T):  # rows past nr repeat the last one (their lanes are never stored)
            r = builder.select(builder.icmp_signed("<", ir.Constant(nr.type, i), nr), ir.Constant(nr.type, i), last)
            ptr = builder.bitcast(builder.gep(sp, [builder.mul(sld, r)]), vt.as_pointer())
            rows.append(builder.call(ld, [ptr, four, cols, ir.Constant(vt, [0.0] * T)]))
        rows = _shuffle_transpose(builder, rows)
        lanes = lanes_below(builder, nr)
        for j in range(T):
            with builder.if_then(builder.icmp_signed("<", ir.Constant(nc.type, j), nc)):
                ptr = builder.bitcast(builder.gep(dp, [builder.mul(dld, ir.Constant(dld.type, j))]), vt.as_pointer())
                builder.call(st, [rows[j], ptr, four, lanes])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _move16(typingctx, src, soff, dst, doff, n):
    """dst[doff + l] = src[soff + l] for l < min(n, 16): one masked vector load and store."""
    sig = types.void(src, soff, dst, doff, n)

    def codegen(context, builder, sig, args):
        src, soff, dst, doff, n = args
        vt = ir.VectorType(ir.FloatType(), T)
        ld, st = masked_ops(builder)
        four = ir.Constant(ir.IntType(32), 4)
        sp = builder.bitcast(builder.gep(context.make_array(sig.args[0])(context, builder, src).data, [soff]),
                             vt.as_pointer())
        dp = builder.bitcast(builder.gep(context.make_array(sig.args[2])(context, builder, dst).data, [doff]),
                             vt.as_pointer())
        m = lanes_below(builder, n)
        builder.call(st, [builder.call(ld, [sp, four, m, ir.Constant(vt, ir.Undefined)]), dp, four, m])
        return context.get_dummy_value()

    return sig, codegen


@njit(**_NJ)
def move(src, soff, dst, doff, n):
    """dst[doff : doff + n] = src[soff : soff + n] in masked 16-float moves (numba's own loop
    over a 15-float row runs mostly in its scalar remainder)."""
    for k in range(0, n, T):
        _move16(src, soff + k, dst, doff + k, n - k)


@njit(**_NJ)
def transpose_cpu(src, soff, sld, dst, doff, dld, n, m):
    """dst[doff + j*dld + i] = src[soff + i*sld + j] for i < n, j < m: 16 x 16 tiles in
    vectors, the ragged right / bottom edges as masked partial tiles."""
    for i0 in range(0, n, T):
        nr = min(T, n - i0)
        for j0 in range(0, m, T):
            nc = min(T, m - j0)
            if nr == T and nc == T:
                _transpose16(src, soff + i0 * sld + j0, sld, dst, doff + j0 * dld + i0, dld)
            else:
                _transpose16p(src, soff + i0 * sld + j0, sld, dst, doff + j0 * dld + i0, dld, nr, nc)


@njit(**_NJ)
def cnhw_to_chwb_cpu(x, ylo, yhi, pt, pl, buf, lo, hi):
    """buf[c, r, s, n] = x[c, n, ylo + r - pt, s - pl] where 0 <= r - pt < yhi - ylo and
    0 <= s - pl < W, else 0 (channels lo..hi): rows ylo..yhi of a CNHW tensor (C-contiguous)
    as a zero-framed CHWB block [C, hR, wR, N], one [N, W] -> [W, N] transpose per row."""
    n_, h, w = x.shape[1], x.shape[2], x.shape[3]
    hr, wr = buf.shape[1], buf.shape[2]
    xf = x.reshape(-1)
    bf = buf.reshape(-1)
    rows = yhi - ylo
    if pl == 0 and wr == w:
        # no frame left or right (an r x 1 conv's read-in): the rows of a channel are one
        # [N, rows * W] -> [rows * W, N] transpose (whole 16 x 16 tiles; row by row, a
        # 17-wide map was 4 tiles per row, 3 of them masked slivers)
        for c in range(lo, hi):
            b0 = c * hr * wr * n_
            bf[b0 : b0 + pt * wr * n_] = 0.0
            bf[b0 + (pt + rows) * wr * n_ : b0 + hr * wr * n_] = 0.0
            transpose_cpu(xf, (c * n_ * h + ylo) * w, h * w, bf, b0 + pt * wr * n_, n_, n_, rows * w)
        return
    for c in range(lo, hi):
        for r in range(hr):
            b0 = (c * hr + r) * wr * n_
            y = r - pt
            if y < 0 or y >= rows:
                bf[b0 : b0 + wr * n_] = 0.0
                continue
            bf[b0 : b0 + pl * n_] = 0.0
            bf[b0 + (pl + w) * n_ : b0 + wr * n_] = 0.0
            transpose_cpu(xf, (c * n_ * h + ylo + y) * w, h * w, bf, b0 + pl * n_, n_, n_, w)


@njit(**_NJ)
def chwb_to_cnhw_cpu(y, out, oy0, lo, hi):
    """out[o, n, oy0 + r, s] = y[o, r, s, n] (channels lo..hi; both C-contiguous, y's rows a
    band of out's, full width): one [rows*W, N] -> [N, rows*W] transpose per channel."""
    rows, wo, n_ = y.shape[1], y.shape[2], y.shape[3]
    h = out.shape[2]
    p = rows * wo
    yf = y.reshape(-1)
    of = out.reshape(-1)
    for o in range(lo, hi):
        transpose_cpu(yf, o * p * n_, n_, of, o * n_ * h * wo + oy0 * wo, h * wo, p, n_)


@njit(**_NJ)
def cnhw_to_cwhb_cpu(x, pt, pl, buf, lo, hi):
    """buf[c, s, r, n] = x[c, n, r - pt, s - pl] where the source cell exists, else 0
    (channels lo..hi): a CNHW tensor (C-contiguous) as a zero-framed column-major block
    [C, wR, hR, N] (the layout of a 1 x r conv's 1-D Winograd: the filter axis outermost),
    one [N, W] -> [W, N] transpose per row."""
    n_, h, w = x.shape[1], x.shape[2], x.shape[3]
    wr, hr = buf.shape[1], buf.shape[2]
    xf = x.reshape(-1)
    bf = buf.reshape(-1)
    for c in range(lo, hi):
        for s in range(wr):
            b0 = (c * wr + s) * hr * n_
            if s < pl or s >= pl + w:
                bf[b0 : b0 + hr * n_] = 0.0
                continue
            bf[b0 : b0 + pt * n_] = 0.0
            bf[b0 + (pt + h) * n_ : b0 + hr * n_] = 0.0
        for y in range(h):
            transpose_cpu(xf, (c * n_ * h + y) * w, h * w, bf, ((c * wr + pl) * hr + pt + y) * n_, hr * n_, n_, w)


@njit(**_NJ)
def cwhb_to_cnhw_cpu(y, out, lo, hi):
    """out[o, n, r, s] = y[o, s, r, n] (channels lo..hi; both C-contiguous): the inverse
    layout change of ``cnhw_to_cwhb_cpu`` without frame, one [W, N] -> [N, W] transpose per
    output row."""
    wo, ho, n_ = y.shape[1], y.shape[2], y.shape[3]
    yf = y.reshape(-1)
    of = out.reshape(-1)
    for o in range(lo, hi):
        for r in range(ho):
            transpose_cpu(yf, (o * wo * ho + r) * n_, ho * n_, of, o * n_ * ho * wo + r * wo, ho * wo, wo, n_)
