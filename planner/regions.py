"""Per-position output regions: the exact changed box of every step for each query.

The published rule gives every query of a layer the same output-patch size (the largest over
patch positions: a patch near a border is shifted back inside, and the rounding of strided
layers is taken at its worst phase). A position near a border changes fewer cells: its exact
box is the layer's window reach of the input box, clipped to the map. Per axis (the axes are
independent) and per step this module computes that box for a batch of positions (pure index
math, vectorized over the batch); a batch then runs each windowed step at the largest exact
size among its queries, each query's box placed at its own exact start (shifted back inside
where the batch size would cross the border). Ordering positions so that batches hold queries
of equal sizes (``batch_order``) brings the batch sizes down to the exact ones.

Invariant: a query's exact box at every step covers every output cell its patch can change
(the window reach of a box covering the changed input cells), so any box containing it gives
exact results; a box never extends past the map.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Interval", "exact_intervals", "batch_windows", "batch_order", "position_macs"]


class Interval(NamedTuple):
    """Each query's box, inclusive bounds, [B] int64 arrays per side."""

    y0: np.ndarray
    y1: np.ndarray
    x0: np.ndarray
    x1: np.ndarray


def window_params(node):
    """(kernel, stride, dilation, (top, left) padding) of a conv / pooling node."""
    p = node.params
    t, left = p["pads"][0], p["pads"][1]
    return p["kernel"], p["stride"], p.get("dilation", (1, 1)), (t, left)


def _window_axis(a: np.ndarray, b: np.ndarray, k: int, s: int, d: int, pad: int, n_out: int):
    """Exact output run [start, end] (inclusive) of a windowed layer along one axis whose
    changed input run is [a, b]: outputs o with window [o*s - pad, o*s - pad + keff - 1]
    meeting [a, b], clipped to [0, n_out - 1]. An empty run (a strided 1x1 window between
    changed cells) keeps one cell: a box of one unchanged cell is still exact."""
    keff = d * (k - 1) + 1
    start = np.maximum(-((-(a + pad - keff + 1)) // s), 0)
    end = np.minimum((b + pad) // s, n_out - 1)
    start = np.minimum(start, n_out - 1)
    return start, np.maximum(end, start)


def exact_intervals(plan, positions: np.ndarray) -> dict[str, Interval | None]:
    """Per value of ``plan`` (input, every step's output): each query's exact changed box as
    an :class:`Interval` of [B] arrays, or None where the whole value changes (a global step
    and everything after it). ``positions``: [B, 2] top-left corners of the input patches."""
    pos = np.asarray(positions, np.int64).reshape(-1, 2)
    ph, pw = plan.patch
    graph = plan.graph
    boxes: dict[str, Interval | None] = {
        graph.input.name: Interval(pos[:, 0], pos[:, 0] + ph - 1, pos[:, 1], pos[:, 1] + pw - 1)}
    for ds in plan.steps:
        node = ds.node
        ins = [boxes.get(i) for i in node.inputs]
        if ds.out_size is None or ds.kind == "global" or any(b is None for b in ins[:1]):
            box = None
        elif ds.kind == "window":
            (kh, kw), (sh, sw), (dh, dw), (t, left) = window_params(node)
            y0, y1 = _window_axis(ins[0].y0, ins[0].y1, kh, sh, dh, t, node.shape[1])
            x0, x1 = _window_axis(ins[0].x0, ins[0].x1, kw, sw, dw, left, node.shape[2])
            box = Interval(y0, y1, x0, x1)
        elif ds.kind == "pointwise":
            box = ins[0]
        else:  # merge: the hull of the spatial inputs' boxes (as the executor's union box)
            spatial = [b for b, i in zip(ins, node.inputs)
                       if len(graph[i].shape) == 3 and graph[i].shape[1:] != (1, 1)]
            if any(b is None for b in spatial) or not spatial:
                box = None
            else:
                box = Interval(np.min([b.y0 for b in spatial], axis=0),
                               np.max([b.y1 for b in spatial], axis=0),
                               np.min([b.x0 for b in spatial], axis=0),
                               np.max([b.x1 for b in spatial], axis=0))
        boxes[ds.out_name] = boxes[node.name] = box
    return boxes


def batch_windows(plan, positions: np.ndarray) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """For one batch: per windowed step (by output name) the output-box locations [B, 2] and
    the batch's size (the largest exact size among its queries). Each query's box starts at its
    exact start, shifted back inside where the batch size would cross the border, so it covers
    the query's exact box."""
    out = {}
    for name, box in _window_boxes(plan, positions):
        h, w = plan.graph[name].shape[1:]
        bh = int((box.y1 - box.y0).max()) + 1
        bw = int((box.x1 - box.x0).max()) + 1
        loc = np.stack([np.minimum(box.y0, h - bh), np.minimum(box.x0, w - bw)], axis=1)
        out[name] = (loc.astype(np.int64), (bh, bw))
    return out


def _window_boxes(plan, positions):
    boxes = exact_intervals(plan, positions)
    for ds in plan.steps:
        if ds.kind == "window" and boxes.get(ds.out_name) is not None:
            yield ds.out_name, boxes[ds.out_name]


def batch_order(plan, positions: np.ndarray) -> np.ndarray:
    """A permutation of ``positions`` [N, 2] that puts queries of equal exact sizes side by
    side, the largest first: per axis, coordinates are classed by their vector of exact sizes
    over the windowed steps, classes ranked by the multiply-adds they weigh (largest first);
    positions sort by (row class, column class, y, x). Consecutive batches then hold one class
    pair, or neighbouring ones, so a batch's size is close to its queries' exact sizes; the
    largest batch comes first (the batch arena records its buffers once and replays them)."""
    pos = np.asarray(positions, np.int64).reshape(-1, 2)
    if pos.shape[0] < 2:
        return np.arange(pos.shape[0])
    boxes = list(_window_boxes(plan, pos))
    if not boxes:
        return np.arange(pos.shape[0])
    weights = np.array([_macs_per_cell(plan.graph[name]) for name, _ in boxes], np.float64)
    ranks = []
    for axis in (0, 1):
        sizes = np.stack([(b.y1 - b.y0 + 1) if axis == 0 else (b.x1 - b.x0 + 1) for _, b in boxes],
                         axis=1)  # [N, steps]
        classes, inverse = np.unique(sizes, axis=0, return_inverse=True)
        order = np.argsort(-(classes @ weights), kind="stable")  # heaviest class first
        rank = np.empty(len(classes), np.int64)
        rank[order] = np.arange(len(classes))
        ranks.append(rank[inverse.reshape(-1)])
    return np.lexsort((pos[:, 1], pos[:, 0], ranks[1], ranks[0]))


def _macs_per_cell(node) -> float:
    return node.macs / max(node.shape[1] * node.shape[2], 1) if len(node.shape) == 3 else 0.0


def position_macs(plan, positions: np.ndarray, batch: int | None = None,
                  ordered: bool = True) -> int:
    """Incremental multiply-adds of ``positions`` with per-position regions: each conv at its
    exact box per query (``batch`` None), or at its batch's size when the positions run in
    batches of ``batch`` in ``batch_order`` (in the given order: ``ordered=False``); every
    other step as the plan counts it."""
    pos = np.asarray(positions, np.int64).reshape(-1, 2)
    cells: dict[str, np.ndarray] = {}
    if batch is None:
        for name, box in _window_boxes(plan, pos):
            cells[name] = (box.y1 - box.y0 + 1) * (box.x1 - box.x0 + 1)
    else:
        pos = pos[batch_order(plan, pos)] if ordered else pos
        for i in range(0, pos.shape[0], batch):
            chunk = pos[i : i + batch]
            for name, (_, (bh, bw)) in batch_windows(plan, chunk).items():
                cells.setdefault(name, np.zeros(0, np.int64))
                cells[name] = np.concatenate([cells[name], np.full(chunk.shape[0], bh * bw)])
    total = 0
    for ds in plan.steps:
        node = ds.node
        if ds.out_name in cells and node.op.name == "CONV":
            total += int(node.macs // (node.shape[1] * node.shape[2]) * cells[ds.out_name].sum())
        else:
            total += ds.macs_inc * pos.shape[0]
    return total
