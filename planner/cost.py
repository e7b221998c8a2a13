"""Runtime cost model of occlusion plans, calibrated on this machine (EXPLAIN's estimate).

Model: every physical step of a batch of B queries costs

    t_step(B) = B * (a_conv * patch conv MACs + a_acc * conv accumulations
                     + a_dense * dense conv MACs + a_fc * FC MACs + a_mem * elements moved)
                + c_step

per query features read off the plan (``step_features``), the same for the incremental path
(patch sizes from the delta plan, the kernels the executor launches: ``physical_steps``) and
for full inference (materializing the views, naive re-inference):
- patch conv MACs    MACs of convolutions on batched read-in contexts (GEMM work)
- dense conv MACs    MACs of convolutions over full tensors (the dense executor's kernels:
                     materializing, naive re-inference, steps after a global layer)
- conv accumulations MACs / (C / groups): output cells x taps -- the accumulate-into-C
                     traffic of the shifted-window GEMMs, which makes small-C convs slower
                     per MAC than large-C ones
- FC MACs            fully connected products (a batch-sized GEMM, different efficiency)
- (Winograd convs)   3x3 stride-1 convs count the GEMM MACs Winograd executes (F(4x4, 3x3):
                     36 per 4x4 output tile and channel pair, not 144; F(2x2, 3x3): 16 per
                     2x2 tile, not 36) and their transforms' traffic as elements moved;
                     1x7 / 7x1 / 1x3 / 3x1 convs likewise for the 1-D F(4, r)
                     (``winograd1d_cpu``: 10 products per 4 outputs, not 28)
- elements moved     memory-bound kernels: read-in gathers, stitches, pooling inputs,
                     pointwise / merge outputs
- c_step             a fixed cost per step and batch (Python dispatch, thread-pool wakeups)

A query run costs sum over batches and steps + materializing the views (one full inference
of the unoccluded image). ``krypton_db.calibration.calibrate`` fits the five constants by non-negative least squares
on *per-step* times of profiled exact-occlusion runs (several models, patch sizes and batch
sizes, so each constant is pinned by hundreds of samples) and stores them as JSON
(``cost_model_path()``); ``load_cost_model`` reads them back (defaults when uncalibrated).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from krypton_db.graph import Op
from krypton_db.zoo import cache_dir

from . import algorithms
from .physical import Route, executed_macs, physical_steps

VERSION = 6  # bump when the features change: older calibrations fall back to the defaults
FEATURES = ("conv_macs", "conv_acc", "dense_conv_macs", "fc_macs", "moved", "step")
NQ = len(FEATURES) - 1  # per-query features (the last one is per step and batch)
# rough constants of a 2-core AVX2 machine, used until CALIBRATE runs (seconds per unit)
DEFAULTS = dict(conv_macs=1 / 60e9, conv_acc=2e-10, dense_conv_macs=1 / 60e9, fc_macs=1 / 40e9,
                moved=5e-10, step=2e-5)


def cost_model_path() -> Path:
    """``$KRYPTON_COST_MODEL``, else ``<krypton cache dir>/cost_model.json``."""
    env = os.environ.get("KRYPTON_COST_MODEL")
    if env:
        return Path(env).expanduser()

    return cache_dir() / "cost_model.json"


def load_cost_model(path=None) -> dict:
    """The calibrated constants (``FEATURES`` -> seconds per unit, ``source``), or the defaults
    when uncalibrated, unreadable or written by an older model version."""
    p = Path(path) if path else cost_model_path()
    try:
        d = json.loads(p.read_text())
        coef = d.get("coef", {})
        if d.get("version") == VERSION and all(isinstance(coef.get(k), (int, float)) and coef[k] >= 0 for k in FEATURES):
            return dict(coef={k: float(coef[k]) for k in FEATURES},
                        source=f"calibrated on {', '.join(d.get('models', ['?']))}")
    except (OSError, ValueError, AttributeError):
        pass
    return dict(coef=dict(DEFAULTS), source="defaults (uncalibrated)")


# -- features ------------------------------------------------------------------------------------


def _elems(shape) -> int:
    return int(math.prod(shape))


def _op_features(node, graph, macs: int, in_elems: int, out_elems: int,
                 dense: bool, out_hw=None) -> np.ndarray:
    f = np.zeros(len(FEATURES))
    if node.op is Op.CONV:
        c = graph[node.inputs[0]].shape[0]
        g = node.params.get("groups", 1)
        cg = c // g
        ho, wo = out_hw if out_hw is not None else node.shape[1:]
        if algorithms.winograd_f4(node.params, c=c, o=node.shape[0], groups=g, out_hw=(ho, wo)):
            # Winograd F(4x4, 3x3): 36 products per 4x4 output tile instead of 144
            tiles = -(-ho // 4) * -(-wo // 4)
            macs = macs * 36 * tiles / (9 * ho * wo)
            f[4] += 36 * tiles * (c + node.shape[0])
        elif algorithms.winograd_f2(node.params, c, g, (ho, wo)):
            # Winograd F(2x2, 3x3): 16 products per 2x2 output tile instead of 36 (the GEMM
            # MACs it executes, odd sizes padded to whole tiles) + its transforms' traffic
            tiles = -(-ho // 2) * -(-wo // 2)
            macs = macs * 16 * tiles / (9 * ho * wo)
            f[4] += 16 * tiles * (c + node.shape[0])
        elif algorithms.winograd1d(node.params, c, g, (ho, wo)):
            # 1-D Winograd F(m, r): alpha = m + r - 1 products per m outputs along the filter
            # axis instead of m * r, the last tile padded whole, + its transforms' traffic
            ax = algorithms.winograd1d_axis(node.params)
            r = node.params["kernel"][ax]
            m = algorithms.WINOGRAD1D_TILE[r]
            n_ax, n_other = (ho, wo) if ax == 0 else (wo, ho)
            tiles = -(-n_ax // m) * n_other
            macs = macs * (m + r - 1) * tiles / (r * ho * wo)
            f[4] += (m + r - 1) * tiles * (c + node.shape[0])
        f[2 if dense else 0] += macs
        f[1] += macs / max(cg, 1)
    elif node.op is Op.GEMM:
        f[3] += macs
    else:
        f[4] += in_elems + out_elems
    f[NQ] = 1.0
    return f


def step_features(plan) -> list[tuple[str, np.ndarray]]:
    """(step name, per-query features) of the incremental plan's physical steps, the kernels
    the executor launches (``planner.physical.physical_steps``)."""

    g = plan.graph
    out = []
    for op in physical_steps(plan):
        ds, node = op.delta, op.delta.node
        patch_out = op.out_patch
        c_in = [g[i].shape[0] if len(g[i].shape) == 3 else _elems(g[i].shape) for i in node.inputs]
        moved = 0.0
        if patch_out and ds.out_size is not None:
            oh, ow = ds.out_size
            out_elems = node.shape[0] * oh * ow if len(node.shape) == 3 else _elems(node.shape)
            rin = ds.read_in or ds.out_size
            in_elems = sum(c * rin[0] * rin[1] for c in c_in)
            if op.route in (Route.PATCH_WINDOW, Route.PATCH_MERGE):
                moved += in_elems
        else:
            out_elems = _elems(node.shape)
            in_elems = sum(_elems(g[i].shape) for i in node.inputs)
            if op.stitch:
                moved += in_elems
        f = _op_features(node, g, executed_macs(op), in_elems, out_elems, not patch_out,
                         ds.out_size if patch_out else None)
        f[4] += moved
        out.append((node.name, f))
    return out


def full_features(plan) -> list[tuple[str, np.ndarray]]:
    """(step name, per-image features) of full inference of the plan's graph."""
    g = plan.graph
    return [(ds.node.name, _op_features(ds.node, g, ds.macs_full,
                                        sum(_elems(g[i].shape) for i in ds.node.inputs),
                                        _elems(ds.node.shape), True))
            for ds in plan.steps]


def _batches(positions: float, batch: int) -> list[float]:
    n = max(float(positions), 0.0)
    b = max(int(batch), 1)
    full = int(n // b)
    rest = n - full * b
    return [float(b)] * full + ([rest] if rest > 0 else [])


def _cost(feats, coef: dict, batches: list[float]) -> float:
    w = np.array([coef[k] for k in FEATURES])
    per_query = sum(float(f[:NQ] @ w[:NQ]) for _, f in feats)
    steps = sum(float(f[NQ]) for _, f in feats)
    return sum(b * per_query + w[NQ] * steps for b in batches)


def predict(plan, mode: str, positions: float, batch: int, cost: dict) -> dict:
    """Predicted seconds of an occlusion query: ``predicted_s`` (``mode``: exact/approximate
    run the incremental plan after materializing the views, naive re-runs full inference
    per position in batches of up to 16) and ``naive_s`` (naive re-inference)."""
    coef = cost["coef"]
    full = full_features(plan)
    naive = _cost(full, coef, _batches(positions, min(batch, 16)))
    if mode == "naive":
        return dict(predicted_s=naive, naive_s=naive, materialize_s=0.0)
    mat = _cost(full, coef, [1.0])
    inc = _cost(step_features(plan), coef, _batches(positions, batch))
    return dict(predicted_s=mat + inc, naive_s=naive, materialize_s=mat)
