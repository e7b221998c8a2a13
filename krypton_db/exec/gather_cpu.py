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

The transposes and moves are ``transpose_cpu``'s vector kernels (the previous gather, a
scalar transpose, moved 1-1.5 values per cycle; hardware gathers, ``vgatherdps``, tried
before this, were no faster than it on real batches).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .runtime import parallel_ranges, scratch
from .transpose_cpu import T, move, transpose_cpu

_NJ = dict(cache=True, nogil=True, fastmath=False)


@njit(**_NJ)
def gather_chwb_cpu(vf, vshape, pt, pl, pf, pshape, ploc, rloc, out, blk, pbl, lo, hi):
    """Channels lo..hi of the gather (module docstring). ``vf`` is the flat [C, H', W']
    (``vshape``) view with the fill around it, the tensor's origin at (pt, pl); ``pf`` the
    flat patch [C, ph, pw, B] (``pshape``); ``blk`` / ``pbl`` the caller's [16 * hR*wR] /
    [16 * ph*pw] scratch."""
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
                        move(vf, vb, blk, tb, j0)
                        move(pbl, (q - q0) * ppix + (r - py) * pw + j0 - px, blk, tb + j0, j1 - j0)
                        move(vf, vb + j1, blk, tb + j1, wr - j1)
                    else:
                        move(vf, vb, blk, tb, wr)
            transpose_cpu(blk, 0, npix, of, c * npix * nq + q0, nq, g, npix)  # [g, npix] -> out[c]


def gather(view: np.ndarray, patch: np.ndarray, ploc: np.ndarray, rloc: np.ndarray, size, fill: float,
           out: np.ndarray) -> np.ndarray:
    """Read-in contexts out [C, hR, wR, B] of ``view`` [C, H, W] at ``rloc`` [B, 2] with each
    query's patch (``patch`` [C, ph, pw, B] at ``ploc``) applied, ``fill`` outside the tensor."""
    c, h, w = view.shape
    hr, wr = size
    ph, pw = patch.shape[1], patch.shape[2]
    rloc = np.ascontiguousarray(rloc, np.int64)
    # only the box the read-ins cover, in a frame of fill (the row copies need no bounds
    # tests); a few queries (an interactive probe) copy a window, not the whole view
    y0, x0 = int(rloc[:, 0].min()), int(rloc[:, 1].min())
    hv, wv = int(rloc[:, 0].max()) + hr - y0, int(rloc[:, 1].max()) + wr - x0
    flat = np.full(c * hv * wv, fill, np.float32)
    vpad = flat.reshape(c, hv, wv)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y0 + hv, h), max(x0, 0), min(x0 + wv, w)
    if sy0 < sy1 and sx0 < sx1:
        vpad[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = view[:, sy0:sy1, sx0:sx1]
    pt, pl = -y0, -x0  # the tensor's origin in vpad
    patch_flat = np.ascontiguousarray(patch, np.float32).reshape(-1)
    ploc = np.ascontiguousarray(ploc, np.int64)

    def run(lo, hi):
        gather_chwb_cpu(flat, vpad.shape, pt, pl, patch_flat, patch.shape, ploc, rloc, out,
                        scratch("gather_blk", T * hr * wr), scratch("gather_patch", T * ph * pw), lo, hi)

    parallel_ranges(c, run)
    return out


@njit(**_NJ)
def stitch_chwb_cpu(vf, h, w, pf, pshape, ploc, out, pbl, lo, hi):
    """out[c, q] = view[c] (flat ``vf``, h x w) with patch[c, :, :, q] (flat ``pf``,
    ``pshape``) at ploc[q], channels lo..hi: per 16 queries the patch columns are transposed
    to [16, ph*pw] (``pbl``), then each query's map is the view's copy with its patch rows
    moved over it (a patch covering the map skips the copy)."""
    nq = out.shape[1]
    ph, pw = pshape[1], pshape[2]
    ppix = ph * pw
    hw = h * w
    of = out.reshape(-1)
    full = ph == h and pw == w
    for c in range(lo, hi):
        for q0 in range(0, nq, T):
            g = min(T, nq - q0)
            transpose_cpu(pf, c * ppix * nq + q0, nq, pbl, 0, ppix, ppix, g)
            for q in range(q0, q0 + g):
                ob = (c * nq + q) * hw
                if not full:
                    move(vf, c * hw, of, ob, hw)
                ob += ploc[q, 0] * w + ploc[q, 1]
                for i in range(ph):
                    move(pbl, (q - q0) * ppix + i * pw, of, ob + i * w, pw)


def stitch(view: np.ndarray, patch: np.ndarray, ploc: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [C, B, H, W]: per query q, ``view`` [C, H, W] with ``patch[..., q]`` at ``ploc[q]``."""
    c, h, w = view.shape
    vf = np.ascontiguousarray(view, np.float32).reshape(-1)
    patch = np.ascontiguousarray(patch, np.float32)
    ploc = np.ascontiguousarray(ploc, np.int64)

    def run(lo, hi):
        stitch_chwb_cpu(vf, h, w, patch.reshape(-1), patch.shape, ploc, out,
                        scratch("gather_patch", T * patch.shape[1] * patch.shape[2]), lo, hi)

    parallel_ranges(c, run)
    return out
