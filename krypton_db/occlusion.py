"""Occlusion-based explanations: ``occlude(model, image, ...)``.

Semantics: the image is preprocessed to the model input (H x W); a patch of ph x pw cells
filled with a constant colour (given in the image's [0, 1] pixel scale, scalar or per
channel, mapped through the model's preprocessing; black = 0) is placed with its top-left
corner at every (y, x) on the stride grid anchored at (0, 0) where the patch fits entirely:
y = 0, sy, 2 sy, ... <= H - ph (so floor((H - ph) / sy) + 1 rows; the published prototype used
ceil((H - ph) / sy), which drops the last fitting row when sy divides H - ph). A region
(y0, x0, y1, x1) keeps the grid positions with y0 <= y < y1 and x0 <= x < x1; an explicit
list of positions may be given instead (interactive mode). Each heat-map cell is the softmax
probability of the target class (predicted class of the unoccluded image by default) with the
patch at that position.

``mode="exact"`` runs the IVM delta plan (materialized views + batched incremental
inference); ``mode="naive"`` re-runs full inference on every occluded image (batched). Both
give the same probabilities (<= 1e-5).

``hooks=OcclusionHooks(...)`` (:mod:`krypton_db.hooks`) observes or adjusts one run: delta-plan
rewrite, per-step profiling, materialization time, per-batch progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import heatmap as heatmap_io
from . import options  # the heat map's files, images and plots
from .errors import InputError
from .graph import Op
from .exec.duckdb_ivm import DuckDbIncrementalExecutor
from .exec.incremental import IncrementalExecutor
from .hooks import OcclusionHooks
from .images import ModelInput, color_to_input
from .interrupt import check_cancelled
from .model import Model, softmax
from .planner import algorithms
from .planner.batching import batch_for, naive_bytes_per_query, peak_bytes_per_query
from .planner.delta_plan import DeltaPlan, plan_occlusion


def pair(v, what: str) -> tuple[int, int]:
    t = (v, v) if np.isscalar(v) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, (int, np.integer)) and i > 0 for i in t):
        raise InputError(f"{what} must be a positive int or an (h, w) pair of positive ints, got {v!r}")
    return int(t[0]), int(t[1])


@dataclass
class HeatMap:
    probs: np.ndarray  # target probability per position (2-D grid, or [1, n] for a list)
    positions: np.ndarray  # [..., 2] top-left (y, x) per cell, same leading shape as probs
    target: int
    label: str
    base_prob: float
    patch: tuple[int, int]
    stride: tuple[int, int]
    mode: str
    stats: dict = field(default_factory=dict)
    all_probs: np.ndarray | None = None  # [..., classes] when requested
    input_hw: tuple[int, int] = (0, 0)  # model input size the positions refer to
    score: str = "prob"  # what ``probs`` holds: softmax probability or raw logit of the target
    _ctx: tuple | None = field(default=None, repr=False)

    @property
    def drop(self) -> np.ndarray:
        """Probability drop f(original) - f(occluded) per position."""
        return self.base_prob - self.probs

    def save(self, path, image=None):
        """Write the heat map by suffix: ``.png`` (overlay with colour bar and caption),
        ``.npy`` (the 2-D map), ``.parquet`` / ``.csv`` (rows y, x, prob[, prob_<k>])."""
        return heatmap_io.save(self, path, image)

    def plot(self, ax=None, **kw):
        """matplotlib: the image with the map over it and a colour bar; returns the axes."""
        return heatmap_io.plot(self, ax, **kw)

    def to_image(self, original_size: bool = True) -> np.ndarray:
        """The per-pixel map (mean drop over covering patches) as float32 [H, W], in the
        original image's size (default) or the model input's."""
        return heatmap_io.to_image(self, original_size)

    def to_arrow(self):
        """The heat map as rows (``pyarrow.Table``: y, x, prob[, prob_<k>])."""
        return heatmap_io.table(self)

    def attribution(self, output: str = "prob") -> np.ndarray:
        """Per-pixel [H, W] attribution exactly as Captum's ``Occlusion`` computes it: windows
        of the patch size start at multiples of the stride, ceil((H - ph) / sy) + 1 per axis,
        the last one truncated at the border; each pixel gets the mean over the windows that
        cover it of f(original) - f(occluded), f = softmax probability (``"prob"``) or raw
        model output (``"logit"``) of the target. Windows the heat map lacks are computed."""
        if output not in ("prob", "logit"):
            raise InputError(f"output must be 'prob' or 'logit', got {output!r}")
        model, image, color = self._ctx
        return window_attribution(model, image, self.patch, self.stride, self.target,
                                  score=output, mode=self.mode, color=color)


def window_attribution(model: Model, image, patch, stride, target: int, score: str = "prob",
                       mode: str = "exact", color=0.0, **kw) -> np.ndarray:
    """Captum ``Occlusion``'s per-pixel attribution [H, W] (model input size): windows of the
    patch size start at multiples of the stride, ceil((H - ph) / sy) + 1 per axis, the last
    one truncated at the border; each pixel gets the mean over the windows that cover it of
    f(original) - f(occluded), f the target's ``score``. One occlusion run per window size."""
    c, h, w = model.graph.input_shape
    ph, pw = patch
    sy, sx = stride
    ys = np.arange(0, sy * (-(-(h - ph) // sy)) + 1, sy)
    xs = np.arange(0, sx * (-(-(w - pw) // sx)) + 1, sx)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for y in ys:
        for x in xs:
            groups.setdefault((min(ph, h - y), min(pw, w - x)), []).append((int(y), int(x)))
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    for (wh, ww), pos in groups.items():
        hm = occlude(model, image, patch=(wh, ww), positions=pos, color=color, target=target,
                     mode=mode, score=score, **kw)
        for (y, x), v in zip(pos, hm.probs.reshape(-1)):
            total[y : y + wh, x : x + ww] += hm.base_prob - float(v)
            count[y : y + wh, x : x + ww] += 1
    return total / np.maximum(count, 1)


def grid_positions(h: int, w: int, patch, stride, region=None) -> tuple[np.ndarray, tuple]:
    ph, pw = patch
    sy, sx = stride
    if ph > h or pw > w:
        raise InputError(f"patch {ph}x{pw} is larger than the model input {h}x{w}")
    ys = np.arange(0, h - ph + 1, sy)
    xs = np.arange(0, w - pw + 1, sx)
    if region is not None:
        if len(region) != 4:
            raise InputError(f"region must be (y0, x0, y1, x1), got {region!r}")
        y0, x0, y1, x1 = (int(v) for v in region)
        if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
            raise InputError(f"region {region} must satisfy 0 <= y0 < y1 <= {h}, 0 <= x0 < x1 <= {w}")
        ys = ys[(ys >= y0) & (ys < y1)]
        xs = xs[(xs >= x0) & (xs < x1)]
        if ys.size == 0 or xs.size == 0:
            raise InputError(f"region {region} contains no patch position on the stride grid")
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy, xx], axis=-1), (len(ys), len(xs))


DUCKDB_BATCH = 256  # queries per batch of delta queries on engine="duckdb"


def _patch_source(image, model: Model, color, c: int, ph: int, pw: int):
    """(per-channel colour [C] or None, patch values for a batch of positions): the patch is
    the colour everywhere, or the cells of a full baseline under each query's patch."""
    if isinstance(image, ModelInput) and image.baseline.ndim == 3:
        base = image.baseline
        return None, lambda pos: np.ascontiguousarray(
            np.stack([base[:, y : y + ph, x : x + pw] for y, x in pos], axis=-1), np.float32)
    colour = image.baseline if isinstance(image, ModelInput) else color_to_input(color, model.spec)
    vals = np.ascontiguousarray(np.broadcast_to(colour[:, None, None], (c, ph, pw)), np.float32)
    return colour, lambda pos: vals


@dataclass
class Prepared:
    """What one occlusion query runs, built once: by ``occlude`` for the run and by the
    language's EXPLAIN for the plan it shows (so EXPLAIN shows what runs by construction)."""

    passes: list  # (pass name, delta plan) in order: plan_deltas, apply_tau, rewrite
    plan: DeltaPlan  # the delta plan that runs (the last pass); naive mode maintains none
    per_query: int  # peak buffer bytes one query holds
    batch: int  # queries per batch


def prepare(graph, physical, patch, *, mode: str, positions: int, tau: float = 1.0,
            device: str = "cpu", memory_budget: int | None = None,
            batch_size: int | None = None, disabled: frozenset = frozenset(),
            rewrite=None, regions: str = "position") -> Prepared:
    """Plan an occlusion query: the exact delta plan (``disabled`` rules off), the tau caps,
    a research rewrite (e.g. ``naive_from``), then the batch that fits ``memory_budget``.
    ``physical``: the executor's physical plan of ``graph``."""
    p1 = plan_occlusion(graph, patch, physical, tau=1.0, disabled=disabled, regions=regions)
    p2 = p1 if tau >= 1.0 else plan_occlusion(graph, patch, physical, tau=tau, disabled=disabled,
                                              regions=regions)
    p3 = rewrite(p2) if rewrite is not None and mode != "naive" else p2  # naive: none runs
    if mode == "naive":
        per_q = naive_bytes_per_query(graph)
    else:
        per_q = peak_bytes_per_query(p3, "gpu" if device in ("gpu", "cuda") else "cpu")
    bs = batch_for(mode, per_q, positions, memory_budget, batch_size)
    return Prepared([("plan_deltas", p1), ("apply_tau", p2), ("rewrite", p3)], p3, per_q, bs)


def occlude(model: Model, image, patch=16, stride=4, color=0.0, target=None, mode: str = "exact",
            region=None, positions=None, all_classes: bool = False, batch_size: int | None = None,
            memory_budget: int | None = None, score: str = "prob", tau: float = 1.0,
            device: str = "cpu", hooks: OcclusionHooks | None = None,
            engine: str = "numba", precision: str | None = None,
            regions: str = "position") -> HeatMap:
    """Occlusion heat map of ``model``'s target-class probability over ``image``.

    ``score="logit"`` maps the raw model output (pre-softmax) of the target instead.
    ``batch_size`` defaults to the largest batch whose buffers fit ``memory_budget`` bytes
    (default None: 160 MiB in the incremental modes, 768 MiB for naive re-inference's
    batches of 16; ``planner.batching.resolve_budget``).
    ``device="gpu"`` runs the same plans with the numba.cuda executor (clear error without a
    CUDA GPU / numba-cuda).
    ``hooks``: an :class:`~krypton_db.hooks.OcclusionHooks` (plan rewrite, per-step
    profiling, materialization time, per-batch progress).
    ``engine="duckdb"`` runs exact mode as SQL in DuckDB: the layer views materialized as
    tables, then the plan's delta queries (``plan.delta_sql()``) per batch; the relational
    reference of the IVM rules, far slower than the numba executors.
    ``precision="exact"``: the model's twin without Winograd convolutions
    (``Model.with_precision``); ``"fast"``: the model with its chosen algorithms (README
    "Precision"); None (default): the model's own (``model.precision``: an exact twin runs
    exact).
    """
    # the run options through the checks the API and the language use (krypton_db.options):
    # one rule, one message, wherever the call comes from
    run = {k: options.check(k, v) for k, v in (("engine", engine), ("mode", mode),
                                                 ("device", device), ("score", score),
                                                 ("precision", model.precision
                                                  if precision is None else precision),
                                                 ("regions", regions))}
    engine, mode, score = run["engine"], run["mode"], run["score"]
    device = "gpu" if run["device"] == "cuda" else run["device"]
    options.check_combination(dict(run, device=device, drilldown=None), {"engine"})
    tau = 1.0 if mode != "approximate" else options.check("tau", tau)
    if tau is None:
        raise InputError("mode 'approximate' needs tau in (0, 1]")
    memory_budget = options.check("memory_budget", memory_budget)
    model = model.with_precision(run["precision"])
    if score == "logit":
        model = _logit_model(model)
    ph, pw = pair(patch, "patch")
    sy, sx = pair(stride, "stride")
    if isinstance(image, ModelInput):
        xn = image.values
    else:
        x = model.preprocess(image)
        xn = model.to_nchw(x[None])[0]  # [C, H, W]
    c, h, w = xn.shape
    if positions is not None:
        pos = np.asarray(positions, np.int64).reshape(-1, 2)
        bad = (pos[:, 0] < 0) | (pos[:, 1] < 0) | (pos[:, 0] + ph > h) | (pos[:, 1] + pw > w)
        if ph > h or pw > w:
            raise InputError(f"patch {ph}x{pw} is larger than the model input {h}x{w}")
        if bad.any():
            raise InputError(f"positions {pos[bad][:5].tolist()} put the patch outside the {h}x{w} input")
        grid = pos[None]
    else:
        grid, _ = grid_positions(h, w, (ph, pw), (sy, sx), region)
    flat = grid.reshape(-1, 2)
    colour, patch_values = _patch_source(image, model, color, c, ph, pw)
    if engine == "duckdb" and colour is None:
        raise InputError("engine 'duckdb' occludes with one value per channel; a full-tensor "
                         "baseline runs on engine 'numba'")

    stats: dict = {"positions": int(flat.shape[0]), "mode": mode, "tau": tau,
                   "listed_positions": positions is not None, "precision": run["precision"],
                   "regions": run["regions"]}  # asked for; tau caps keep published sizes
    t0 = time.perf_counter()
    ex = _executor(model, device)
    stats["device"] = device
    if device == "cpu" and engine != "duckdb":
        stats["conv_algorithms"] = conv_algorithm_lists(model.graph)
    if getattr(ex, "jit_seconds", None) is not None:
        stats["jit_s"] = 0.0
    elif device == "cpu" and engine != "duckdb" and mode in ("exact", "approximate"):
        # the warm-up runs on this image and hands its values to materialize (one full
        # inference in the first explanation of a process instead of two)
        stats["jit_s"] = ex.warmup(xn)
    else:
        stats["jit_s"] = ex.warmup()
    t1 = time.perf_counter()
    prep = prepare(model.graph, ex.plan, (ph, pw), mode=mode, positions=int(flat.shape[0]),
                   tau=tau, device=device, memory_budget=memory_budget, batch_size=batch_size,
                   disabled=hooks.disabled_rules if hooks is not None else frozenset(),
                   rewrite=hooks.plan_rewrite if hooks is not None else None,
                   regions=run["regions"])
    if mode in ("exact", "approximate"):
        plan = prep.plan
        if engine == "duckdb":
            inc = DuckDbIncrementalExecutor(plan.delta_sql())
        elif device == "gpu":
            from .exec.gpu_incremental import GpuIncrementalExecutor  # numba.cuda: optional

            inc = GpuIncrementalExecutor(plan, ex)
        else:
            inc = IncrementalExecutor(plan, ex)
        if hooks is not None and hooks.profile:
            inc.profile = True
            inc.step_secs = hooks.step_secs  # the executor accumulates into the hooks' dict
        tm = time.perf_counter()
        try:
            base = _probs(model, inc.materialize(xn))[0]
        except BaseException:  # incl. Ctrl-C: the executor's arena / connection goes back
            inc.close()
            raise
        if hooks is not None:
            hooks.materialize_s += time.perf_counter() - tm
        # whether this query reused the image's views (exec.view_cache) or ran the inference
        stats["views"] = "cached" if getattr(inc, "views_hit", False) else "materialized"
        if engine == "duckdb":
            per_q = 0  # DuckDB manages its own memory (spilling to disk past its limit)
            bs = batch_size or DUCKDB_BATCH
            run = lambda pos: _probs(model, inc.run_batch(pos, colour))  # noqa: E731
        else:
            per_q, bs = prep.per_query, prep.batch
            run = lambda pos: _probs(model, inc.run_batch(pos, patch_values(pos)))  # noqa: E731
        stats.update(theoretical_speedup=plan.theoretical_speedup, macs_full=plan.macs_full,
                     macs_incremental=plan.macs_inc, engine=engine)
    else:
        base = _probs(model, ex.predict(xn[None]))[0]
        per_q, bs = prep.per_query, prep.batch
        # per-step times of the full re-inference: the CPU executor's (the GPU one has none)
        secs = hooks.step_secs if hooks is not None and hooks.profile and device == "cpu" \
            else None

        def run(pos):
            batch = np.repeat(xn[None], pos.shape[0], axis=0)
            vals = patch_values(pos)
            for i, (yy, xx) in enumerate(pos):
                batch[i, :, yy : yy + ph, xx : xx + pw] = vals if vals.ndim == 3 else vals[..., i]
            if secs is None:
                return _probs(model, ex.predict(batch))
            return _probs(model, ex.run(batch, step_secs=secs)[ex.graph.output])

    t2 = time.perf_counter()
    n = flat.shape[0]
    outs = []
    # the batches' order: per-position regions batch queries of equal exact sizes together
    order = prep.plan.batch_order(flat) if mode in ("exact", "approximate") else np.arange(n)
    queue = flat[order]
    try:
        tgt = int(np.argmax(base)) if target is None else model.class_index(target)
        for i in range(0, n, bs):
            outs.append(run(queue[i : i + bs]))
            check_cancelled()  # Ctrl-C that a library swallowed still stops the run here
            if hooks is not None:
                hooks.batch_done(min(i + bs, n), n)
    finally:
        if mode in ("exact", "approximate"):
            inc.close()  # its batch arena stays with the model for the next run
    probs_all = np.empty((n,) + outs[0].shape[1:], outs[0].dtype)
    probs_all[order] = np.concatenate(outs, axis=0)
    t3 = time.perf_counter()
    stats.update(batch_size=bs, bytes_per_query=per_q, prepare_s=t2 - t1, run_s=t3 - t2,
                 total_s=t3 - t0, queries_per_s=flat.shape[0] / max(t3 - t2, 1e-12))
    shape = grid.shape[:-1]
    hm = HeatMap(
        probs=probs_all[:, tgt].reshape(shape), positions=grid, target=tgt,
        label=model.labels[tgt], base_prob=float(base[tgt]), patch=(ph, pw), stride=(sy, sx),
        mode=mode, stats=stats, input_hw=(h, w), score=score,
        all_probs=probs_all.reshape(shape + (probs_all.shape[-1],)) if all_classes else None,
    )
    hm._ctx = (model, image, color)
    return hm


def conv_algorithm_lists(graph) -> dict[str, list[str]]:
    """The convs of ``graph`` that run a Winograd algorithm on the CPU at full size, by
    algorithm (``planner.algorithms.conv_algorithm``: the precision choice's caps applied);
    every other conv runs direct, as does a Winograd conv's patch when it is smaller than the
    algorithm's tile pays for. Runs record it: two runs with the same model, image and settings
    agree to float32 rounding only when these agree too."""
    out: dict[str, list[str]] = {}
    for n in graph.nodes:
        if n.op is Op.CONV:
            a = algorithms.conv_algorithm(n)
            if a != "direct":
                out.setdefault(a, []).append(n.name)
    return out


def _executor(model: Model, device: str):
    """The model's full-inference executor on ``device`` (built once per model)."""
    if device == "cpu":
        return model.executor
    from .exec.gpu import GpuExecutor, require_gpu

    require_gpu()
    gex = getattr(model, "_gpu_executor", None)
    if gex is None:
        gex = model._gpu_executor = GpuExecutor(model.graph)
    return gex


def _probs(model: Model, y: np.ndarray) -> np.ndarray:
    return y if model.ends_in_softmax or getattr(model, "_raw_scores", False) else softmax(y)


def _logit_model(model: Model) -> Model:
    """The same model truncated at its pre-softmax node, cached on the model object itself
    (a cache keyed by ``id(model)`` would hand a new model the truncation of a collected one)."""
    lm = model.__dict__.get("_logit_twin")
    if lm is None:
        from dataclasses import replace

        g = model.graph.truncated(model.graph.logits_node())
        lm = replace(model, graph=g, _executor=None)
        lm._raw_scores = True
        model.__dict__["_logit_twin"] = lm
    return lm
