"""Approximate occlusion on top of the exact driver: adaptive drill-down and tau auto-tuning.

Adaptive drill-down (two stages; composable with projective-field thresholding, ``tau``):

- The fine grid is the user's stride-S2 grid (``occlude``'s grid: anchored at (0, 0), every
  position where the patch fits, restricted to ``region`` if given); n positions.
- Coarse stride: S1 = round(sqrt(target / (1 - r * target)) * S2) per axis (round half away
  from zero), at least S2. The target must satisfy 0 < target < min(W^2 / (S2^2 + r W^2), 1/r)
  with W the input size along the axis (the stricter axis counts), else ``InputError``.
- Stage 1 runs occlusion on the coarse grid: every S1-th position along each axis starting at
  the fine grid's first position, up to its last one (without a region: the stride-S1 grid
  anchored at (0, 0)).
- Each fine position's drop is ESTIMATED by bilinear interpolation of the coarse drop map at
  the fine position's pixel coordinates (separable linear interpolation along y, then x;
  fine positions beyond the last coarse row / column take the edge value).
- The k = round(r * n) fine positions (round half away from zero, at least 1) with the largest
  estimated drop are selected (ties: the earlier position in row-major order wins), and stage 2
  occludes exactly those (in row-major order).
- Both stages explain one image: stage 2 reuses stage 1's materialized views (the CPU
  executor's ``shared_views`` scope), so a drill-down runs one full inference, not two.
- Combined heat map: stage-2 values where computed, interpolated stage-1 values elsewhere
  (interpolating drops and interpolating probabilities are the same, base - drop is affine).
  ``stats["drilldown"]`` keeps the stage sizes, S1, the predicted speedup
  S1^2 / (S2^2 + r S1^2) (per axis: S1y S1x / (S2y S2x + r S1y S1x)), and the mask of cells
  computed in stage 2.

Adaptive refinement (``select='refine'``, :mod:`.adaptive_grid`) replaces the two stages by
a base grid and refinement rounds that share one scope of materialized views; its map is
rebuilt from every computed position.

tau auto-tuning: see :func:`tune_tau`.
"""

from __future__ import annotations

import contextlib
import sys
import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .adaptive_grid import ROUNDS, AdaptiveGrid, round_quota
from .errors import InputError
from .occlusion import HeatMap, pair, grid_positions, occlude
from .quality import default_win_size, ssim

DEFAULT_R = 0.25
DEFAULT_SPEEDUP = 3.0
TAUS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def round_half_away(x: float) -> int:
    """Round half away from zero, for x >= 0 (``round`` in Python rounds half to even)."""
    return int(math.floor(x + 0.5))


# -- adaptive drill-down ---------------------------------------------------------------------

def check_r(r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)) \
            or not (0.0 < float(r) <= 1.0):
        raise InputError(f"drill-down fraction r must lie in (0, 1] (the share of fine-grid "
                         f"positions re-run in stage 2), got {r!r}")
    return float(r)


def speedup_bound(r: float, s2: int, size: int) -> float:
    """The largest reachable drill-down speedup (exclusive): min(W^2 / (S2^2 + r W^2), 1 / r)."""
    return min(size * size / (s2 * s2 + r * size * size), 1.0 / r)


def coarse_stride(stride, r: float, target: float, input_hw) -> tuple[int, int]:
    """S1 per axis: round(sqrt(target / (1 - r * target)) * S2), at least S2."""
    r = check_r(r)
    sy, sx = pair(stride, "stride")
    if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(float(target)) and float(target) > 0):
        raise InputError(f"drill-down speedup target must be a positive number, got {target!r}")
    target = float(target)
    bounds = [speedup_bound(r, s, n) for s, n in ((sy, input_hw[0]), (sx, input_hw[1]))]
    axis = int(np.argmin(bounds))
    s, n = ((sy, input_hw[0]), (sx, input_hw[1]))[axis]
    if target >= bounds[axis]:
        raise InputError(
            f"drill-down speedup target {target:g} is unreachable with r={r:g}: it must stay "
            f"below min(W^2 / (S2^2 + r W^2), 1 / r) = min({n}^2 / ({s}^2 + {r:g} * {n}^2), "
            f"1 / {r:g}) = {bounds[axis]:.4g} (W = {n}, the input size along "
            f"{'y' if axis == 0 else 'x'}, S2 = {s}, the stride)")
    f = math.sqrt(target / (1.0 - r * target))
    return max(sy, round_half_away(f * sy)), max(sx, round_half_away(f * sx))


def _frac_index(fine: np.ndarray, coarse: np.ndarray):
    """(i0, i1, weight of i1) of each fine coordinate on the coarse axis (edge values beyond)."""
    f = np.interp(fine, coarse, np.arange(coarse.size, dtype=np.float64))
    i0 = np.floor(f).astype(np.int64)
    i1 = np.minimum(i0 + 1, coarse.size - 1)
    return i0, i1, f - i0


def interpolate(coarse_vals: np.ndarray, ys1, xs1, ys2, xs2) -> np.ndarray:
    """Bilinear interpolation of a coarse map (rows at pixel ys1, columns at xs1) at every fine
    position (ys2 x xs2); exact at coinciding positions, edge value beyond the coarse grid."""
    c = np.asarray(coarse_vals, np.float64)
    y0, y1, wy = _frac_index(np.asarray(ys2, np.float64), np.asarray(ys1, np.float64))
    x0, x1, wx = _frac_index(np.asarray(xs2, np.float64), np.asarray(xs1, np.float64))
    rows = c[y0] * (1 - wy)[:, None] + c[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]


def top_count(n: int, r: float) -> int:
    """How many of n fine cells stage 2 computes: round(r * n) (half away from zero), >= 1."""
    return min(n, max(1, round_half_away(check_r(r) * n)))


SELECT_RULES = ("drop", "uncertainty", "refine")


def interpolation_range(coarse_vals: np.ndarray, ys1, xs1, ys2, xs2) -> np.ndarray:
    """Per fine position, max - min of the (up to four) coarse values its bilinear estimate
    mixes: how far apart the values it interpolates are, so how uncertain the estimate is
    there (0 where the coarse map is flat). A fine row / column past the last coarse one
    takes the edge value; its spread is that of the last two coarse rows / columns (the
    variation the edge value extrapolates over)."""
    c = np.asarray(coarse_vals, np.float64)
    y0, y1 = _spread_index(np.asarray(ys2, np.float64), np.asarray(ys1, np.float64))
    x0, x1 = _spread_index(np.asarray(xs2, np.float64), np.asarray(xs1, np.float64))
    corners = np.stack([c[y0][:, x0], c[y0][:, x1], c[y1][:, x0], c[y1][:, x1]])
    return corners.max(axis=0) - corners.min(axis=0)


def _spread_index(fine: np.ndarray, coarse: np.ndarray):
    """(i0, i1) per fine coordinate: the coarse neighbours its estimate mixes (i0 == i1 on a
    coarse coordinate: a position the coarse stage computed has no uncertainty); past the
    last coarse coordinate the last two."""
    i0, i1, w = _frac_index(fine, coarse)
    i1 = np.where(w > 0, i1, i0)
    past = fine > coarse[-1]
    if coarse.size > 1:
        i0, i1 = np.where(past, coarse.size - 2, i0), np.where(past, coarse.size - 1, i1)
    return i0, i1


def select_cells(est_drop: np.ndarray, uncertainty, r: float) -> np.ndarray:
    """Boolean mask of the round(r * n) cells stage 2 computes: the largest interpolation
    uncertainty first when given (ties: the larger estimated drop), else the largest estimated
    drop; remaining ties go to the earlier cell in row-major order."""
    if uncertainty is None:
        return select_top(est_drop, r)
    n = est_drop.size
    k = top_count(n, r)
    order = np.lexsort((np.arange(n), -est_drop.reshape(-1), -uncertainty.reshape(-1)))
    mask = np.zeros(n, bool)
    mask[order[:k]] = True
    return mask.reshape(est_drop.shape)


def select_top(est_drop: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of the round(r * n) (half away from zero, >= 1) cells with the largest
    estimated drop; ties go to the earlier cell in row-major order."""
    n = est_drop.size
    k = top_count(n, r)
    order = np.argsort(-est_drop.reshape(-1), kind="stable")
    mask = np.zeros(n, bool)
    mask[order[:k]] = True
    return mask.reshape(est_drop.shape)


def drilldown(model, image, patch=16, stride=4, r: float | None = None,
              speedup: float = DEFAULT_SPEEDUP, color=0.0, target=None, mode: str = "exact",
              region=None, tau: float = 1.0, hooks=None, select: str = "drop",
              **kw) -> HeatMap:
    """Two-stage occlusion heat map on the stride-``stride`` grid (see the module doc).
    ``select``: the fine cells stage 2 computes: "drop" (the largest estimated drop, the
    published rule) or "uncertainty" (the largest spread of the coarse values each cell's
    estimate interpolates, :func:`interpolation_range`: where the estimate can be most wrong);
    "refine" runs adaptive refinement instead (:mod:`.adaptive_grid`: a base grid one patch
    apart, then rounds that split the cells whose corners disagree most, the map rebuilt from
    every computed position): its budget is n / ``speedup`` positions, and it takes no ``r``.
    ``hooks`` (:class:`~krypton_db.hooks.OcclusionHooks`) serve both stages: progress counts
    the positions of both (stage 1, then stage 2, of their sum), times add up."""
    if kw.get("positions") is not None:
        raise InputError("drill-down runs on the stride grid; it cannot take explicit positions")
    if kw.pop("all_classes", False):
        raise InputError("all_classes is not available with drill-down (stage-1 cells are "
                         "interpolated for the target class only)")
    kw.pop("positions", None)
    if mode not in ("exact", "approximate"):
        raise InputError(f"drill-down runs mode 'exact' or 'approximate', got {mode!r}")
    if select not in SELECT_RULES:
        raise InputError(f"drilldown select must be 'drop', 'uncertainty' or 'refine', "
                         f"got {select!r}")
    if select == "refine":
        return _refine(model, image, patch, stride, r, speedup, color, target, mode, region,
                       tau, hooks, kw)
    r = check_r(DEFAULT_R if r is None else r)
    ph, pw = pair(patch, "patch")
    sy, sx = pair(stride, "stride")
    t0 = time.perf_counter()
    h, w = model.spec.size
    fine, shape = grid_positions(h, w, (ph, pw), (sy, sx), region)
    ys2, xs2 = fine[:, 0, 0], fine[0, :, 1]
    s1y, s1x = coarse_stride((sy, sx), r, speedup, (h, w))
    ys1 = np.arange(ys2[0], ys2[-1] + 1, s1y)
    xs1 = np.arange(xs2[0], xs2[-1] + 1, s1x)
    coarse = np.stack(np.meshgrid(ys1, xs1, indexing="ij"), axis=-1)
    common = dict(patch=(ph, pw), color=color, mode=mode, tau=tau, **kw)
    n1, k = int(ys1.size * xs1.size), top_count(int(ys2.size * xs2.size), r)
    h1 = hooks.stage(0, n1 + k) if hooks is not None else None
    with contextlib.ExitStack() as scope:
        if kw.get("device", "cpu") == "cpu":  # stage 2 reuses stage 1's materialized views
            scope.enter_context(model.executor.shared_views())
        st1 = occlude(model, image, positions=coarse.reshape(-1, 2), target=target, hooks=h1,
                      **common)
        coarse_probs = st1.probs.reshape(ys1.size, xs1.size)
        est = interpolate(coarse_probs, ys1, xs1, ys2, xs2)  # probability; drop = base - est
        spread = (interpolation_range(coarse_probs, ys1, xs1, ys2, xs2)
                  if select == "uncertainty" else None)
        mask = select_cells(st1.base_prob - est, spread, r)
        h2 = hooks.stage(n1, n1 + k) if hooks is not None else None
        st2 = occlude(model, image, positions=fine[mask], target=st1.target, hooks=h2, **common)
    if hooks is not None:
        hooks.materialize_s += h1.materialize_s + h2.materialize_s
    probs = est.astype(np.float32)
    probs[mask] = st2.probs.reshape(-1)
    total = time.perf_counter() - t0
    n = int(mask.size)  # k == mask.sum() (select_top takes top_count cells)
    stats = dict(st2.stats, listed_positions=False)  # stage 2's listed cells: a grid run
    for key in ("jit_s", "prepare_s", "run_s"):
        stats[key] = st1.stats[key] + st2.stats[key]
    stats.update(
        positions=n, total_s=total, queries_per_s=(n1 + k) / max(stats["run_s"], 1e-12),
        drilldown=dict(
            r=r, speedup_target=float(speedup), select=select, stride1=[s1y, s1x],
            stride2=[sy, sx],
            stage1_positions=n1, stage2_positions=k, fine_positions=n,
            predicted_speedup=s1y * s1x / (sy * sx + r * s1y * s1x),
            positions_speedup=n / (n1 + k),
            stage1_s=st1.stats["total_s"], stage2_s=st2.stats["total_s"], stage2_mask=mask))
    hm = HeatMap(probs=probs.reshape(shape), positions=fine, target=st1.target, label=st1.label,
                 base_prob=st1.base_prob, patch=(ph, pw), stride=(sy, sx), mode=mode,
                 stats=stats, input_hw=(h, w), score=st1.score)
    hm._ctx = (model, image, color)
    return hm


def refine_step(patch, stride) -> tuple[int, int]:
    """The refinement base grid's step in fine positions per axis: round(patch / stride), at
    least 1 (base positions one patch apart: every pixel lies under some base patch)."""
    (ph, pw), (sy, sx) = pair(patch, "patch"), pair(stride, "stride")
    return max(1, round_half_away(ph / sy)), max(1, round_half_away(pw / sx))


def _refine(model, image, patch, stride, r, speedup, color, target, mode, region, tau, hooks,
            kw) -> HeatMap:
    """Drill-down ``select='refine'``: adaptive refinement (:mod:`.adaptive_grid`) in one
    shared-views scope: the base grid, then up to ``adaptive_grid.ROUNDS`` rounds, n / speedup
    positions in all."""
    if r is not None:
        raise InputError("drill-down select='refine' takes no r: its budget is n / speedup "
                         "positions (give only speedup)")
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float, np.integer, np.floating)) \
            or not (math.isfinite(float(speedup)) and float(speedup) >= 1.0):
        raise InputError(f"drill-down speedup target must be a number >= 1 with select='refine' "
                         f"(it computes n / speedup of the n positions), got {speedup!r}")
    ph, pw = pair(patch, "patch")
    sy, sx = pair(stride, "stride")
    t0 = time.perf_counter()
    h, w = model.spec.size
    fine, shape = grid_positions(h, w, (ph, pw), (sy, sx), region)
    n = int(shape[0] * shape[1])
    step = refine_step((ph, pw), (sy, sx))
    grid = AdaptiveGrid(shape, step)
    budget = min(n, round_half_away(n / float(speedup)))
    n0 = len(grid.base)
    if n0 > budget:
        raise InputError(
            f"drill-down speedup target {float(speedup):g} is unreachable with select='refine': "
            f"its base grid (every {step[0]} x {step[1]} positions, one patch apart) already "
            f"has {n0} of the {n} positions, so the target must be at most {n / n0:.4g}")
    common = dict(patch=(ph, pw), color=color, mode=mode, tau=tau, **kw)
    stage_s, counts, first = [], [], None
    with contextlib.ExitStack() as scope:
        if kw.get("device", "cpu") == "cpu":  # every round reuses the first one's views
            scope.enter_context(model.executor.shared_views())
        idx = grid.base
        for rnd in range(ROUNDS + 1):
            if not len(idx):
                break
            hk = hooks.stage(sum(counts), budget) if hooks is not None else None
            st = occlude(model, image, positions=fine[idx[:, 0], idx[:, 1]],
                         target=target if first is None else first.target, hooks=hk, **common)
            if hooks is not None:
                hooks.materialize_s += hk.materialize_s
            if first is None:
                first = st
            grid.record(idx, st.probs.reshape(-1))
            stage_s.append(st.stats)
            counts.append(len(idx))
            left = budget - sum(counts)
            if rnd == ROUNDS or left <= 0:
                break
            idx = grid.next_round(round_quota(left, ROUNDS - rnd))
    probs = grid.reconstruct().astype(np.float32)
    total = time.perf_counter() - t0
    stats = dict(st.stats, listed_positions=False)
    for key in ("jit_s", "prepare_s", "run_s"):
        stats[key] = sum(s[key] for s in stage_s)
    computed = int(sum(counts))
    stage2 = grid.known.copy()
    stage2[grid.base[:, 0], grid.base[:, 1]] = False
    stats.update(
        positions=n, total_s=total, queries_per_s=computed / max(stats["run_s"], 1e-12),
        drilldown=dict(
            r=None, speedup_target=float(speedup), select="refine",
            stride1=[step[0] * sy, step[1] * sx], stride2=[sy, sx],
            stage1_positions=counts[0], stage2_positions=computed - counts[0],
            round_positions=counts[1:], fine_positions=n,
            predicted_speedup=n / budget, positions_speedup=n / computed,
            stage1_s=stage_s[0]["total_s"], stage2_s=sum(s["total_s"] for s in stage_s[1:]),
            stage2_mask=stage2))
    hm = HeatMap(probs=probs.reshape(shape), positions=fine, target=first.target,
                 label=first.label, base_prob=first.base_prob, patch=(ph, pw), stride=(sy, sx),
                 mode=mode, stats=stats, input_hw=(h, w), score=first.score)
    hm._ctx = (model, image, color)
    return hm


# -- tau auto-tuning -------------------------------------------------------------------------

def choose_tau(coeffs, target_ssim: float, taus=TAUS, measured: dict | None = None) -> float:
    """The smallest tau of the grid whose predicted SSIM, and that of every larger tau of the
    grid, reaches ``target_ssim``; 1.0 (exact) if none. For a fit that is monotone over the
    grid (the usual case) this is simply "the smallest tau whose predicted SSIM >= target";
    the extra condition keeps a U-shaped quadratic from picking a tau past a predicted dip.

    ``measured`` ({tau: mean SSIM over the fitting images}, as :func:`tune_tau` measured it)
    adds a veto: a tau whose measured mean misses the target is not chosen, whatever the fit
    predicts. A degree-2 fit smooths over a cliff: PP-LCNet's photos measured 1.0 at tau 1
    and 0.80 at 0.9, and the fit predicted 0.903 at 0.9 (bench/RESULTS.md, approx)."""
    best = 1.0
    got = {round(float(t), 6): float(v) for t, v in (measured or {}).items()}
    for t in sorted((float(t) for t in taus), reverse=True):
        ok = float(np.polyval(coeffs, t)) >= target_ssim
        if ok and got:
            ok = got.get(round(t, 6), 1.0) >= target_ssim
        if ok:
            best = t
        else:
            break
    return best


@dataclass
class TuneResult:
    """Outcome of :func:`tune_tau` (``tau`` is what the approximate mode should use)."""

    model: str
    domain: str
    tau: float
    target_ssim: float
    coeffs: list  # SSIM(tau) ~ polyval(coeffs, tau), degree 2, highest degree first
    taus: list
    mean_ssim: dict  # tau -> mean SSIM(exact, approximate(tau)) over the fitting images
    ssim_per_image: np.ndarray  # [fitting images, taus]
    fit_images: int
    heldout_images: int
    predicted_ssim: float  # polyval(coeffs, tau)
    heldout_ssim: float | None  # mean measured SSIM at ``tau`` on the held-out images
    heldout_per_image: list = field(default_factory=list)
    patch: tuple = (16, 16)
    stride: tuple = (4, 4)
    elapsed_s: float = 0.0
    timings: dict = field(default_factory=dict)  # exact / per-tau occlusion seconds (summed)
    fit_tau: float | None = None  # what the fit alone picks (``tau`` differs if measured vetoed)

    def predict(self, tau: float) -> float:
        return float(np.polyval(self.coeffs, tau))

    def details(self) -> dict:
        """JSON-able summary stored next to the tuned tau in the catalog."""
        return dict(mean_ssim={f"{t:.1f}": v for t, v in self.mean_ssim.items()},
                    fit_images=self.fit_images, heldout_images=self.heldout_images,
                    predicted_ssim=self.predicted_ssim, heldout_ssim=self.heldout_ssim,
                    patch=list(self.patch), stride=list(self.stride), elapsed_s=self.elapsed_s,
                    fit_tau=self.fit_tau)


def check_target_ssim(target_ssim) -> float:
    if isinstance(target_ssim, bool) or not isinstance(
            target_ssim, (int, float, np.integer, np.floating)) or not (0.0 < float(target_ssim) <= 1.0):
        raise InputError(f"target_ssim must lie in (0, 1], got {target_ssim!r}")
    return float(target_ssim)


def heldout_indices(n: int) -> list[int]:
    """Every third image (indices 2, 5, 8, ...: n // 3 of them) is held out when n >= 3."""
    return list(range(2, n, 3)) if n >= 3 else []


def tune_tau(model, images, target_ssim: float = 0.9, domain: str = "default", patch=16,
             stride=4, color=0.0, taus=TAUS, progress: bool = True, **kw) -> TuneResult:
    """Pick tau for ``model`` on a domain sample ``images`` (a list of images).

    For each fitting image: the exact heat map, and the approximate one for every tau in
    ``taus`` (tau = 1.0 is the exact plan, so it is not re-run); SSIM (raw probability maps,
    :func:`krypton_db.quality.ssim`) between them. A degree-2 polynomial is fitted to the mean
    SSIM per tau (``np.polyfit``) and :func:`choose_tau` picks tau (never one whose measured
    mean SSIM on the fitting images misses the target). With >= 3 images every
    third one (n // 3) is held out of the fit; on those the SSIM at the chosen tau is measured
    to compare with the prediction. Cost: (images) x (1 exact + len(taus) - 1 approximate)
    occlusion runs at ``patch`` / ``stride`` (tune with the settings you will explain with).
    ``progress``: a bar on stderr (after 2 s) naming the image and tau being run.
    """
    t_start = time.perf_counter()
    target_ssim = check_target_ssim(target_ssim)
    images = list(images)
    if len(images) < 2:
        raise InputError(f"tuning tau needs at least 2 images of the domain, got {len(images)}")
    taus = sorted({round(float(t), 6) for t in taus}, reverse=True)
    if len(taus) < 3 or not all(0.0 < t <= 1.0 for t in taus):
        raise InputError(f"taus must hold at least 3 distinct values in (0, 1], got {taus}")
    ph, pw = pair(patch, "patch")
    sy, sx = pair(stride, "stride")
    h, w = model.spec.size
    _, shape = grid_positions(h, w, (ph, pw), (sy, sx), kw.get("region"))
    default_win_size(shape)  # heat maps smaller than 3x3 have no SSIM: fail before any work
    hold = set(heldout_indices(len(images)))
    fit = [im for i, im in enumerate(images) if i not in hold]
    held = [im for i, im in enumerate(images) if i in hold]
    common = dict(patch=(ph, pw), stride=(sy, sx), color=color, **kw)
    timings: dict = {"exact_s": 0.0}
    per_image = np.zeros((len(fit), len(taus)))
    runs = len(fit) * (1 + sum(t < 1.0 for t in taus)) + 2 * len(held)
    bar = tqdm(total=runs, desc=f"tune({model.name})", unit="run", delay=2.0, file=sys.stderr,
               leave=False, disable=not progress)

    def step(what: str):
        bar.set_postfix_str(what, refresh=False)
        bar.update(1)

    for i, im in enumerate(fit):
        ex = occlude(model, im, mode="exact", **common)
        step(f"image {i + 1}/{len(fit)} exact")
        timings["exact_s"] += ex.stats["total_s"]
        for j, t in enumerate(taus):
            if t >= 1.0:
                per_image[i, j] = ssim(ex.probs, ex.probs)
                continue
            ap = occlude(model, im, mode="approximate", tau=t, target=ex.target, **common)
            step(f"image {i + 1}/{len(fit)} tau {t:g}")
            timings[f"tau_{t:g}_s"] = timings.get(f"tau_{t:g}_s", 0.0) + ap.stats["total_s"]
            per_image[i, j] = ssim(ex.probs, ap.probs)
    means = per_image.mean(axis=0)
    coeffs = [float(c) for c in np.polyfit(taus, means, 2)]
    mean_ssim = {t: float(v) for t, v in zip(taus, means)}
    tau = choose_tau(coeffs, target_ssim, taus, measured=mean_ssim)
    measured = []
    for im in held:
        ex = occlude(model, im, mode="exact", **common)
        ap = ex if tau >= 1.0 else occlude(model, im, mode="approximate", tau=tau,
                                           target=ex.target, **common)
        measured.append(ssim(ex.probs, ap.probs))
        step(f"held-out image {len(measured)}/{len(held)}")
        bar.update(1)  # its exact and approximate runs
    bar.close()
    return TuneResult(
        model=model.name, domain=domain, tau=tau, target_ssim=target_ssim, coeffs=coeffs,
        taus=list(taus), mean_ssim=mean_ssim,
        ssim_per_image=per_image, fit_images=len(fit), heldout_images=len(held),
        predicted_ssim=float(np.polyval(coeffs, tau)),
        heldout_ssim=float(np.mean(measured)) if measured else None,
        heldout_per_image=[float(v) for v in measured], patch=(ph, pw), stride=(sy, sx),
        elapsed_s=time.perf_counter() - t_start, timings=timings,
        fit_tau=choose_tau(coeffs, target_ssim, taus))
