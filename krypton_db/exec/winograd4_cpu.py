"""Winograd F(4x4, 3x3) for 3x3 stride-1 convolutions on CHWB buffers (``winograd_cpu``'s
layout): 4x4 output tiles from 6x6 input tiles, 36 products per tile and channel pair where
F(2x2, 3x3) spends 64 on the same 16 outputs (1.78x fewer multiply-adds in the GEMMs).

Why: the GEMMs of F(2x2, 3x3) are most of ResNet18's and VGG16's exact runs (ResNet18's
layer4 alone, 512 channels on 7x7 maps, was 35% of an explanation). The transforms are 1-D
F(4, 3)'s (``winograd1d_cpu.transforms``, Toom-Cook at ``POINTS`` and infinity) applied
along rows, then columns (V = B^T d B, U = G g G^T, Y = A^T M A), with ``winograd1d_cpu``'s
vector bodies (``linear_vec``: VL queries per register, the coefficients baked in). As in
``winograd_cpu`` the products are 36 independent GEMMs ``M[k] = U[k] (O x C) @ V[k]`` on
``gemm_cpu``'s tap GEMM, over columns j = tile * B + b.

Accuracy: F(4x4) grows the float32 rounding error more than F(2x2) (larger transform
entries, more terms); see ``POINTS``. ``tests/test_winograd4.py`` bounds it against float64,
and the zoo models' probabilities stay within the exact-vs-naive and ONNX Runtime
tolerances.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..graph import ACT_NONE, ACT_RELU
from ..planner import algorithms
from . import kernels_cpu, winograd1d_cpu, winograd_cpu
from .runtime import scratch
from .transpose_cpu import T as VL

_NJ = dict(cache=True, nogil=True, fastmath=False)

# V / M scratch per column chunk (floats): as winograd_cpu's
CHUNK_FLOATS = 1 << 21
# ... and for the dense (full-inference) route's bands, 2 MiB: there 37 slots of V / M over
# 8 MiB chunks made F(4x4)'s transforms memory-bound. On the 2-core AVX2 host (512 KiB L2 per
# core), two sweeps of 3 interleaved rounds, 8 -> 2 MiB: ResNet18 64 channels at 56x56
# 31.3-34.5 -> 24.3-30.6 ms, 128 at 28x28 17.9-23.4 -> 13.9-17.0, VGG16 128 at 112x112 289-323
# -> 227-249 (F(2x2) showed no consistent change). The patch route keeps 8 MiB: its batched
# small regions reuse the filters across wide chunks (ResNet18 exact occlusion 6.6-7.8 s at 8
# MiB, 7.3-7.9 s at 2). Not measured on AVX-512.
DENSE_CHUNK_FLOATS = 1 << 19

_M, _R = 4, 3
# interpolation points (plus infinity): 2 and -1/2 instead of the usual +-2 halve the float32
# error (relative to the largest output, random 3x3 convs of 64-128 channels: 1.5-2.8e-6
# against 3.4-5.3e-6 with +-2 and 4.0-7.5e-6 with +-1/2; F(2x2, 3x3): 2.4-4.5e-7). Baked into
# the cached vector bodies: change them only together with the numba cache.
POINTS = (0.0, 1.0, -1.0, 2.0, -0.5)
_AT, _G, _BT = winograd1d_cpu.transforms(_M, _R, POINTS)  # [4, 6], [6, 3], [6, 6] float64
_A = _BT.shape[0]  # 6
_IN, _OUT = winograd1d_cpu.linear_vec(_BT), winograd1d_cpu.linear_vec(_AT)  # vector bodies, coefficients baked in


# which convs run here: ``planner.algorithms.winograd_f4``
eligible = algorithms.winograd_f4


def transform_filters(w4: np.ndarray) -> np.ndarray:
    """W [O, C, 3, 3] -> the 36 ``gemm_cpu``-packed U[k] = (G g G^T)[k] [O, C] (k = 6 * row +
    col), computed in float64, stacked as [36, panels, C * MR]."""
    return winograd_cpu.transform_filters(w4, _G)


@njit(inline="always")
def _tile_span(t, ntx, nb, j0, j1):
    """Tile t's top-left output cell (4ty, 4tx), its queries [b0, b1) inside the column range
    [j0, j1) (columns j = t * B + b), and the column offset of its b = 0 in the chunk."""
    ty = t // ntx
    return 4 * ty, 4 * (t - ty * ntx), max(j0 - t * nb, 0), min(j1 - t * nb, nb), t * nb - j0


@njit(**_NJ)
def input_transform_cpu(buf, ntx, j0, j1, vf, v0, vplane, tmp):
    """vf[v0 + k * vplane + c * n + j - j0] = (B^T d B)[k] (n = j1 - j0) for columns
    j = t * B + b in [j0, j1): d = buf[c, 4ty : 4ty + 6, 4tx : 4tx + 6, b] of tile
    t = ty * ntx + tx (cells past the buffer read as 0). ``tmp``: 36 * VL floats."""
    nc, hr, wr, nb = buf.shape
    n = j1 - j0
    bf = buf.reshape(-1)
    rs = wr * nb
    for c in range(nc):
        cb = c * hr * wr * nb
        vb = v0 + c * n
        t = j0 // nb
        while t * nb < j1:
            y0, x0, b0, b1, col = _tile_span(t, ntx, nb, j0, j1)
            nin = min(_A, hr - y0)
            q = b0
            while q < b1:
                nl = min(VL, b1 - q)
                # rows: tmp[k][s] = sum_r B^T[k, r] d[r][s] (a column past the buffer is 0)
                for s in range(_A):
                    _IN(bf, cb + (y0 * wr + x0 + s) * nb + q, rs, tmp, s * VL, _A * VL, nl,
                        nin if x0 + s < wr else 0, _A, np.float32(0.0), 0)
                # columns: V[k][l] = sum_s B^T[l, s] tmp[k][s]
                for k in range(_A):
                    _IN(tmp, k * _A * VL, VL, vf, vb + col + q + k * _A * vplane, vplane, nl, _A, _A,
                        np.float32(0.0), 0)
                q += VL
            t += 1


@njit(**_NJ)
def output_transform_cpu(mf, m0, mplane, ntx, j0, j1, bias, code, a0, a1, out, tmp):
    """out[o, 4ty + i, 4tx + j, b] = act((A^T M A)[i, j] + bias[o]) (``kernels_cpu`` codes)
    with M[k][o][j - j0] at mf[m0 + k * mplane + o * n + j - j0] (n = j1 - j0), for columns
    j = t * B + b in [j0, j1) (outputs past out's ho x wo are dropped). ``tmp``: 36 * VL."""
    no, ho, wo, nb = out.shape
    n = j1 - j0
    of = out.reshape(-1)
    for o in range(no):
        bo = bias[o]
        mb = m0 + o * n
        t = j0 // nb
        while t * nb < j1:
            y0, x0, b0, b1, col = _tile_span(t, ntx, nb, j0, j1)
            rows = min(_M, ho - y0)
            cols = min(_M, wo - x0)
            q = b0
            while q < b1:
                nl = min(VL, b1 - q)
                # rows: tmp[i][l] = sum_k A^T[i, k] M[k][l]
                for l in range(_A):
                    _OUT(mf, mb + col + q + l * mplane, _A * mplane, tmp, l * VL, _A * VL, nl, _A, _M,
                         np.float32(0.0), 0)
                # columns: y[i][x] = sum_l A^T[x, l] tmp[i][l] + bias
                for i in range(rows):
                    d0 = ((o * ho + y0 + i) * wo + x0) * nb + q
                    _OUT(tmp, i * _A * VL, VL, of, d0, nb, nl, _A, cols, bo, 1 if code == ACT_RELU else 0)
                    if code != ACT_NONE and code != ACT_RELU:  # other activations: in place, after the vector body
                        for x in range(cols):
                            for lane in range(nl):
                                of[d0 + x * nb + lane] = kernels_cpu.act(of[d0 + x * nb + lane], code, a0, a1)
                q += VL
            t += 1


def conv(buf: np.ndarray, filters: np.ndarray, bias: np.ndarray, act, out: np.ndarray,
         chunk_floats: int | None = None) -> None:
    """3x3 stride-1 convolution (padding 0) of buf [C, hR, wR, B] into out [O, ho, wo, B]
    (ho <= hR - 2, wo <= wR - 2) with bias + activation; ``filters`` from
    ``transform_filters``; V / M scratch per chunk ``chunk_floats`` (default ``CHUNK_FLOATS``)."""

    c, nb = buf.shape[0], buf.shape[3]
    o, ho, wo, _ = out.shape
    code, a0, a1 = act
    ntx = -(-wo // _M)

    def body(j0, j1, vm, sl):
        tmp = scratch("wino4_tmp", _A * _A * VL)
        input_transform_cpu(buf, ntx, j0, j1, vm, sl, sl, tmp)
        winograd_cpu.gemms(filters, o, c, vm, sl, j1 - j0)
        output_transform_cpu(vm, 0, sl, ntx, j0, j1, bias, code, a0, a1, out, tmp)

    winograd_cpu.run_chunks(-(-ho // _M) * ntx * nb, len(filters), max(c, o), chunk_floats or CHUNK_FLOATS, body)
