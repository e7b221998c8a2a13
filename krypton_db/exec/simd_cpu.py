"""Row primitives emitted as LLVM IR vector code, for the loops numba's auto-vectorizer leaves
scalar.

``copy_stride2``: d[q] = s[2q] (a column-phase split, as in strided convs' im2col rows, the
depthwise stage and phase planes). numba's loop over ``s[2q]`` stays a scalar gather (measured
0.74 Gfloat/s, 5x slower than a contiguous copy); here two 16-float loads and one even-lane
shuffle give 16 outputs (``vpermt2ps`` with AVX-512; LLVM splits the 16-lane vectors into
two 8-lane halves on AVX2)."""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_LANES = 16


@intrinsic
def _copy_stride2_vectors(typingctx, d, doff, s, soff, nvec):
    """d[doff + q] = s[soff + 2q] for q < nvec * 16 (reads s up to soff + 32 * nvec - 1)."""
    sig = types.void(d, doff, s, soff, nvec)

    def codegen(context, builder, sig, args):
        d, doff, s, soff, nvec = args
        vt = ir.VectorType(ir.FloatType(), _LANES)
        i64 = ir.IntType(64)
        sp = builder.gep(context.make_array(sig.args[2])(context, builder, s).data, [soff])
        dp = builder.gep(context.make_array(sig.args[0])(context, builder, d).data, [doff])
        evens = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), list(range(0, 2 * _LANES, 2)))
        with cgutils.for_range(builder, nvec) as loop:
            q = builder.mul(loop.index, ir.Constant(i64, _LANES))
            src = builder.gep(sp, [builder.mul(q, ir.Constant(i64, 2))])
            lo = builder.load(builder.bitcast(src, vt.as_pointer()), align=4)
            hi = builder.load(builder.bitcast(builder.gep(src, [ir.Constant(i64, _LANES)]), vt.as_pointer()), align=4)
            builder.store(builder.shuffle_vector(lo, hi, evens),
                          builder.bitcast(builder.gep(dp, [q]), vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def copy_stride2_at(d, doff, s, soff, n):
    """d[doff + q] = s[soff + 2q] for q < n: whole vectors while their loads stay at or before
    s[soff + 2(n-1)] (never past the last element read), the rest one by one."""
    nvec = max(0, (n - 1) // _LANES)
    if nvec > 0:
        _copy_stride2_vectors(d, doff, s, soff, nvec)
    ud = np.uint64(doff)
    us = np.uint64(soff)
    for q in range(np.uint64(nvec * _LANES), np.uint64(n)):
        d[ud + q] = s[us + q * np.uint64(2)]
