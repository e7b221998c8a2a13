"""The incremental executor's gather: read-in contexts in the CHWB layout, at memory speed.

``out[c, r, s, q]`` is cell ``rloc[q] + (r, s)`` of ``view[c]`` -- or, where that cell lies in
query q's patch, the patch's value there -- and ``fill`` outside the tensor. The queries sit
at unrelated places in the view, so the B values of one output cell come from B unrelated
addresses: the gather is a transpose at heart. Per channel:

1. each query's read-in rows are copied from the (fill-padded) view into a [B, hR*wR] block
   (contiguous row copies, no bounds tests: the padding holds the fill), skipping the cells
   its patch covers;
2. the patch channel [ph*pw, B] is transposed to [B, ph*pw] and each query's patch rows are
   copied over its read-in (contiguous again);
3. the block is transposed into ``out[c]`` ([hR*wR, B]).

The transposes run on 16 x 16 tiles held in sixteen 16-lane vectors (four rounds of two-source
shuffles, emitted as LLVM IR: numba has no vector types, and its scalar transpose loop, the
previous kernel, moved 1-1.5 values per cycle). Measured on the 2-core AVX-512 target: 8 G
values/s per core for the transpose; hardware gathers (``vgatherdps``, tried first) reached
3.9 G/s, no better than the scalar kernel on real batches.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from .cpu import _scratch, parallel_ranges

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


@intrinsic
def _transpose16(typingctx, src, soff, sld, dst, doff, dld):
    """dst[doff + j*dld + i] = src[soff + i*sld + j] for i, j < 16 (a 16 x 16 tile; rows of
    either side at any float offset)."""
    sig = types.void(src, soff, sld, dst, doff, dld)

    def codegen(context, builder, sig, args):
        src, soff, sld, dst, doff, dld = args
        vt = ir.VectorType(ir.FloatType(), T)
        mt = ir.VectorType(ir.IntType(32), T)
        sp = builder.gep(context.make_array(sig.args[0])(context, builder, src).data, [soff])
        dp = builder.gep(context.make_array(sig.args[3])(context, builder, dst).data, [doff])
        rows = [builder.load(builder.bitcast(builder.gep(sp, [builder.mul(sld, ir.Constant(sld.type, i))]),
                                             vt.as_pointer()), align=4) for i in range(T)]
        for s, lo, hi in _ROUNDS:
            new = list(rows)
            for i in range(T):
                if not i & s:
                    new[i] = builder.shuffle_vector(rows[i], rows[i + s], ir.Constant(mt, lo))
                    new[i + s] = builder.shuffle_vector(rows[i], rows[i + s], ir.Constant(mt, hi))
            rows = new
        for i in range(T):
            ptr = builder.gep(dp, [builder.mul(dld, ir.Constant(dld.type, i))])
            builder.store(rows[i], builder.bitcast(ptr, vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _move16(typingctx, src, soff, dst, doff):
    """dst[doff : doff + 16] = src[soff : soff + 16]: one unaligned vector load and store."""
    sig = types.void(src, soff, dst, doff)

    def codegen(context, builder, sig, args):
        src, soff, dst, doff = args
        vt = ir.VectorType(ir.FloatType(), T)
        sp = builder.gep(context.make_array(sig.args[0])(context, builder, src).data, [soff])
        dp = builder.gep(context.make_array(sig.args[2])(context, builder, dst).data, [doff])
        val = builder.load(builder.bitcast(sp, vt.as_pointer()), align=4)
        builder.store(val, builder.bitcast(dp, vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(**_NJ)
def _move(src, soff, dst, doff, n):
    """dst[doff : doff + n] = src[soff : soff + n] in whole 16-float moves: the last one reads
    and writes up to 15 floats past the run (callers keep 16 floats of slack after both
    buffers and write a block's runs in increasing address order, so each overrun is
    overwritten by the runs after it). Masked moves instead (exact lengths) ran at ~9 cycles
    per run on Zen 5."""
    for k in range(0, n, T):
        _move16(src, soff + k, dst, doff + k)


@njit(**_NJ)
def transpose_cpu(src, soff, sld, dst, doff, dld, n, m):
    """dst[doff + j*dld + i] = src[soff + i*sld + j] for i < n, j < m: full 16 x 16 tiles in
    vectors, the ragged right / bottom edges scalar."""
    n16 = n // T * T
    m16 = m // T * T
    for i0 in range(0, n16, T):
        for j0 in range(0, m16, T):
            _transpose16(src, soff + i0 * sld + j0, sld, dst, doff + j0 * dld + i0, dld)
    for i in range(n16):
        for j in range(m16, m):
            dst[doff + j * dld + i] = src[soff + i * sld + j]
    for i in range(n16, n):
        for j in range(m):
            dst[doff + j * dld + i] = src[soff + i * sld + j]


@njit(**_NJ)
def gather_chwb_cpu(vf, vshape, pt, pl, pf, pshape, ploc, rloc, out, blk, pbl, lo, hi):
    """Channels lo..hi of the gather (module docstring). ``vf`` is the flat [C, H', W']
    (``vshape``) view with the fill around it, the tensor's origin at (pt, pl); ``pf`` the
    flat patch [C, ph, pw, B] (``pshape``); ``blk`` / ``pbl`` the caller's [16 * hR*wR] /
    [16 * ph*pw] scratch. ``vf``, ``blk`` and ``pbl`` have 16 floats of slack at the end (see
    ``_move``); the patch is read by the transpose only, within bounds."""
    hv, wv = vshape[1], vshape[2]
    hr, wr, nq = out.shape[1], out.shape[2], out.shape[3]
    ph, pw = pshape[1], pshape[2]
    npix = hr * wr
    ppix = ph * pw
    of = out.reshape(-1)
    for c in range(lo, hi):
        cb = c * hv * wv
        for q0 in range(0, nq, T):  # 16 queries at a time: the blocks stay in L1
            g = min(T, nq - q0)
            # the group's patch columns [ppix, g] -> [g, ppix]
            transpose_cpu(pf, c * ppix * nq + q0, nq, pbl, 0, ppix, ppix, g)
            for q in range(q0, q0 + g):  # each read-in row: view | patch | view, left to right
                yb = rloc[q, 0] + pt
                xb = rloc[q, 1] + pl
                py = ploc[q, 0] - rloc[q, 0]
                px = ploc[q, 1] - rloc[q, 1]
                j0, j1 = min(max(px, 0), wr), max(min(px + pw, wr), 0)
                for r in range(hr):
                    vb = cb + (yb + r) * wv + xb
                    tb = (q - q0) * npix + r * wr
                    if py <= r < py + ph and j0 < j1:
                        _move(vf, vb, blk, tb, j0)
                        _move(pbl, (q - q0) * ppix + (r - py) * pw + j0 - px, blk, tb + j0, j1 - j0)
                        _move(vf, vb + j1, blk, tb + j1, wr - j1)
                    else:
                        _move(vf, vb, blk, tb, wr)
            transpose_cpu(blk, 0, npix, of, c * npix * nq + q0, nq, g, npix)  # [g, npix] -> out[c]


def gather(view: np.ndarray, patch: np.ndarray, ploc: np.ndarray, rloc: np.ndarray, size, fill: float,
           out: np.ndarray) -> np.ndarray:
    """Read-in contexts out [C, hR, wR, B] of ``view`` [C, H, W] at ``rloc`` [B, 2] with each
    query's patch (``patch`` [C, ph, pw, B] at ``ploc``) applied, ``fill`` outside the tensor."""
    c, h, w = view.shape
    hr, wr = size
    nq = ploc.shape[0]
    ph, pw = patch.shape[1], patch.shape[2]
    rloc = np.ascontiguousarray(rloc, np.int64)
    pt = max(0, -int(rloc[:, 0].min()))
    pb = max(0, int(rloc[:, 0].max()) + hr - h)
    pl = max(0, -int(rloc[:, 1].min()))
    pr = max(0, int(rloc[:, 1].max()) + wr - w)
    # a frame of fill (the row copies need no bounds tests) and 16 floats of slack after it
    hv, wv = h + pt + pb, w + pl + pr
    flat = np.full(c * hv * wv + T, fill, np.float32)
    vpad = flat[: c * hv * wv].reshape(c, hv, wv)
    vpad[:, pt : pt + h, pl : pl + w] = view
    patch_flat = np.ascontiguousarray(patch, np.float32).reshape(-1)  # read by whole tiles only
    ploc = np.ascontiguousarray(ploc, np.int64)

    def run(lo, hi):
        gather_chwb_cpu(flat, vpad.shape, pt, pl, patch_flat, patch.shape, ploc, rloc, out,
                        _scratch("gather_blk", T * hr * wr + T), _scratch("gather_patch", T * ph * pw + T), lo, hi)

    parallel_ranges(c, run)
    return out
