"""Convolution building blocks the dense and the incremental CPU paths share: a conv's
weights prepared once per layout (``ConvWeights``), the tap GEMM over columns of a source
(``conv_gemm``), the 1x1 GEMM and the strided-conv route choice (``by_phase_planes``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..graph import Node
from ..planner import algorithms
from . import blas_cpu
from . import gemm_cpu, kernels_cpu, winograd1d_cpu, winograd4_cpu, winograd_cpu
from .runtime import num_threads, parallel_chunks

# column chunk bounds of the conv GEMMs (values per thread's block)
MIN_COLS, MAX_COLS = 256, 4096


@dataclass
class ConvWeights:
    """Per-group GEMM matrices of a conv, prepared once."""

    mats: list[np.ndarray]
    bias: np.ndarray
    w4: np.ndarray
    taps: list[np.ndarray] | None = None  # per group [kh*kw, O/g, C/g] (shifted-window GEMMs)
    packs: list[np.ndarray] | None = None  # per group, ``gemm_cpu.pack_weights(mats[g])``
    wino: np.ndarray | None = None  # ``winograd_cpu.transform_filters(w4)``: [16, ...]
    wino1d: tuple | None = None  # ``winograd1d_cpu.transform_filters(w4)``
    wino4: np.ndarray | None = None  # ``winograd4_cpu.transform_filters(w4)``: [36, ...]

    @classmethod
    def of(cls, node: Node) -> "ConvWeights":
        w = np.asarray(node.weights["W"], np.float32)
        g = node.params["groups"]
        og = w.shape[0] // g
        mats = [np.ascontiguousarray(w[i * og : (i + 1) * og].reshape(og, -1)) for i in range(g)]
        return cls(mats, np.ascontiguousarray(node.weights["B"], np.float32), np.ascontiguousarray(w))

    def tap_mats(self) -> list[np.ndarray]:
        if self.taps is None:
            o, cg, kh, kw = self.w4.shape
            g = len(self.mats)
            og = o // g
            self.taps = [np.ascontiguousarray(self.w4[i * og : (i + 1) * og].transpose(2, 3, 0, 1)
                                              .reshape(kh * kw, og, cg)) for i in range(g)]
        return self.taps

    def winograd(self) -> np.ndarray:
        if self.wino is None:
            self.wino = winograd_cpu.transform_filters(self.w4)
        return self.wino

    def winograd4(self) -> np.ndarray:
        if self.wino4 is None:
            self.wino4 = winograd4_cpu.transform_filters(self.w4)
        return self.wino4

    def winograd3x3(self, params: dict, c: int, out_hw):
        """(the Winograd kernel module, its filters) for this conv (node ``params``, ``c``
        input channels, output size ``out_hw``; one ``winograd_cpu.eligible`` accepts):
        F(4x4, 3x3) where ``winograd4_cpu`` takes it, else F(2x2, 3x3)."""
        if winograd4_cpu.eligible(params, c=c, o=self.w4.shape[0], groups=len(self.mats), out_hw=out_hw):
            return winograd4_cpu, self.winograd4()
        return winograd_cpu, self.winograd()

    def winograd1d(self) -> tuple:
        if self.wino1d is None:
            self.wino1d = winograd1d_cpu.transform_filters(self.w4)
        return self.wino1d

    def packed(self, gi: int) -> np.ndarray:
        if self.packs is None:
            self.packs = [gemm_cpu.pack_weights(m) for m in self.mats]
        return self.packs[gi]


# the dense route builds the phase planes with a strided CNHW read: for an RGB first layer
# (ResNet's 7x7 conv1) that costs more than the chunked im2col it replaces (69 vs 27 ms)
POLYPHASE_MIN_C = 16


by_phase_planes = algorithms.by_phase_planes  # strided convs over phase planes
# Strided convs over phase planes laid out as the shifted-window grid (``dense_cpu._conv_phase_grid``)
# while the grid's dropped positions stay within PHASE_GRID_MAX_WASTE and the output has at
# least PHASE_GRID_MIN_O channels; else CHWB phase planes / im2col. Measured per layer on
# the 2-core AVX2 host, grid / present: ResNet18 conv1 (7x7/2 RGB, waste 0.05) 1.16x,
# layer2.0.conv1 (0.07) 1.07x, Inception3's RGB stem (0.01) 1.09x, Mixed_6a.branch3x3 (0.12)
# 1.04x; waste 0.15-0.31 (14x14 .. 7x7 outputs) 0.76-0.95x; PP-LCNet's 16-channel RGB stem
# 0.90x (the epilogue's compaction pass is per output value, the im2col it saves per input).
PHASE_GRID = os.environ.get("KRYPTON_PHASE_GRID", "1") != "0"
PHASE_GRID_MAX_WASTE = 0.12
PHASE_GRID_MIN_O = 32


def phase_grid_waste(kh, kw, sh, sw, ho, wo) -> float:
    """Share of extra phase-grid positions a strided conv computes and drops: the grid is
    [hp, wp] = [ho + (kh-1)//sh, wo + (kw-1)//sw] per image for an ho x wo output."""
    _, hp, wp = algorithms.phase_planes(kh, kw, sh, sw, ho, wo)
    return hp * wp / (ho * wo) - 1.0

# "own": convolutions run on gemm_cpu's tap GEMM; "openblas": on OpenBLAS sgemm, one call per
# tap (the previous lowering, kept for comparison: KRYPTON_GEMM=openblas python bench/full.py)
GEMM = os.environ.get("KRYPTON_GEMM", "own")


def conv_gemm(cw: ConvWeights, gi: int, src: np.ndarray, offs, col0: int, ncols: int, ys: np.ndarray,
              accumulate: bool = False, act=None) -> None:
    """``ys[:, :ncols] (+)= sum_t W_t @ src[:, col0 + offs[t] : col0 + offs[t] + ncols]`` for
    group ``gi`` of a conv: W_t is tap t's [O/g, C/g] matrix (one tap, offs = (0,): the plain
    GEMM ``W[O/g, C/g*kh*kw] @ src`` of an im2col or 1x1 conv). With ``act`` (``act_spec``)
    the epilogue ``ys = act(ys + bias)`` follows (in the GEMM's tiles on our own GEMM)."""
    if ncols <= 0:
        return
    m = ys.shape[0]
    bias = cw.bias[gi * m : (gi + 1) * m] if act is not None else None
    if GEMM != "openblas" or not blas_cpu.HAVE_BLAS:
        gemm_cpu.tap_gemm(cw.packed(gi), m, src, np.asarray(offs, np.int64), col0, ncols, ys, accumulate,
                   bias=bias, act=act)
        return
    mats = [cw.mats[gi]] if len(offs) == 1 else cw.tap_mats()[gi]
    for k, off in enumerate(offs):
        blas_cpu.gemm(mats[k], src[:, col0 + off : col0 + off + ncols], ys[:, :ncols],
               1.0 if (k > 0 or accumulate) else 0.0)
    if act is not None:
        kernels_cpu.bias_act_rows_cpu(ys[:, :ncols], bias, *act)


def cols_chunk(ncols: int, per_col: int, budget: int) -> int:
    """Columns per chunk: about ``budget`` floats of working set (within [MIN_COLS,
    MAX_COLS]), and a chunk count that is a multiple of the thread count so small layers do
    not leave a core idle for a partial last chunk. A multiple of 16."""
    t = num_threads()
    qc = min(max(budget // max(per_col, 1), MIN_COLS), MAX_COLS)
    nch = -(-ncols // qc)
    nch = -(-nch // t) * t
    qc = -(-ncols // nch)
    qc = (qc + 15) // 16 * 16
    return max(16, min(qc, max(ncols, 1)))


GEMM_MAX_COLS = 8192


def _gemmcols_chunk(ncols: int) -> int:
    """Columns per chunk of a 1x1 conv (a plain GEMM on the input, no per-chunk scratch):
    two chunks per thread (up to GEMM_MAX_COLS wide), whole micro-tiles (a multiple of
    ``gemm_cpu.NR``). Measured on Inception3's 17x17 / 8x8 1x1 convs at batch 27 (2-core
    AVX-512): 336-370 -> 369-388 GFLOP/s against ``_cols_chunk``'s ~400-column chunks, whose
    ragged last micro-tile and per-chunk weight passes cost ~8%."""
    t = num_threads()
    nch = max(2 * t, -(-ncols // GEMM_MAX_COLS))
    nch = -(-nch // t) * t
    qc = -(-ncols // nch)
    return max(16, min(-(-qc // gemm_cpu.NR) * gemm_cpu.NR, ncols))


def conv1x1(x2: np.ndarray, cw: ConvWeights, g: int, act, out2: np.ndarray) -> None:
    """A 1x1 stride-1 conv as the GEMM ``out2 [O, cols] = act(W @ x2 [C, cols] + bias)`` per
    group, on the input as it lies (CNHW batch or CHWB read-in), column chunks in parallel."""
    cg, og = x2.shape[0] // g, out2.shape[0] // g
    ncols = x2.shape[1]
    qc = _gemmcols_chunk(ncols)

    def one(ci):
        j0 = ci * qc
        j1 = min(j0 + qc, ncols)
        for gi in range(g):
            ys = out2[gi * og : (gi + 1) * og, j0:j1]
            conv_gemm(cw, gi, x2[gi * cg : (gi + 1) * cg], (0,), j0, j1 - j0, ys, act=act)

    parallel_chunks(-(-ncols // qc), one)
