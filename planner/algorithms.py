"""Which CPU algorithm runs a convolution: part of lowering, a pure function of the layer's
params, channel counts and output size.

The executors run what these predicates choose; batching (buffer sizes), the cost model and
EXPLAIN read the same predicates, so a switch here changes all of them at once. Every
algorithm has an environment switch for comparisons (bench, research) and a module flag
tests may patch (``algorithms.WINOGRAD = False``). A conv whose params hold
``winograd=False`` (``Model.with_precision("exact")``) never runs a Winograd algorithm; one
whose params hold ``winograd="f2"`` runs no F(4x4, 3x3) (``krypton_db.precision`` sets these
per conv to keep a model inside the precision budget; absent means True: any algorithm).
"""

from __future__ import annotations

import os

import numpy as np

# -- Winograd F(2x2, 3x3) (exec/winograd_cpu.py) --------------------------------------------
# KRYPTON_WINOGRAD=0: every conv runs direct
WINOGRAD = os.environ.get("KRYPTON_WINOGRAD", "1") != "0"
WINOGRAD_MIN_CHANNELS = 16  # below this the 16 GEMMs are too thin (K = C) to beat direct
# Winograd computes whole 2x2 output tiles: odd sizes pad up (7x7 -> 8x8, 1.31x the work,
# still 1.72x fewer multiplications than direct). 5x5 (1.44x) and 3x3 (1.78x) stay direct.
WINOGRAD_MAX_TILE_WASTE = 1.35


def winograd_f2(node_params: dict, c: int, groups: int, out_hw) -> bool:
    """Whether a conv with these params, ``c`` input channels and output size ``out_hw``
    runs as Winograd F(2x2, 3x3): 3x3, stride 1, dilation 1, one group, >= 16 input
    channels, tile padding <= 1.35x, and Winograd enabled."""
    p = node_params
    ho, wo = out_hw
    return (WINOGRAD and p.get("winograd", True) and tuple(p["kernel"]) == (3, 3) and tuple(p["stride"]) == (1, 1)
            and tuple(p["dilation"]) == (1, 1) and groups == 1 and c >= WINOGRAD_MIN_CHANNELS
            and ho * wo > 0 and 4 * (-(-ho // 2)) * (-(-wo // 2)) <= WINOGRAD_MAX_TILE_WASTE * ho * wo)


# -- Winograd F(4x4, 3x3) (exec/winograd4_cpu.py) -------------------------------------------
# KRYPTON_WINOGRAD4=0: F(2x2, 3x3) everywhere (and only where F(2x2, 3x3) is enabled)
WINOGRAD4 = os.environ.get("KRYPTON_WINOGRAD4", "1") != "0"
WINOGRAD4_MIN_CHANNELS = 64  # input and output channels (the GEMMs' K and M)
# Transformed filters per conv at most this many bytes (36 matrices O x C, 2.25x F(2x2)'s):
# wider convs stay F(2x2), so exact runs peak no higher than naive re-inference (ResNet18:
# every 3x3 conv on F(4x4) peaked at 535 MB against ORT-naive's 470-488 MB).
WINOGRAD4_MAX_FILTER_BYTES = 8 << 20
# F(4x4) takes a conv when its GEMM multiply-adds times this are below F(2x2)'s: its
# transforms cost more per product.
WINOGRAD4_OVERHEAD = 1.25


def winograd_f4(node_params: dict, c: int, o: int, groups: int, out_hw) -> bool:
    """Whether a conv runs as F(4x4, 3x3): F(2x2, 3x3)'s conditions, >= 64 channels in and
    out, filters within the byte cap, and fewer GEMM multiply-adds than F(2x2) by more than
    the overhead (36 per 4x4 tile against 16 per 2x2 tile: 13x13 and 14x14 outputs yes, 9x9
    and 10x10 no)."""
    ho, wo = out_hw
    tiles4 = -(-ho // 4) * -(-wo // 4)
    tiles2 = -(-ho // 2) * -(-wo // 2)
    return (WINOGRAD4 and node_params.get("winograd", True) is True
            and winograd_f2(node_params, c, groups, out_hw)
            and min(c, o) >= WINOGRAD4_MIN_CHANNELS and 36 * o * c * 4 <= WINOGRAD4_MAX_FILTER_BYTES
            and WINOGRAD4_OVERHEAD * 36 * tiles4 < 16 * tiles2)


# -- 1-D Winograd F(4, r) for r x 1 / 1 x r convs (exec/winograd1d_cpu.py) --------------------
# KRYPTON_WINOGRAD1D=0 (or KRYPTON_WINOGRAD=0): these convs run direct
WINOGRAD1D = os.environ.get("KRYPTON_WINOGRAD1D", "1") != "0"
WINOGRAD1D_TILE = {7: 4, 3: 4}  # outputs per tile (m) for each filter length r it covers
WINOGRAD1D_MIN_CHANNELS = 16
WINOGRAD1D_MAX_TILE_WASTE = 1.35  # whole m-row tiles: 17 rows with m = 4 compute 20 (1.18x)


def winograd1d_axis(node_params: dict) -> int | None:
    """0 for an r x 1 conv (along rows), 1 for 1 x r (along columns), None otherwise."""
    kh, kw = node_params["kernel"]
    if kw == 1 and kh in WINOGRAD1D_TILE:
        return 0
    if kh == 1 and kw in WINOGRAD1D_TILE:
        return 1
    return None


def winograd1d(node_params: dict, c: int, groups: int, out_hw) -> bool:
    """Whether a conv runs as 1-D Winograd: r x 1 or 1 x r with r in (3, 7), stride 1,
    dilation 1, one group, >= 16 input channels, tile padding <= 1.35x."""
    p = node_params
    ax = winograd1d_axis(p)
    if not (WINOGRAD1D and WINOGRAD and p.get("winograd", True)) or ax is None or groups != 1 \
            or c < WINOGRAD1D_MIN_CHANNELS:
        return False
    if tuple(p["stride"]) != (1, 1) or tuple(p["dilation"]) != (1, 1):
        return False
    n = out_hw[ax]
    m = WINOGRAD1D_TILE[p["kernel"][ax]]
    return n > 0 and out_hw[1 - ax] > 0 and m * (-(-n // m)) <= WINOGRAD1D_MAX_TILE_WASTE * n


# -- strided convs over phase planes (exec/conv_cpu.py, exec/patch_cpu.py) ------------------
# KRYPTON_POLYPHASE=0: strided convs run as im2col + GEMM
POLYPHASE = os.environ.get("KRYPTON_POLYPHASE", "1") != "0"


def by_phase_planes(p: dict) -> bool:
    """Whether a conv with node params ``p`` runs over its input's phase planes
    (``polyphase_taps``): one group, a stride above 1, dilation 1, not switched off."""
    (sh, sw), (dh, dw) = p["stride"], p["dilation"]
    return POLYPHASE and p["groups"] == 1 and (sh > 1 or sw > 1) and dh == dw == 1


def phase_planes(kh, kw, sh, sw, ho, wo):
    """(the phases (p, q) a stride-(sh, sw) kh x kw conv's taps use, sorted; the planes' hp, wp
    for an ho x wo output)."""
    used = sorted({(i % sh, j % sw) for i in range(kh) for j in range(kw)})
    return used, ho + (kh - 1) // sh, wo + (kw - 1) // sw


def polyphase_taps(kh, kw, sh, sw, ho, wo, nb):
    """A stride-(sh, sw) convolution (dilation 1) is a stride-1 one over the input's phase
    planes P_pq[y, x] = in[y*sh + p, x*sw + q]: tap (i, j) reads plane (i % sh, j % sw) at
    (oy + i // sh, ox + j // sw). Returns (the phases the taps use [n, 2], each tap's column
    offset into the flattened [phase, hp, wp, B] planes, hp, wp): the convolution is then
    ``gemm_cpu``'s tap GEMM over output rows, without the kh*kw / (sh*sw) larger im2col."""
    used, hp, wp = phase_planes(kh, kw, sh, sw, ho, wo)
    slot = {p: k for k, p in enumerate(used)}
    offs = np.array([(slot[(i % sh, j % sw)] * hp * wp + (i // sh) * wp + j // sw) * nb
                     for i in range(kh) for j in range(kw)], np.int64)
    return np.array(used, np.int64).reshape(-1, 2), offs, hp, wp


# -- the algorithm a conv runs, by name ------------------------------------------------------
def conv_algorithm(node) -> str:
    """The CPU algorithm a CONV node runs with its params and shapes: ``"winograd4"``
    (F(4x4, 3x3)), ``"winograd2"`` (F(2x2, 3x3)), ``"winograd1d"`` (F(4, r)) or ``"direct"``
    (every other lowering: GEMM, depthwise, phase planes; exact float32 sums)."""
    g = node.params["groups"]
    c = node.weights["W"].shape[1] * g
    o = node.weights["W"].shape[0]
    hw = node.shape[1:]
    if winograd_f4(node.params, c, o, g, hw):
        return "winograd4"
    if winograd_f2(node.params, c, g, hw):
        return "winograd2"
    if winograd1d(node.params, c, g, hw):
        return "winograd1d"
    return "direct"


# the ``winograd`` param that caps a conv at each algorithm (the fastest it may then run)
ALGORITHM_CAP = {"winograd4": True, "winograd2": "f2", "winograd1d": True, "direct": False}


# -- channels-last (NHWC) steps of the dense CPU executor (exec/nhwc_cpu.py) -----------------
# KRYPTON_CHANNELS_LAST=0: every step runs in CNHW
CHANNELS_LAST = os.environ.get("KRYPTON_CHANNELS_LAST", "1") != "0"
CHANNELS_LAST_MULTIPLE = 16  # depthwise channel counts: whole vectors on AVX-512 and AVX2
# (kernel, stride) of the depthwise windows with a register-blocked channels-last kernel
CHANNELS_LAST_DEPTHWISE = frozenset({(3, 1), (3, 2), (5, 1), (5, 2)})


def channels_last_depthwise(node) -> bool:
    """A depthwise conv (multiplier 1) with a channels-last kernel: square 3x3 / 5x5 window,
    equal strides 1 or 2, no dilation, channels a multiple of 16."""
    p = node.params
    w = node.weights["W"]
    c = w.shape[0]
    kh, kw = p["kernel"]
    sh, sw = p["stride"]
    return (p["groups"] == c and w.shape[1] == 1 and c % CHANNELS_LAST_MULTIPLE == 0 and kh == kw
            and sh == sw and (kw, sw) in CHANNELS_LAST_DEPTHWISE and tuple(p["dilation"]) == (1, 1))


def channels_last_pointwise(node) -> bool:
    """A 1x1 stride-1 unpadded one-group conv (the channels-last GEMM over pixels; any channel
    counts)."""
    p = node.params
    return (p["groups"] == 1 and tuple(p["kernel"]) == (1, 1) and tuple(p["stride"]) == (1, 1)
            and tuple(p["pads"]) == (0, 0, 0, 0))


# a one-group conv inside a channels-last group runs the 1x1 GEMM's micro-kernel straight on
# the map (one K segment of kw * C floats per kernel row), with no K blocking: at most this
# many multiply-adds per output (kh * kw * C), which suits RGB stems (27 = 3x3x3), not wide convs
CHANNELS_LAST_DIRECT_MAX_K = 256


def channels_last_direct(node) -> bool:
    """A one-group conv other than 1x1 stride 1 with short rows of taps (the RGB stem of a
    depthwise-separable net), no dilation."""
    p = node.params
    w = node.weights["W"]
    return (p["groups"] == 1 and tuple(p["dilation"]) == (1, 1)
            and w.shape[1] * w.shape[2] * w.shape[3] <= CHANNELS_LAST_DIRECT_MAX_K
            and not channels_last_pointwise(node))


# A 1x1 conv runs fused with the depthwise conv reading it (``physical.pointwise_depthwise_
# pairs``) when its output map is at least this many bytes per image. Measured per pair (AVX-512,
# batch 16, fused / unfused ms): EfficientNet-Lite0's expand convs at 4.8 MB per image 12.0 /
# 15.1-15.7, 1.8 MB 7.1-7.4 / 9.4-9.8 and 5.7 / 7.4-7.7; at 0.75 MB mixed (4.1 / 3.9-5.0,
# 2.9-3.0 / 3.6-4.0); at 0.4 MB and below slower (the ring's short rows re-read the weights per
# image row and leave partial tiles): 2.7-4.0 / 2.2-2.8, PP-LCNet's 14x14 pairs 2.2-3.5 /
# 1.8-3.0.
POINTWISE_DEPTHWISE_MIN_BYTES = 1 << 20
