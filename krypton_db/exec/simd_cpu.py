"""Vector code emitted as LLVM IR, for what numba's auto-vectorizer leaves scalar.

``activate_in_place``: bias-added float vectors through a fused activation inside an
intrinsic (the GEMM micro-kernel's and the incremental depthwise conv's epilogues), with the
float32 operations of ``kernels_cpu.bias_act_at`` in the same order, so a value is
bit-identical to that pass.

``copy_stride2``: d[q] = s[2q] (a column-phase split, as in strided convs' im2col rows, the
depthwise stage and phase planes). numba's loop over ``s[2q]`` stays a scalar gather (measured
0.74 Gfloat/s, 5x slower than a contiguous copy); here two 16-float loads and one even-lane
shuffle give 16 outputs (``vpermt2ps`` with AVX-512; LLVM splits the 16-lane vectors into
two 8-lane halves on AVX2).

``masked16`` / ``masked_ops`` / ``lanes_below``: the pieces of masked 16-float loads and stores
(the patch route's window kernels, the CHWB transposes)."""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..graph import ACT_CLIP, ACT_HSIGMOID, ACT_HSWISH, ACT_LEAKY, ACT_NONE, ACT_RELU

_LANES = 16


def lanes_below(builder, k):
    """<16 x i1>: lane l < k (k an integer value)."""
    vk = ir.VectorType(k.type, _LANES)
    splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vk, ir.Undefined), k,
                                                          ir.Constant(ir.IntType(32), 0)),
                                   ir.Constant(vk, ir.Undefined),
                                   ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES))
    return builder.icmp_signed("<", ir.Constant(vk, list(range(_LANES))), splat)


def masked_ops(builder):
    """(load, store): llvm.masked.load / store of 16 floats (lanes off the mask are neither
    read nor written)."""
    vt = ir.VectorType(ir.FloatType(), _LANES)
    mt = ir.VectorType(ir.IntType(1), _LANES)
    i32 = ir.IntType(32)
    ld = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt.as_pointer(), i32, mt, vt]),
                                        "llvm.masked.load.v16f32.p0v16f32")
    st = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ir.VoidType(), [vt, vt.as_pointer(), i32, mt]),
                                        "llvm.masked.store.v16f32.p0v16f32")
    return ld, st



def masked16(builder, n):
    """The pieces of a masked 16-float access, lanes l < n (an integer value): (vector type,
    masked load, masked store, the alignment argument 4, a zero vector, the lane mask)."""
    ld, st = masked_ops(builder)
    vt = ir.VectorType(ir.FloatType(), _LANES)
    return vt, ld, st, ir.Constant(ir.IntType(32), 4), ir.Constant(vt, [0.0] * _LANES), lanes_below(builder, n)

@njit(inline="always")
def in_register(code):
    """Activations ``activate_in_place`` emits (``kernels_cpu`` codes); the exp-based others
    are left to a pass over the stored values."""
    return (code == ACT_NONE or code == ACT_RELU or code == ACT_CLIP or code == ACT_LEAKY
            or code == ACT_HSIGMOID or code == ACT_HSWISH)


def activate_in_place(builder, slots, code, a0, a1):
    """Emit: each alloca in ``slots`` (float vectors) = act(its value) for the runtime
    activation ``code`` (one of ``in_register``'s; others leave the values as they are), a0
    and a1 its float parameters. ``x if cond else y`` of ``bias_act_at`` as ``select``."""
    vt = slots[0].type.pointee
    f32 = ir.FloatType()
    undef = ir.Constant(vt, ir.Undefined)
    vzero, vone = ir.Constant(vt, [0.0] * vt.count), ir.Constant(vt, [1.0] * vt.count)

    def bcast(s):
        s = builder.fptrunc(s, f32) if s.type != f32 else s
        return builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(ir.IntType(32), 0)), undef,
                                      ir.Constant(ir.VectorType(ir.IntType(32), vt.count), [0] * vt.count))

    def each(fn):
        for a in slots:
            builder.store(fn(builder.load(a)), a)

    def when(value):
        return builder.if_then(builder.icmp_signed("==", code, ir.Constant(code.type, value)))

    def vmax(x, y):  # numba's max(x, y) on floats, in select form
        return builder.select(builder.fcmp_ordered(">=", x, y), x, y)

    def vmin(x, y):
        return builder.select(builder.fcmp_ordered("<=", x, y), x, y)

    with when(ACT_RELU):
        each(lambda x: builder.select(builder.fcmp_ordered(">", x, vzero), x, vzero))
    with when(ACT_CLIP):
        lo, hi = bcast(a0), bcast(a1)
        each(lambda x: vmin(vmax(x, lo), hi))
    with when(ACT_LEAKY):
        slope = bcast(a0)
        each(lambda x: builder.select(builder.fcmp_ordered(">=", x, vzero), x, builder.fmul(x, slope)))
    with when(ACT_HSIGMOID):
        al, be = bcast(a0), bcast(a1)
        each(lambda x: vmin(vmax(builder.fadd(builder.fmul(al, x), be), vzero), vone))
    with when(ACT_HSWISH):
        sixth = ir.Constant(vt, [float(np.float32(1.0 / 6.0))] * vt.count)
        half = ir.Constant(vt, [0.5] * vt.count)
        each(lambda x: builder.fmul(x, vmin(vmax(builder.fadd(builder.fmul(x, sixth), half), vzero), vone)))


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
