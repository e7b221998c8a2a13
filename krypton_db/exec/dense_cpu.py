"""The dense CPU operators on CNHW batches: convolution routes (tap GEMM, Winograd F(4x4) /
F(2x2) / F(4, r), phase planes, shifted window, CHWB for small maps, im2col), pooling,
pointwise ops, fully connected; and the per-layer weight preparation they read.

The route of each conv is a pure function of the layer and its sizes (``conv_cnhw``; the
Winograd and phase-plane choices are ``planner.algorithms``'), so dense and incremental runs
of one layer take the same arithmetic wherever their shapes agree.
"""

from __future__ import annotations

import numpy as np

from ..graph import ACTIVATION_CODES, OPS, Node, Op
from ..planner import algorithms
from . import blas_cpu
from . import depthwise_cpu, kernels_cpu, patch_cpu, transpose_cpu, winograd1d_cpu, winograd4_cpu, winograd_cpu
from . import conv_cpu
from .conv_cpu import POLYPHASE_MIN_C, ConvWeights, by_phase_planes, cols_chunk, conv1x1, conv_gemm, phase_grid_waste
from .runtime import num_threads, parallel_chunks, parallel_ranges, scratch, scratch_as

# Per-thread working-set targets (float32 values) for the conv column chunks. Measured on the
# 2-core Zen target: 1-thread sgemm reaches its plateau from ~512 columns on; larger blocks only
# push the im2col block and the output block out of L2 before the GEMM / epilogue reread them.
IM2COL_BUDGET = 384 * 1024
SHIFT_BUDGET = 512 * 1024
# shifted-window (implicit GEMM) lowering only when the padded grid wastes at most this share
SHIFT_MAX_WASTE = 0.60
SHIFT_MIN_CHANNELS = 32
# Small maps (ResNet's 14x14 / 7x7, Inception's 17x17 / 8x8): the padded grid of the shifted
# lowering computes and drops (H+p)(W+p) - HW of every image's columns (31% at 7x7). Past this
# waste, and with at least 256 columns per output row (Wo * N), the conv runs in the batch-
# innermost CHWB layout instead (patch_cpu.conv_chwb: row-segment GEMMs, no dropped columns),
# paying two transposes of the (small) maps.
CHWB_MIN_WASTE = 0.15


def act_spec(node: Node | None) -> tuple[int, np.float32, np.float32]:
    """(code, a0, a1) of a fusable activation node, or the identity."""
    if node is None:
        return kernels_cpu.ACT_NONE, np.float32(0), np.float32(0)
    args = [float(node.params[k]) for k in OPS[node.op].act_params] + [0.0, 0.0]
    return ACTIVATION_CODES[node.op], np.float32(args[0]), np.float32(args[1])


# -- convolution ---------------------------------------------------------------------------------


def conv_cnhw(x: np.ndarray, node: Node, cw: ConvWeights, act=(0, np.float32(0), np.float32(0)),
              pads=None, out: np.ndarray | None = None) -> np.ndarray:
    """Convolution of a CNHW batch; ``pads`` overrides the node's padding (incremental plans
    run on read-in contexts with padding 0).

    Lowerings (all with the bias + activation fused into the per-chunk epilogue), in the
    order tried: depthwise -> direct kernel (``depthwise_cpu``); 1x1 stride 1 -> GEMM on the
    input itself, unpadded strided 1x1 -> GEMM on the subsampled input; 3x3 stride 1 ->
    Winograd; 1 x r / r x 1 -> 1-D Winograd; strided -> tap GEMM over phase planes, laid out
    as the shifted-window grid while it wastes little (``_conv_phase_grid``), else in CHWB
    (``_conv_polyphase``, 16+ channels); stride-1 on small maps -> CHWB patch kernels; on
    maps large enough that the padded grid adds little -> shifted-window tap GEMM (column
    offsets of a zero-padded copy of the chunk, no im2col); everything else -> chunked im2col
    + GEMM."""
    p = node.params
    x = np.ascontiguousarray(x, np.float32)
    c, n, h, w = x.shape
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    dh, dw = p["dilation"]
    t, l, b, r = pads if pads is not None else p["pads"]
    ho = (h + t + b - dh * (kh - 1) - 1) // sh + 1
    wo = (w + l + r - dw * (kw - 1) - 1) // sw + 1
    o = cw.w4.shape[0]
    g = p["groups"]
    if out is None:
        out = np.empty((o, n, ho, wo), np.float32)
    code, a0, a1 = act
    if g == c == o and cw.w4.shape[1] == 1 and g > 1:
        parallel_ranges(c * n, lambda lo, hi: depthwise_cpu.depthwise_conv_cpu(
            x, cw.w4, cw.bias, sh, sw, dh, dw, t, l, code, a0, a1, lo, hi, out), 4)
        return out
    cg = c // g
    og = o // g
    ncols = n * ho * wo
    out2 = out.reshape(o, ncols)
    with blas_cpu.single_threaded_blas():
        if kh == kw == 1 and sh == sw == 1 and t == l == b == r == 0:
            conv1x1(x.reshape(c, ncols), cw, g, act, out2)
            return out
        if kh == kw == 1 and t == l == b == r == 0 and dh == dw == 1:
            # strided 1x1 (ResNet's downsample): the subsampled input is a plain GEMM's B
            sub = scratch_as("dense_in", (c, n, ho, wo))
            parallel_ranges(c * n, lambda lo, hi: kernels_cpu.subsample_cnhw_cpu(x, sh, sw, lo, hi, sub), 16)
            conv1x1(sub.reshape(c, ncols), cw, g, act, out2)
            return out
        if winograd_cpu.eligible(p, c, g, (ho, wo)):
            _conv_winograd(x, p, cw, act, (t, l), ho, wo, out)
            return out
        if winograd1d_cpu.eligible(p, c, g, (ho, wo)):
            _conv_winograd1d(x, p, cw, act, (t, l), ho, wo, out)
            return out
        if (algorithms.POLYPHASE and conv_cpu.PHASE_GRID and (sh > 1 or sw > 1) and dh == dw == 1
                and og >= conv_cpu.PHASE_GRID_MIN_O
                and phase_grid_waste(kh, kw, sh, sw, ho, wo) <= conv_cpu.PHASE_GRID_MAX_WASTE):
            _conv_phase_grid(x, cw, g, cg, og, kh, kw, sh, sw, t, l, ho, wo, act, out)
            return out
        if by_phase_planes(p) and c >= POLYPHASE_MIN_C:
            _conv_polyphase(x, cw, act, (t, l), kh, kw, sh, sw, ho, wo, out)
            return out
        hs, wp = h + max(t, b), w + max(l, r)
        if (g == 1 and sh == sw == 1 and kh * kw > 1 and blas_cpu.HAVE_BLAS and c >= SHIFT_MIN_CHANNELS
                and wo * n >= 256 and n * hs * wp > (1 + CHWB_MIN_WASTE) * ncols):
            _conv_via_chwb(x, node, cw, act, (t, l), ho, wo, out)
            return out
        if (sh == sw == 1 and kh * kw > 1 and blas_cpu.HAVE_BLAS and cg >= SHIFT_MIN_CHANNELS
                and ho <= hs and wo <= wp and n * hs * wp <= (1 + SHIFT_MAX_WASTE) * ncols):
            _conv_shifted(x, cw, g, cg, og, kh, kw, dh, dw, t, l, hs, wp, ho, wo, act, out)
            return out
        rows = cg * kh * kw
        qc = cols_chunk(ncols, rows + og, IM2COL_BUDGET)

        def one(ci):
            j0 = ci * qc
            j1 = min(j0 + qc, ncols)
            cols = scratch("work", rows * qc).reshape(rows, qc)
            for gi in range(g):
                kernels_cpu.im2col_chunk_cpu(x, gi * cg, cg, kh, kw, sh, sw, dh, dw, t, l, ho, wo, j0, j1, cols)
                ys = out2[gi * og : (gi + 1) * og, j0:j1]
                conv_gemm(cw, gi, cols, (0,), 0, j1 - j0, ys, act=act)

        parallel_chunks(-(-ncols // qc), one)
    return out


def _conv_via_chwb(x, node, cw, act, tl, ho, wo, out):
    """Stride-1 conv of a CNHW batch through the CHWB patch kernels: x is transposed into its
    zero-padded read-in [C, hR, wR, N] (one per thread's channels), convolved there with the
    row-segment GEMMs, and transposed back into ``out`` [O, N, Ho, Wo]."""
    c, n, h, w = x.shape
    kh, kw = node.params["kernel"]
    dh, dw = node.params["dilation"]
    hr, wr = ho + dh * (kh - 1), wo + dw * (kw - 1)
    o = out.shape[0]
    buf = scratch_as("dense_in", (c, hr, wr, n))
    parallel_ranges(c, lambda lo, hi: transpose_cpu.cnhw_to_chwb_cpu(x, 0, h, tl[0], tl[1], buf, lo, hi))
    y = patch_cpu.conv_chwb(buf, node, cw, act, (ho, wo), alloc=lambda shape: scratch_as("dense_out", shape))
    parallel_ranges(o, lambda lo, hi: transpose_cpu.chwb_to_cnhw_cpu(y, out, 0, lo, hi))


WINO_BAND_FLOATS = 1 << 21  # CHWB input band per step of the dense Winograd path (8 MiB)


def _conv_winograd(x, p, cw, act, tl, ho, wo, out):
    """3x3 stride-1 conv of a CNHW batch by Winograd F(4x4, 3x3) or F(2x2, 3x3)
    (``ConvWeights.winograd3x3``) on CHWB bands: output rows [oy0, oy1) need input rows
    [oy0 - t, oy1 + 2 - t) (zero outside), transposed into a zero-padded band
    [C, oy1 - oy0 + 2, wo + 2, N]; the band's output [O, rows, wo, N] is transposed back into
    ``out``. Bands bound the scratch at any map size (a row count that is a multiple of the
    tile's, so Winograd's tiles never straddle two bands)."""
    c, n, h, w = x.shape
    o = out.shape[0]
    t, l = tl
    wr = wo + 2
    kern, filters = cw.winograd3x3(p, c, (ho, wo))
    tr = 4 if kern is winograd4_cpu else 2
    rows = max(tr, min(-(-ho // tr) * tr, WINO_BAND_FLOATS // max(c * wr * n, 1) // tr * tr))
    for oy0 in range(0, ho, rows):
        oy1 = min(oy0 + rows, ho)
        ylo, yhi = max(oy0 - t, 0), min(oy1 + 2 - t, h)
        hr = oy1 - oy0 + 2
        buf = scratch_as("dense_in", (c, hr, wr, n))
        pt = ylo - (oy0 - t)
        parallel_ranges(c, lambda lo, hi: transpose_cpu.cnhw_to_chwb_cpu(x, ylo, yhi, pt, l, buf, lo, hi))
        y = scratch_as("dense_out", (o, oy1 - oy0, wo, n))
        if kern is winograd4_cpu:
            kern.conv(buf, filters, cw.bias, act, y, chunk_floats=winograd4_cpu.DENSE_CHUNK_FLOATS)
        else:
            kern.conv(buf, filters, cw.bias, act, y)
        parallel_ranges(o, lambda lo, hi: transpose_cpu.chwb_to_cnhw_cpu(y, out, oy0, lo, hi))


def _conv_winograd1d(x, p, cw, act, tl, ho, wo, out):
    """r x 1 or 1 x r stride-1 conv of a CNHW batch by 1-D Winograd (``winograd1d_cpu``): x
    is transposed into a zero-framed buffer with the filter's axis outermost -- CHWB
    [C, ho + r - 1, wo, N] for r x 1, [C, wo + r - 1, ho, N] for 1 x r -- convolved there, and
    the [O, ho, wo, N] / [O, wo, ho, N] result transposed back into ``out``."""
    c, n, h, w = x.shape
    o = out.shape[0]
    t, l = tl
    kh, kw = p["kernel"]
    rows = winograd1d_cpu.filter_axis(p) == 0
    if rows:
        shape, oshape = (c, ho + kh - 1, wo, n), (o, ho, wo, n)
    else:
        shape, oshape = (c, wo + kw - 1, ho, n), (o, wo, ho, n)
    buf = scratch_as("dense_in", shape)
    y = scratch_as("dense_out", oshape)
    if rows:
        parallel_ranges(c, lambda lo, hi: transpose_cpu.cnhw_to_chwb_cpu(x, 0, h, t, l, buf, lo, hi))
    else:
        parallel_ranges(c, lambda lo, hi: transpose_cpu.cnhw_to_cwhb_cpu(x, t, l, buf, lo, hi))
    winograd1d_cpu.conv(buf, cw.winograd1d(), cw.bias, act, y)
    if rows:
        parallel_ranges(o, lambda lo, hi: transpose_cpu.chwb_to_cnhw_cpu(y, out, 0, lo, hi))
    else:
        parallel_ranges(o, lambda lo, hi: transpose_cpu.cwhb_to_cnhw_cpu(y, out, lo, hi))


def _conv_polyphase(x, cw, act, tl, kh, kw, sh, sw, ho, wo, out):
    """Strided conv of a CNHW batch over the input's phase planes (``planner.algorithms.polyphase_taps``):
    per band of output rows, the band's planes [C, phases, hp, wp, N] are built (zero padding
    included), each output row is one tap GEMM into a CHWB scratch [O, rows, wo, N], transposed
    back into ``out``. Bands bound the scratch as in ``_conv_winograd`` (ResNet18's
    layer4.0.conv1 at batch 64: 16 MB of planes in one piece)."""
    c, n = x.shape[:2]
    o = out.shape[0]
    t, l = tl
    used, _, wp = algorithms.phase_planes(kh, kw, sh, sw, 1, wo)
    per_row = c * len(used) * wp * n
    rows = max(1, min(ho, WINO_BAND_FLOATS // max(per_row, 1) - (kh - 1) // sh))
    nb = -(-ho // rows)
    rows = -(-ho // nb)  # even bands: 7 rows are 4 + 3, not 6 + 1
    for oy0 in range(0, ho, rows):
        oy1 = min(oy0 + rows, ho)
        phases, offs, hp, wp = algorithms.polyphase_taps(kh, kw, sh, sw, oy1 - oy0, wo, n)
        planes = scratch_as("dense_in", (c, len(phases), hp, wp, n))
        pt = t - oy0 * sh  # the band's first plane row is input row oy0 * sh + p - t
        parallel_ranges(c, lambda lo, hi: kernels_cpu.polyphase_cnhw_cpu(x, pt, l, sh, sw, phases, planes, lo, hi))
        y = scratch_as("dense_out", (o, oy1 - oy0, wo, n))
        patch_cpu.conv_rows(planes.reshape(c, -1), cw, offs, oy1 - oy0, wo, wp, n, act, y.reshape(o, -1))
        parallel_ranges(o, lambda lo, hi: transpose_cpu.chwb_to_cnhw_cpu(y, out, oy0, lo, hi))


def _conv_phase_grid(x, cw, g, cg, og, kh, kw, sh, sw, t, l, ho, wo, act, out):
    """Strided conv (dilation 1) as ``_conv_shifted`` over the input's phase planes: tap (i, j)
    reads plane (i % sh, j % sw) of the phase grid [N, hp, wp] (``algorithms.phase_planes``) at
    grid offset (i // sh) * wp + j // sw; with a chunk's planes side by side per channel
    (``kernels_cpu.phasegrid_chunk_cpu``, one row of ld values per plane) tap t of channel c
    is read at slot(t) * ld + offset(t) of the channel's row. Grid positions past [0, Ho) x
    [0, Wo) are computed and dropped (``conv_cpu.PHASE_GRID_MAX_WASTE``)."""
    used, hp, wp = algorithms.phase_planes(kh, kw, sh, sw, ho, wo)
    slot = {ph: k for k, ph in enumerate(used)}
    phases = np.array(used, np.int64).reshape(-1, 2)

    def offsets(ld):
        return [slot[(i % sh, j % sw)] * ld + (i // sh) * wp + j // sw for i in range(kh) for j in range(kw)]

    def fill(gi, q0, q1, buf):
        kernels_cpu.phasegrid_chunk_cpu(x, gi * cg, cg, t, l, sh, sw, phases, hp, wp, q0, q1, buf)

    _grid_tap_gemm(cw, g, cg, og, len(used), x.shape[1], hp, wp, ((kh - 1) // sh) * wp + (kw - 1) // sw,
                   offsets, fill, ho, wo, act, out)


_ONE_PHASE = np.zeros((1, 2), np.int64)  # a stride-1 grid: the phase grid's one phase (0, 0)


def _conv_shifted(x, cw, g, cg, og, kh, kw, dh, dw, t, l, hs, wp, ho, wo, act, out):
    """Stride-1 conv as kh*kw accumulated GEMMs over shifted column windows.

    The input is laid out (chunk by chunk, per thread) on a zero-padded grid [N, hs, wp] whose
    rows / images share their padding (hs = H + max(t, b), wp = W + max(l, r)): then the input
    of tap (i, j) for output grid position q is grid position q + i*dh*wp + j*dw, so tap (i, j)
    contributes W[:, :, i, j] @ grid[:, q0 + off : q1 + off] -- one plain GEMM on a column
    window, no 9x im2col copy. Grid positions outside [0, Ho) x [0, Wo) are computed and
    dropped by the epilogue (the ``SHIFT_MAX_WASTE`` bound)."""

    def fill(gi, q0, q1, buf):
        kernels_cpu.phasegrid_chunk_cpu(x, gi * cg, cg, t, l, 1, 1, _ONE_PHASE, hs, wp, q0, q1, buf)

    _grid_tap_gemm(cw, g, cg, og, 1, x.shape[1], hs, wp, (kh - 1) * dh * wp + (kw - 1) * dw,
                   lambda ld: [i * dh * wp + j * dw for i in range(kh) for j in range(kw)], fill, ho, wo, act, out)


def _grid_tap_gemm(cw, g, cg, og, nplanes, n, hs, wp, maxoff, offsets, fill, ho, wo, act, out):
    """The frame of the grid convs (``_conv_shifted``, ``_conv_phase_grid``): the grid's
    N * hs * wp positions in column chunks over the threads; per chunk and group,
    ``fill(gi, q0, q1, buf)`` lays the chunk's input out as ``nplanes`` rows of ld = chunk +
    maxoff values per channel (positions q0 .. q1 of each plane), one tap GEMM with the tap
    offsets ``offsets(ld)`` into each channel's rows, and the epilogue keeps positions inside
    [0, Ho) x [0, Wo) of each image (bias + activation)."""
    code, a0, a1 = act
    grid = n * hs * wp
    qc = cols_chunk(grid, cg * nplanes + og, SHIFT_BUDGET)
    ld = qc + maxoff
    offs = np.array(offsets(ld), np.int64)
    bias = cw.bias

    def one(ci):
        q0 = ci * qc
        q1 = min(q0 + qc, grid)
        m = q1 - q0
        buf = scratch("work", cg * nplanes * ld).reshape(cg * nplanes, ld)
        s = scratch("acc", og * qc).reshape(og, qc)[:, :m]
        for gi in range(g):
            fill(gi, q0, q1 + maxoff, buf)
            conv_gemm(cw, gi, buf.reshape(cg, nplanes * ld), offs, 0, m, s)
            kernels_cpu.shift_epilogue_cpu(s, gi * og, q0, q1, hs, wp, ho, wo, bias, code, a0, a1, out)

    parallel_chunks(-(-grid // qc), one)


def avgpool_inverse_counts(hw, kernel, pads, out_hw, include_pad: bool) -> np.ndarray:
    """1 / (the cells average pooling divides by) per output cell, flat [Ho * Wo] float32, for
    stride 1: the patch route's separable per-axis divisors (``patch_cpu.avg_divisors_cpu``)
    for one read-in context whose origin is the padded map's corner."""
    (h, w), (kh, kw), (t, l, b, r) = hw, kernel, pads
    origin = np.array([[-t, -l]], np.int64)
    iy = patch_cpu.avg_divisors_cpu(origin, 0, out_hw[0], 1, kh, h, t, b, include_pad)[:, 0]
    ix = patch_cpu.avg_divisors_cpu(origin, 1, out_hw[1], 1, kw, w, l, r, include_pad)[:, 0]
    return np.ascontiguousarray(np.outer(iy, ix).reshape(-1), np.float32)


def pool_cnhw(x: np.ndarray, node: Node, pads=None, out_hw=None, out: np.ndarray | None = None) -> np.ndarray:
    p = node.params
    x = np.ascontiguousarray(x, np.float32)
    c, n, _, _ = x.shape
    ho, wo = out_hw if out_hw is not None else node.shape[1:]
    t, l, b, r = pads if pads is not None else p["pads"]
    if out is None:
        out = np.empty((c, n, ho, wo), np.float32)
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    is_max = node.op is Op.MAXPOOL
    inc = bool(p.get("count_include_pad", False))
    if not is_max and sh == sw == 1 and ho + kh - 1 <= x.shape[2] + t + b and wo + kw - 1 <= x.shape[3] + l + r:
        inv = avgpool_inverse_counts(x.shape[2:], (kh, kw), (t, l, b, r), (ho, wo), inc)
        parallel_ranges(c * n, lambda lo, hi: kernels_cpu.avgpool_s1_cnhw_cpu(x, kh, kw, t, l, inv, lo, hi, out), 4)
        return out
    parallel_ranges(c * n, lambda lo, hi: kernels_cpu.pool_cnhw_cpu(x, kh, kw, sh, sw, t, l, b, r, is_max, inc,
                                                           lo, hi, out), 4)
    return out


def pointwise_any(x: np.ndarray, node: Node, out: np.ndarray | None = None) -> np.ndarray:
    """A pointwise node on a CNHW feature map or an [N, K] vector batch."""
    x = np.ascontiguousarray(x, np.float32)
    if out is None:
        out = np.empty_like(x)
    if node.op is Op.AFFINE:
        s = np.ascontiguousarray(node.weights["scale"], np.float32)
        sh = np.ascontiguousarray(node.weights["shift"], np.float32)
        if x.ndim == 4:
            x2 = x.reshape(x.shape[0], -1)
            o2 = out.reshape(x.shape[0], -1)
            parallel_ranges(x.shape[0], lambda lo, hi: kernels_cpu.affine_rows_cpu(x2, s, sh, o2, lo, hi),
                            max(1, 65536 // max(x2.shape[1], 1)))
        else:
            np.add(x * s, sh, out=out)
        return out
    code, a0, a1 = act_spec(node)
    xf = x.reshape(-1)
    of = out.reshape(-1)
    parallel_ranges(xf.size, lambda lo, hi: kernels_cpu.act_range_cpu(xf, of, code, a0, a1, lo, hi), 65536)
    return out


def dense(x: np.ndarray, wt: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[N, K_in] @ winograd_cpu.T[K_in, K_out] + B, output columns split over the threads."""
    x = np.ascontiguousarray(x, np.float32)
    n = x.shape[0]
    ko = wt.shape[1]
    y = np.empty((n, ko), np.float32)
    y[:] = bias
    step = max(64, -(-ko // num_threads()))
    with blas_cpu.single_threaded_blas():
        parallel_chunks(-(-ko // step), lambda i: blas_cpu.gemm(x, wt[:, i * step : (i + 1) * step],
                                                         y[:, i * step : (i + 1) * step], 1.0))
    return y


def prepare_weights(node: Node):
    """What the CPU operator of ``node`` reads its weights as: ``ConvWeights`` of a conv, the
    transposed [K, O] matrix of a fully connected layer, else None."""
    if node.op is Op.CONV:
        return ConvWeights.of(node)
    if node.op is Op.GEMM:
        return np.ascontiguousarray(node.weights["W"].T, np.float32)
    return None


def conv_hw(x: np.ndarray, node: Node) -> tuple[int, int]:
    p = node.params
    _, _, h, w = x.shape
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    dh, dw = p["dilation"]
    t, l, b, r = p["pads"]
    return (h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + l + r - dw * (kw - 1) - 1) // sw + 1
