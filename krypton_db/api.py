"""The public facade: ``occlude``, ``theoretical_speedup``, ``plan``, ``connect``.

The only module of the core that imports the planner (imports point one way: the planner
builds on the core data model; the core reaches the planner only through this facade and
the occlusion driver).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import options
from .approx import DEFAULT_R, DEFAULT_SPEEDUP, check_target_ssim, choose_tau, tune_tau
from .approx import drilldown as _drilldown
from .catalog import Catalog
from .errors import InputError
from .hooks import OcclusionHooks
from .model import Model, load_model
from .images import ModelInput
from .occlusion import HeatMap, pair
from .occlusion import occlude as _occlude
from .planner.delta_plan import plan_occlusion


def _model(model) -> Model:
    return model if isinstance(model, Model) else load_model(model)


def plan(model, patch=16, tau: float = 1.0, regions: str = "position"):
    """The delta plan of an occlusion query (per-layer rule, patch and read-in sizes, MACs full
    vs incremental; with ``tau < 1`` the projective-field caps); ``print(plan(m).explain())``.
    ``regions``: 'position' (default; ``plan.position_speedup(positions)`` gives the theory
    over a grid) or 'published'. Index math only: no weights are prepared (the executors do
    that when they run)."""
    m = _model(model)
    return plan_occlusion(m.graph, pair(patch, "patch"), m.physical_plan, tau=tau,
                          regions=options.check("regions", regions))


def theoretical_speedup(model, patch=16, tau: float = 1.0) -> float:
    """FLOPs(full) / FLOPs(incremental) for a patch (conv + FC, published patch-size rules);
    ``tau < 1``: of the approximate plan (projective-field thresholding)."""
    return plan(model, patch, tau).theoretical_speedup


def tune(model, images, target_ssim: float = 0.9, domain: str = "default", patch=16, stride=4,
         catalog=None, **kw):
    """Auto-tune tau of the approximate mode on a sample of the user's domain (>= 2 images;
    see :func:`krypton_db.approx.tune_tau`): SSIM(exact, approximate(tau)) of the raw
    probability maps for tau = 1.0, 0.9, ..., 0.4, a degree-2 fit, the smallest tau whose
    predicted SSIM reaches ``target_ssim``. With ``catalog`` (a Catalog or session) the tau is
    stored for (model name, ``domain``), replacing an earlier one, so that
    ``occlude(model, image, mode="approximate", domain=..., catalog=...)`` reuses it.
    Returns a :class:`~krypton_db.approx.TuneResult`."""

    check_target_ssim(target_ssim)
    _check_domain(domain)
    m = _model(model)
    res = tune_tau(m, images, target_ssim=target_ssim, domain=domain, patch=patch,
                   stride=stride, **kw)
    if catalog is not None:
        with opened_catalog(catalog) as cat:
            cat.save_tuned_tau(m.name, domain, res.tau, res.target_ssim, res.coeffs, res.details())
    return res


def _check_domain(domain) -> None:
    if not isinstance(domain, str) or not domain:
        raise InputError(f"domain must be a non-empty string, got {domain!r}")


def resolve_tau(m: Model, mode: str, tau, target_ssim, domain: str, catalog) -> tuple:
    """(tau to run with, where it came from)."""
    if target_ssim is not None:
        check_target_ssim(target_ssim)
        if mode != "approximate":
            raise InputError(f"target_ssim applies to mode='approximate', not {mode!r}")
        if tau is not None:
            raise InputError("give either tau or target_ssim (a tuned tau), not both")
    if mode != "approximate":
        return (1.0 if tau is None else tau), None
    if tau is not None:
        return tau, "given"
    _check_domain(domain)
    if catalog is None:
        raise InputError("mode='approximate' needs tau=... or catalog=... holding a tau tuned "
                         "for this model (krypton_db.tune(model, images, catalog=...))")
    with opened_catalog(catalog) as cat:
        rec = cat.tuned_tau(m.name, domain)
        tuned = cat.tuned_taus() if rec is None else None
    if rec is None:
        raise InputError(f"no tuned tau for model {m.name!r}, domain {domain!r} in the catalog "
                         f"(tuned: {tuned or 'none'}); run krypton_db.tune(model, "
                         "images, domain=..., catalog=...) first, or pass tau=...")
    if target_ssim is None or abs(target_ssim - rec["target_ssim"]) < 1e-6:
        return rec["tau"], f"tuned ({domain}, target SSIM {rec['target_ssim']:g})"

    # another target than the one tuned for: re-read the stored SSIM(tau) fit, no re-tuning
    measured = {float(t): v for t, v in rec["details"].get("mean_ssim", {}).items()}
    return (choose_tau(rec["coeffs"], target_ssim, measured=measured),
            f"tuned fit ({domain}, target SSIM {target_ssim:g})")


# keyword arguments of occlude() passed through to the occlusion driver
RUN_OPTIONS = ("batch_size", "memory_budget", "score", "device", "engine", "precision",
               "regions")


def check_occlude_args(model: Model, given: dict) -> dict:
    """Every option of one ``occlude`` call through the shared checks of
    :mod:`krypton_db.options` (the language's ``occlusion(...)`` uses the same ones): types,
    ranges, finiteness, units ('128MiB'), numpy scalars accepted; the rules across options;
    then the checks that need the model (patch and positions inside the input, colour
    channels, target class). ``given`` maps option names to the caller's values (None: not
    set). Returns the normalized values of every query option; raises ``InputError``."""
    vals = {}
    for name in options.QUERY_OPTIONS:
        if name in options.INPUT_OPTIONS:
            continue
        v = given.get(name)
        if name == "precision" and v is None:  # the model's own: an exact twin runs exact
            v = model.precision
        vals[name] = options.OPTIONS[name].default if v is None else options.check(name, v)
    options.check_combination(vals, {k for k, v in given.items() if v is not None})
    c, h, w = model.graph.input_shape
    options.check_against_model(vals, c, h, w)
    if vals["target"] is not None:
        model.class_index(vals["target"])
    if vals["device"] == "cuda":
        vals["device"] = "gpu"  # one numba.cuda executor under both names
    return vals


def occlude(model, image=None, patch=16, stride=4, color=None, target=None,
            mode: str = "exact", region=None, positions=None, all_classes: bool = False,
            catalog=None, image_name: str | None = None, tau: float | None = None,
            target_ssim: float | None = None, domain: str = "default", drilldown=None,
            hooks=None, input=None, baselines=None, progress: bool = True, **kw):
    """Occlusion heat map (see :func:`krypton_db.occlusion.occlude` for the semantics).

    What is occluded: ``image`` (a file, PIL image or pixel array; the patch ``color`` in
    the image's [0, 1] pixel scale, default black), or ``input``, a model input taken as is
    (numpy or torch, the model's layout: one sample [C, H, W] or a batch [N, C, H, W], e.g.
    already normalized) with the occluded cells set to ``baselines`` in input units (Captum's
    convention: a number, default 0, or anything broadcastable to the input: per channel
    [C, 1, 1], a full [C, H, W] or [N, C, H, W] tensor whose cells replace the patch's).
    A batch returns one heat map per sample (a list); ``target`` may then be one class per
    sample. Tensor runs are not recorded in a catalog (there is no image to register).

    Every argument is checked before anything runs, by the same rules as the query
    language's ``occlusion(...)`` (:mod:`krypton_db.options`); a bad value is an
    ``InputError`` naming the argument and what it takes. Further keyword arguments:
    ``batch_size``, ``memory_budget`` (bytes or a size such as ``'128MiB'``), ``score``
    (``'prob'`` | ``'logit'``), ``device`` (``'cpu'`` | ``'gpu'``), ``engine`` (``'numba'``
    | ``'duckdb'``: exact mode as SQL delta queries in DuckDB, the relational reference),
    ``precision`` (``'fast'`` | ``'exact'``: no Winograd convolutions, see README; default:
    the model's own, so ``m.with_precision('exact')`` runs exact).

    ``catalog``: a :class:`~krypton_db.catalog.Catalog`, a session (from ``connect``) or the
    path of a catalog file, to record the run in (model and image registered on first use);
    the run id lands in ``heatmap.stats['run_id']``.

    ``mode="approximate"``: projective-field thresholding with ``tau``; without ``tau`` the
    tau tuned for (model name, ``domain``) is read from ``catalog`` (see :func:`tune`);
    ``target_ssim`` other than the tuned one picks tau from the stored SSIM(tau) fit.
    ``stats['tau']`` / ``stats['tau_source']`` say what ran.

    ``drilldown``: ``dict(r=0.25, speedup=3.0)`` (or ``True`` for these defaults) runs the
    two-stage adaptive drill-down (:mod:`krypton_db.approx`): a coarse stage over the
    whole grid, then the user's stride only at the fraction ``r`` of positions with the
    largest estimated drop (``select='uncertainty'``: the largest spread of the coarse values
    their estimate interpolates); ``dict(speedup=3.0, select='refine')`` runs adaptive
    refinement instead (:mod:`krypton_db.adaptive_grid`: a grid one patch apart, then rounds
    that split where computed values disagree most; n / speedup positions, no ``r``);
    composable with ``mode="approximate"``.

    ``hooks``: an :class:`~krypton_db.hooks.OcclusionHooks` (plan rewrite, per-step profiling,
    materialization time, per-batch progress); with drill-down it serves both stages.

    ``progress``: a run that takes longer than 2 s shows a progress bar (positions done,
    rate, ETA) on stderr; ``progress=False`` silences it.
    """
    if not isinstance(progress, bool):
        raise InputError(f"progress must be True or False, got {progress!r}")
    unknown = sorted(set(kw) - set(RUN_OPTIONS))
    if unknown:
        raise InputError(options.unknown_option(unknown[0], RUN_OPTIONS) + " (and the named "
                         "parameters of occlude)")
    if hooks is not None and not isinstance(hooks, OcclusionHooks):
        raise InputError(f"hooks must be an OcclusionHooks, got {type(hooks).__name__}")
    if image_name is not None:
        options.check("image", image_name)
    m = _model(model)
    if input is None:
        if image is None:
            raise InputError("occlude needs image=... (a picture) or input=... (a model input "
                             "tensor)")
        if baselines is not None:
            raise InputError("baselines (input units) go with input=...; an image's patch "
                             "colour is color= (pixel scale)")
        opts = check_occlude_args(m, dict(
            patch=patch, stride=stride, color=color, target=target, mode=mode, region=region,
            positions=positions, all_classes=all_classes, tau=tau, target_ssim=target_ssim,
            domain=domain, drilldown=drilldown, **kw))
        with opened_catalog(catalog) as cat, _progress(hooks, progress, m.name) as h:
            return _occlude_checked(m, image, opts, cat, image_name, h)
    if image is not None:
        raise InputError("give either image=... or input=..., not both")
    if color is not None:
        raise InputError("color is in an image's pixel scale; with input=..., give baselines= "
                         "in input units")
    if catalog is not None or image_name is not None:
        raise InputError("runs on a model-input tensor are not recorded in a catalog (there "
                         "is no image to register); drop catalog= / image_name=")
    samples, single = model_inputs(m, input, baselines)
    targets = per_sample_targets(target, len(samples))
    out = []
    for sample, tgt in zip(samples, targets):
        opts = check_occlude_args(m, dict(
            patch=patch, stride=stride, target=tgt, mode=mode, region=region,
            positions=positions, all_classes=all_classes, tau=tau, target_ssim=target_ssim,
            domain=domain, drilldown=drilldown, **kw))
        label = m.name if single else f"{m.name} [{len(out) + 1}/{len(samples)}]"
        with _progress(hooks, progress, label) as h:
            out.append(_occlude_checked(m, sample, opts, None, None, h))
    return out[0] if single else out


PROGRESS_DELAY_S = 2.0  # a run shows its bar once it has taken this long


@contextmanager
def _progress(hooks, enabled: bool, label: str):
    """The run's hooks with a progress bar (tqdm, on stderr, shown after ``PROGRESS_DELAY_S``)
    feeding from ``on_batch``; the caller's own ``on_batch`` still gets every call."""
    if not enabled:
        yield hooks
        return
    hooks = hooks if hooks is not None else OcclusionHooks()
    outer = hooks.on_batch
    bar = tqdm(total=None, desc=f"occlusion({label})", unit="pos", delay=PROGRESS_DELAY_S,
               file=sys.stderr, leave=False, dynamic_ncols=True)

    def on_batch(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if outer is not None:
            outer(done, total)

    hooks.on_batch = on_batch  # on the caller's object, so its other fields keep accumulating
    try:
        yield hooks
    finally:
        hooks.on_batch = outer
        bar.close()


def _as_numpy(v, what: str) -> np.ndarray:
    """numpy or torch (any device) -> a float32 numpy array; a clear error otherwise."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor, without importing torch
        v = v.detach().cpu().numpy()
    try:
        a = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a numeric array or tensor, got "
                         f"{type(v).__name__}") from None
    if not np.isfinite(a).all():
        raise InputError(f"{what} holds NaN or infinite values")
    return a


def model_inputs(m: Model, input, baselines) -> tuple[list, bool]:
    """The samples of a model-input tensor as ``ModelInput`` (NCHW values, baseline per
    channel when it is constant over each channel, else the full NCHW tensor), and whether a
    single sample was given."""
    x = _as_numpy(input, "input")
    shape = tuple(m.input_shape)
    single = x.shape == shape
    if single:
        x = x[None]
    elif x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape or x.shape[0] == 0:
        raise InputError(f"input of shape {tuple(x.shape)} does not fit the model: one sample "
                         f"{shape} or a batch [N, {', '.join(map(str, shape))}] ({m.layout})")
    b = _as_numpy(0.0 if baselines is None else baselines, "baselines")
    try:
        b = np.broadcast_to(b, x.shape)
    except ValueError:
        raise InputError(f"baselines of shape {tuple(b.shape)} do not broadcast to the input "
                         f"{tuple(x.shape)} (a number, per channel, or a full tensor)") from None
    xn, bn = m.to_nchw(x), m.to_nchw(np.ascontiguousarray(b))
    out = []
    for xi, bi in zip(xn, bn):
        flat = bi.reshape(bi.shape[0], -1)
        per_channel = (flat == flat[:, :1]).all()
        out.append(ModelInput(np.ascontiguousarray(xi, np.float32),
                              np.ascontiguousarray(flat[:, 0] if per_channel else bi, np.float32)))
    return out, single


def per_sample_targets(target, n: int) -> list:
    """One target per sample: the same for all, or a sequence / tensor of n of them."""
    if hasattr(target, "detach"):
        target = target.detach().cpu().numpy()
    if isinstance(target, np.ndarray):
        target = target.tolist() if target.ndim else target.item()
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise InputError(f"target has {len(target)} entries for {n} input samples")
        return list(target)
    return [target] * n


@contextmanager
def opened_catalog(catalog):
    """The catalog to record into: None, a Catalog, a session's catalog, or a path opened
    (and closed) here. Opening first means a bad path fails before any computation."""

    if catalog is None or isinstance(catalog, Catalog):
        yield catalog
        return
    cat = getattr(catalog, "catalog", None)
    if isinstance(cat, Catalog):
        yield cat
        return
    if isinstance(catalog, (str, os.PathLike)):
        with Catalog(catalog) as cat:
            yield cat
        return
    raise InputError(f"catalog must be a path, a Catalog or a session from krypton_db.connect(), "
                     f"got {type(catalog).__name__}")


def _occlude_checked(m: Model, image, opts: dict, cat, image_name, hooks) -> HeatMap:
    """One occlusion run with checked options (``check_occlude_args``), recorded in ``cat``."""
    tau, tau_source = resolve_tau(m, opts["mode"], opts["tau"], opts["target_ssim"],
                                   opts["domain"], cat)
    hm = run_checked(m, image, dict(opts, tau=tau), hooks, opts["drilldown"], tau_source)
    if cat is not None:  # grid and listed positions alike
        record_run(cat, m, image, hm, image_name=image_name, color=opts["color"],
                   region=opts["region"], domain=opts["domain"])
    return hm


def run_checked(m: Model, image, opts: dict, hooks=None, drilldown=None,
                tau_source: str | None = None) -> HeatMap:
    """Compute one occlusion call whose options were checked (``check_occlude_args`` or the
    language's binder): ``opts`` holds patch, stride, color, target, mode, region, positions,
    all_classes, tau and the run options. Reads and records nothing in any catalog."""
    mode, positions, region, color = opts["mode"], opts["positions"], opts["region"], opts["color"]
    tau = opts.get("tau") or 1.0
    dd = _drilldown_settings(drilldown)
    run_kw = {k: opts[k] for k in RUN_OPTIONS if opts.get(k) is not None}
    if dd is not None:
        hm = _drilldown(m, image, patch=opts["patch"], stride=opts["stride"], r=dd["r"],
                        speedup=dd["speedup"], select=dd["select"], color=color, target=opts["target"], mode=mode,
                        region=region, tau=tau, all_classes=opts["all_classes"], hooks=hooks,
                        **run_kw)
    else:
        hm = _occlude(m, image, patch=opts["patch"], stride=opts["stride"], color=color,
                      target=opts["target"], mode=mode, region=region,
                      positions=None if positions is None else np.asarray(positions, np.int64),
                      all_classes=opts["all_classes"], tau=tau, hooks=hooks, **run_kw)
    if tau_source is not None:
        hm.stats["tau_source"] = tau_source
    return hm


def record_run(cat, model: Model, image, hm: HeatMap, image_name: str | None = None,
               color=0.0, region=None, domain: str = "default") -> int:
    """Record one finished run in the catalog, in one transaction: the model and image
    versions it used (registered on first use, content-addressed: the same content reuses its
    row, other content under a used name becomes a new version; without ``image_name`` any
    image with the same pixels is reused, else the file name or ``image-<hash>`` names it),
    the settings, timings and heat map. Sets and returns ``hm.stats['run_id']``."""
    settings = dict(patch=list(hm.patch), stride=list(hm.stride),
                    color=np.asarray(color, float).tolist(), region=region, score=hm.score)
    if hm.stats.get("listed_positions"):
        settings["positions"] = "listed"
    if hm.stats.get("precision", "fast") != "fast":
        settings["precision"] = hm.stats["precision"]
    if hm.stats.get("regions", "position") != "position":
        settings["regions"] = hm.stats["regions"]
    if "conv_algorithms" in hm.stats:  # the Winograd convs (all others direct)
        settings["conv_algorithms"] = hm.stats["conv_algorithms"]
    if hm.mode == "approximate":
        settings.update(tau=hm.stats["tau"], tau_source=hm.stats.get("tau_source"), domain=domain)
    timings = {k: hm.stats[k] for k in ("jit_s", "prepare_s", "run_s", "total_s")}
    timings["batch_size"] = hm.stats["batch_size"]
    d = hm.stats.get("drilldown")
    if d is not None:
        settings["drilldown"] = dict(r=d["r"], speedup=d["speedup_target"], stride1=d["stride1"])
        if d["r"] is None:  # select='refine' has no r
            del settings["drilldown"]["r"]
        if d.get("select", "drop") != "drop":
            settings["drilldown"]["select"] = d["select"]
        timings.update(stage1_s=d["stage1_s"], stage2_s=d["stage2_s"],
                       stage1_positions=d["stage1_positions"],
                       stage2_positions=d["stage2_positions"])
    with cat.transaction():
        model_id = cat.register_model(model, replace=True)
        image_id = cat.register_image(image, image_name, replace=True,
                                      default_name=_file_name(image))
        hm.stats["run_id"] = cat.record_run(
            model_id, image_id, hm.mode, settings, hm.target, timings, hm.probs,
            positions=np.asarray(hm.positions), all_probs=hm.all_probs)
    return hm.stats["run_id"]


def _file_name(image) -> str | None:
    return Path(image).name if isinstance(image, (str, Path)) else None


def _drilldown_settings(drilldown) -> dict | None:
    if drilldown is None or drilldown is False:
        return None
    if drilldown is True:
        return dict(r=DEFAULT_R, speedup=DEFAULT_SPEEDUP, select="drop")
    if not isinstance(drilldown, dict) or set(drilldown) - {"r", "speedup", "select"}:
        raise InputError(f"drilldown must be True or a dict with keys 'r', 'speedup' and/or "
                         f"'select' (e.g. dict(r=0.25, speedup=3.0)), got {drilldown!r}")
    # r stays None when not given: the default applies to 'drop' / 'uncertainty', 'refine' takes none
    return dict(r=drilldown.get("r"), speedup=drilldown.get("speedup", DEFAULT_SPEEDUP),
                select=drilldown.get("select", "drop"))
