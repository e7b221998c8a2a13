"""Adaptive refinement of a heat map on its fine grid (drill-down ``select='refine'``): which
positions to compute, round by round, and the map rebuilt from every computed position.

Pure numpy over fine-grid indices (row i, column j of the stride grid); knows nothing of
models. The driver (``approx.drilldown``) asks :meth:`AdaptiveGrid.next_round` for positions,
occludes them, hands the values to :meth:`AdaptiveGrid.record`, and finally calls
:meth:`AdaptiveGrid.reconstruct`.

The rule (fixed; bench/RESULTS.md "approx" shows how it was chosen on fitting images only):

- Base grid: every ``step``-th fine row and column from the first, plus the last one; the
  cells are the rectangles between consecutive base coordinates (their four corners known).
- A refinement round ranks the leaf cells that can still split (a side spanning >= 2 fine
  steps) by priority = (max - min of the cell's four corner values) x (cell area in fine
  cells): how far apart the values are that a bilinear estimate would mix, over how many
  positions it would be used. Ties: the earlier cell in the cell list (base cells in
  row-major order, children in their parent's place). Cells are taken in that order while
  their new positions (the midpoints of the sides that split and the centre, each counted
  once) fit the round's quota; the first that does not fit ends the round. A taken cell
  splits at those midpoints into 2 or 4 children.
- Quota: ceil(left / rounds left) of the positions the budget has left (at least 5, one
  split's worth, and at most what is left), so the budget is spent over ``ROUNDS`` rounds
  (fewer if nothing can split any more, or if the next cell's positions do not fit).
- Reconstruction: each leaf cell is filled by a Coons patch (transfinite interpolation) of
  its four sides, each side the piecewise-linear interpolation of the computed positions on
  it (a side shared with a refined neighbour holds that neighbour's midpoints). Neighbouring
  cells use the same side values, so the map is continuous across cells; computed positions
  keep their computed values.

Compared with the two-stage drill-down, every computed value shapes the estimate of the
positions around it (stage 2's values there only replace their own cells), and refinement
follows the structure found in earlier rounds.
"""

from __future__ import annotations

import math

import numpy as np

ROUNDS = 3


def base_coords(n: int, step: int) -> list[int]:
    """0, step, 2 step, ... below n, and n - 1 (the grid's last row / column) if not among them."""
    c = list(range(0, n, step))
    if c[-1] != n - 1:
        c.append(n - 1)
    return c


class AdaptiveGrid:
    """Refinement state on an (ny, nx) fine grid: computed values, the leaf cells."""

    def __init__(self, shape: tuple[int, int], step: int | tuple[int, int]):
        ny, nx = shape
        sy, sx = (step, step) if isinstance(step, (int, np.integer)) else step
        self.values = np.zeros(shape, np.float64)
        self.known = np.zeros(shape, bool)
        cy, cx = base_coords(ny, sy), base_coords(nx, sx)
        # leaf cells (y0, y1, x0, x1): inclusive fine-index corners; an axis of one position
        # gives flat cells (y0 == y1), which split along the other axis only
        self.cells = [(y0, y1, x0, x1) for y0, y1 in _spans(cy) for x0, x1 in _spans(cx)]
        self.base = np.array([(y, x) for y in cy for x in cx], np.int64)
        self._pending_split: list[int] = []  # cells the last next_round took; record splits them

    def record(self, idx: np.ndarray, vals: np.ndarray) -> None:
        """Values computed at fine indices ``idx`` ([k, 2]); splits the cells the round took."""
        idx = np.asarray(idx, np.int64).reshape(-1, 2)
        self.values[idx[:, 0], idx[:, 1]] = np.asarray(vals, np.float64).reshape(-1)
        self.known[idx[:, 0], idx[:, 1]] = True
        if self._pending_split:
            take = set(self._pending_split)
            out = []
            for i, c in enumerate(self.cells):
                out.extend(_children(c) if i in take else [c])
            self.cells = out
        self._pending_split = []

    def priorities(self) -> np.ndarray:
        """Per leaf cell: corner spread x area, or -1 where the cell cannot split."""
        c = np.array(self.cells, np.int64).reshape(-1, 4)
        y0, y1, x0, x1 = c.T
        v = self.values
        corners = np.stack([v[y0, x0], v[y0, x1], v[y1, x0], v[y1, x1]])
        spread = corners.max(axis=0) - corners.min(axis=0)
        area = np.maximum(y1 - y0, 1) * np.maximum(x1 - x0, 1)
        can = (y1 - y0 >= 2) | (x1 - x0 >= 2)
        return np.where(can, spread * area, -1.0)

    def next_round(self, quota: int) -> np.ndarray:
        """Fine indices ([k, 2], row-major, k <= quota) of the next round's new positions;
        empty when no cell can split or the first cell's positions exceed the quota."""
        pri = self.priorities()
        order = np.lexsort((np.arange(pri.size), -pri))  # priority desc, then cell order
        new: dict[tuple[int, int], None] = {}
        take: list[int] = []
        for i in order:
            if pri[i] < 0:
                break
            pts = [p for p in _midpoints(self.cells[i]) if not self.known[p] and p not in new]
            if len(new) + len(pts) > quota:  # strictly in order: the budget is never exceeded
                break
            take.append(int(i))
            new.update(dict.fromkeys(pts))
        self._pending_split = take
        return np.array(sorted(new), np.int64).reshape(-1, 2)

    def reconstruct(self) -> np.ndarray:
        """The (ny, nx) map: a Coons patch per leaf cell, computed positions as computed."""
        est = np.empty_like(self.values)
        for cell in self.cells:
            y0, y1, x0, x1 = cell
            est[y0:y1 + 1, x0:x1 + 1] = self._coons(cell)
        est[self.known] = self.values[self.known]
        return est

    def _coons(self, cell) -> np.ndarray:
        y0, y1, x0, x1 = cell
        v, k = self.values, self.known
        ys, xs = np.arange(y0, y1 + 1), np.arange(x0, x1 + 1)

        def side_row(y):  # piecewise-linear through the computed positions of row y in the cell
            j = np.flatnonzero(k[y, x0:x1 + 1]) + x0
            return np.interp(xs, j, v[y, j])

        def side_col(x):
            i = np.flatnonzero(k[y0:y1 + 1, x]) + y0
            return np.interp(ys, i, v[i, x])

        top, bottom, left, right = side_row(y0), side_row(y1), side_col(x0), side_col(x1)
        t = ((ys - y0) / max(y1 - y0, 1))[:, None]
        u = ((xs - x0) / max(x1 - x0, 1))[None, :]
        bilinear = ((1 - t) * (1 - u) * v[y0, x0] + (1 - t) * u * v[y0, x1]
                    + t * (1 - u) * v[y1, x0] + t * u * v[y1, x1])
        return ((1 - t) * top[None, :] + t * bottom[None, :]
                + (1 - u) * left[:, None] + u * right[:, None] - bilinear)


def _spans(coords: list[int]) -> list[tuple[int, int]]:
    """Consecutive (start, end) pairs of an axis's coordinates; (c, c) for a single one."""
    return list(zip(coords[:-1], coords[1:])) or [(coords[0], coords[0])]


def _split(a: int, b: int) -> list[int]:
    return [a, (a + b) // 2, b] if b - a >= 2 else [a, b]


def _midpoints(cell) -> list[tuple[int, int]]:
    """The positions a split of ``cell`` adds: side midpoints and the centre."""
    y0, y1, x0, x1 = cell
    ys, xs = _split(y0, y1), _split(x0, x1)
    return [(y, x) for y in ys for x in xs if not (y in (y0, y1) and x in (x0, x1))]


def _children(cell) -> list[tuple[int, int, int, int]]:
    y0, y1, x0, x1 = cell
    ys, xs = _split(y0, y1), _split(x0, x1)
    return [(ys[a], ys[a + 1], xs[b], xs[b + 1])
            for a in range(len(ys) - 1) for b in range(len(xs) - 1)]


def round_quota(left: int, rounds_left: int) -> int:
    """A round's positions: ceil(left / rounds left), but at least one split's worth (5) while
    the budget has that many left, so a small budget still refines."""
    return min(left, max(5, math.ceil(left / max(rounds_left, 1))))
