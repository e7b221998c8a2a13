"""Adaptive refinement (drill-down select='refine', krypton_db.adaptive_grid): the rule's
geometry and reconstruction on known functions, and the driver on a real (small) model:
computed positions hold the exact values, the positions are the rule's (re-derived here from
the exact map by a separate, loop-based reading of the rule), the budget holds, bad settings
are refused the same from the API and the language."""

import math

import numpy as np
import onnx
import pytest

import krypton_db as kdb
from test_approx import small_net
from krypton_db.adaptive_grid import ROUNDS, AdaptiveGrid, base_coords
from krypton_db.errors import InputError


def run_rule(f: np.ndarray, step: int, budget: int):
    """Refinement driven by the full map ``f`` (values looked up as they are computed)."""
    g = AdaptiveGrid(f.shape, step)
    g.record(g.base, f[g.base[:, 0], g.base[:, 1]])
    done = len(g.base)
    for rnd in range(ROUNDS):
        left = budget - done
        if left <= 0:
            break
        idx = g.next_round(min(left, max(5, math.ceil(left / (ROUNDS - rnd)))))
        if not len(idx):
            break
        g.record(idx, f[idx[:, 0], idx[:, 1]])
        done += len(idx)
    return g, done


def test_base_coords_cover_both_ends():
    assert base_coords(57, 4) == list(range(0, 57, 4))
    assert base_coords(53, 4) == list(range(0, 53, 4))
    assert base_coords(10, 4) == [0, 4, 8, 9]
    assert base_coords(1, 4) == [0]


@pytest.mark.parametrize("shape,step", [((57, 57), 4), ((29, 37), 4), ((10, 23), 3), ((1, 17), 4),
                                        ((12, 1), 2), ((1, 1), 4)])
def test_bilinear_maps_are_rebuilt_exactly(shape, step):
    """A Coons patch with piecewise-linear sides reproduces any bilinear function, whatever
    the refinement did (hanging midpoints on shared sides included)."""
    rng = np.random.default_rng(1)
    a, b, c, d = rng.normal(size=4)
    yy, xx = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    f = a + b * yy + c * xx + d * xx * yy
    f = f + 0.0  # bilinear: any refinement must rebuild it
    # disturb the priorities with a second run on a bumpy map, then rebuild the bilinear one
    bumpy = f + 3.0 * (np.hypot(yy - shape[0] / 3, xx - shape[1] / 2) < 4)
    g, _ = run_rule(bumpy, step, max(len(AdaptiveGrid(shape, step).base), f.size // 3))
    g.values[g.known] = f[g.known]
    assert np.abs(g.reconstruct() - f).max() <= 1e-9 * max(1.0, np.abs(f).max())


def test_refinement_follows_the_disagreeing_corners_and_beats_the_base_grid():
    """A sharp disc on a flat map: the added positions crowd the disc's rim, and the map
    rebuilt from them is closer to the truth than the base grid's bilinear estimate."""
    yy, xx = np.meshgrid(np.arange(57), np.arange(57), indexing="ij")
    r = np.hypot(yy - 30.3, xx - 21.7)
    f = np.where(r < 9, 0.2, 0.9)
    budget = 57 * 57 // 4
    g, done = run_rule(f, 4, budget)
    assert budget - 5 * ROUNDS <= done <= budget
    added = g.known.copy()
    added[g.base[:, 0], g.base[:, 1]] = False
    near_rim = np.abs(r - 9) < 4
    assert added[near_rim].mean() > 3 * added[~near_rim].mean()
    base_only = AdaptiveGrid(f.shape, 4)
    base_only.record(base_only.base, f[base_only.base[:, 0], base_only.base[:, 1]])
    assert np.abs(g.reconstruct() - f).mean() < 0.5 * np.abs(base_only.reconstruct() - f).mean()


@pytest.mark.parametrize("extra", [0, 1, 3, 4, 5, 11])
def test_the_budget_is_never_exceeded(extra):
    """A cell's split adds up to 5 positions; a round takes none that would pass its quota."""
    f = np.random.default_rng(extra).random((29, 29))
    n0 = len(AdaptiveGrid(f.shape, 4).base)
    g, done = run_rule(f, 4, n0 + extra)
    assert done == g.known.sum() and n0 + max(0, extra - 4) <= done <= n0 + extra


def test_the_map_is_continuous_across_cells():
    """Two leaf cells sharing a side give that side the same values (the shared side's
    computed positions, linearly interpolated): the rebuilt map has no seams."""
    rng = np.random.default_rng(7)
    f = rng.random((41, 41))
    g, _ = run_rule(f, 4, 500)
    est = g.reconstruct()
    for cell in g.cells:
        y0, y1, x0, x1 = cell
        patch = g._coons(cell)
        for y in (y0, y1):  # every side of every cell equals the global map there
            assert np.allclose(patch[y - y0], est[y, x0:x1 + 1], atol=1e-12) or not g.known[y, x0:x1 + 1].all()
        side = est[y0:y1 + 1, x0]
        known = np.flatnonzero(g.known[y0:y1 + 1, x0])
        assert np.allclose(side, np.interp(np.arange(y1 - y0 + 1), known, side[known]), atol=1e-12)


# -- the driver on a model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("refine") / "small.onnx"
    onnx.save(small_net(), p)  # the approximation tests' net
    return kdb.load_model(p)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(11)
    img = rng.random((32, 40, 3)).astype(np.float32)
    img[8:20, 12:26] = 0.95  # a bright block: structure for the map
    return img


def reference_positions(f: np.ndarray, step: int, budget: int) -> np.ndarray:
    """The rule read plainly (cells as lists, priorities by loops), on the exact map."""
    ny, nx = f.shape
    cy = list(range(0, ny, step)) + ([ny - 1] if (ny - 1) % step else [])
    cx = list(range(0, nx, step)) + ([nx - 1] if (nx - 1) % step else [])
    known = {(y, x) for y in cy for x in cx}
    cells = [(cy[a], cy[a + 1], cx[b], cx[b + 1]) for a in range(len(cy) - 1) for b in range(len(cx) - 1)]
    for rnd in range(ROUNDS):
        left = budget - len(known)
        if left <= 0:
            break
        quota = min(left, max(5, math.ceil(left / (ROUNDS - rnd))))
        scored = []
        for i, (y0, y1, x0, x1) in enumerate(cells):
            if y1 - y0 < 2 and x1 - x0 < 2:
                continue
            corners = [f[y0, x0], f[y0, x1], f[y1, x0], f[y1, x1]]
            scored.append((-(max(corners) - min(corners)) * max(y1 - y0, 1) * max(x1 - x0, 1), i))
        scored.sort()
        new, take = set(), []
        for _, i in scored:
            y0, y1, x0, x1 = cells[i]
            ys = [y0, (y0 + y1) // 2, y1] if y1 - y0 >= 2 else [y0, y1]
            xs = [x0, (x0 + x1) // 2, x1] if x1 - x0 >= 2 else [x0, x1]
            pts = {(y, x) for y in ys for x in xs} - known - new
            if len(new) + len(pts) > quota:
                break
            take.append(i)
            new |= pts
        if not take:
            break
        known |= new
        nxt = []
        for i, (y0, y1, x0, x1) in enumerate(cells):
            if i not in take:
                nxt.append((y0, y1, x0, x1))
                continue
            ys = [y0, (y0 + y1) // 2, y1] if y1 - y0 >= 2 else [y0, y1]
            xs = [x0, (x0 + x1) // 2, x1] if x1 - x0 >= 2 else [x0, x1]
            nxt += [(ys[a], ys[a + 1], xs[b], xs[b + 1]) for a in range(len(ys) - 1) for b in range(len(xs) - 1)]
        cells = nxt
    mask = np.zeros(f.shape, bool)
    for p in known:
        mask[p] = True
    return mask


@pytest.mark.parametrize("stride,speedup", [(1, 3.0), (2, 2.0)])
def test_refine_computes_the_rules_positions_exactly(model, image, stride, speedup):
    ex = kdb.occlude(model, image, patch=4, stride=stride)
    hm = kdb.occlude(model, image, patch=4, stride=stride,
                     drilldown=dict(speedup=speedup, select="refine"))
    d = hm.stats["drilldown"]
    n = ex.probs.size
    step = round(4 / stride)
    budget = math.floor(n / speedup + 0.5)
    computed = d["stage2_mask"].copy()
    base = np.zeros_like(computed)
    base[np.ix_(base_coords(ex.probs.shape[0], step), base_coords(ex.probs.shape[1], step))] = True
    assert not (computed & base).any()
    computed |= base
    assert d["stage1_positions"] == base.sum() and d["select"] == "refine" and d["r"] is None
    assert d["stage1_positions"] + d["stage2_positions"] == computed.sum()
    assert budget - 5 * ROUNDS <= computed.sum() <= budget
    assert np.array_equal(computed, reference_positions(ex.probs.astype(np.float64), step, budget))
    assert np.abs(hm.probs[computed] - ex.probs[computed]).max() <= 1e-6
    assert np.abs(hm.probs - ex.probs).max() > 1e-6  # the rest is estimated, not computed
    assert d["stride1"] == [step * stride] * 2 and len(d["round_positions"]) <= ROUNDS
    assert kdb.ssim(ex, hm) > 0.5


def test_refine_settings_are_checked(model, image):
    """(The language gives the same errors: test_approx's select test.)"""
    with pytest.raises(InputError, match="takes no r"):
        kdb.occlude(model, image, patch=4, stride=1, drilldown=dict(r=0.2, select="refine"))
    with pytest.raises(InputError, match=r"unreachable with select='refine'.*at most"):
        kdb.occlude(model, image, patch=4, stride=1, drilldown=dict(speedup=40, select="refine"))
    with pytest.raises(InputError, match="number >= 1"):
        kdb.occlude(model, image, patch=4, stride=1, drilldown=dict(speedup=0.5, select="refine"))
