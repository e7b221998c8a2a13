"""CNHW reference kernels of the batched incremental operators (gather with patch
application, stitch, avg-pool over read-in contexts).

The CPU incremental executor runs the CHWB kernels of ``patch_cpu`` (faster for small
patches); these CNHW versions share the layout of the GPU executor and are the oracle its
kernels are tested against (tests/test_gpu.py). One launch per layer for the whole batch of
queries (the published GPU bottleneck was a per-query copy loop).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def gather_cpu(view, patch, ploc, rloc, fill, out):
    """out[c, q] = read-in context of query q: rows rloc[q,0] + r, cols rloc[q,1] + s of the
    materialized view[c] (H x W), with the query's changed patch (patch[c, q], placed at
    ploc[q]) applied, and ``fill`` outside the tensor (0 conv/avg, -inf max)."""
    c_, h, w = view.shape
    q_ = out.shape[1]
    hr, wr = out.shape[2], out.shape[3]
    ph, pw = patch.shape[2], patch.shape[3]
    for cq in prange(c_ * q_):
        c = cq // q_
        q = cq - c * q_
        y0 = rloc[q, 0]
        x0 = rloc[q, 1]
        py = ploc[q, 0]
        px = ploc[q, 1]
        for r in range(hr):
            y = y0 + r
            if y < 0 or y >= h:
                for s in range(wr):
                    out[c, q, r, s] = fill
                continue
            inpy = py <= y < py + ph
            for s in range(wr):
                x = x0 + s
                if x < 0 or x >= w:
                    out[c, q, r, s] = fill
                elif inpy and px <= x < px + pw:
                    out[c, q, r, s] = patch[c, q, y - py, x - px]
                else:
                    out[c, q, r, s] = view[c, y, x]


@njit(parallel=True, cache=True)
def stitch_cpu(view, patch, ploc, out):
    """out[c, q] = view[c] with patch[c, q] written at ploc[q] (full tensor per query)."""
    c_, h, w = view.shape
    q_ = out.shape[1]
    ph, pw = patch.shape[2], patch.shape[3]
    for cq in prange(c_ * q_):
        c = cq // q_
        q = cq - c * q_
        out[c, q] = view[c]
        py = ploc[q, 0]
        px = ploc[q, 1]
        for r in range(ph):
            for s in range(pw):
                out[c, q, py + r, px + s] = patch[c, q, r, s]


@njit(parallel=True, cache=True)
def avgpool_patch_cpu(buf, rloc, h, w, kh, kw, sh, sw, pt, pl, pb, pr, include_pad, out):
    """Average pool over read-in contexts (origin rloc[q] in input coordinates): zero-filled
    cells outside the input add nothing; the divisor uses absolute coordinates exactly as the
    full kernel does (count_include_pad counts declared padding, never beyond)."""
    c_, q_ = buf.shape[0], buf.shape[1]
    ho, wo = out.shape[2], out.shape[3]
    for cq in prange(c_ * q_):
        c = cq // q_
        q = cq - c * q_
        for oy in range(ho):
            for ox in range(wo):
                s = np.float32(0.0)
                for i in range(kh):
                    for j in range(kw):
                        s += buf[c, q, oy * sh + i, ox * sw + j]
                ys = rloc[q, 0] + oy * sh
                xs = rloc[q, 1] + ox * sw
                if include_pad:
                    cnt = (min(ys + kh, h + pb) - max(ys, -pt)) * (min(xs + kw, w + pr) - max(xs, -pl))
                else:
                    cnt = (min(ys + kh, h) - max(ys, 0)) * (min(xs + kw, w) - max(xs, 0))
                out[c, q, oy, ox] = s / np.float32(cnt)
