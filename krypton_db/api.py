"""The public facade: ``occlude``, ``theoretical_speedup``, ``plan``, ``connect``.

The only module of the core that imports the planner (imports point one way: the planner
builds on the core data model; the core reaches the planner only through this facade and
the occlusion driver).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .errors import InputError
from .model import Model, load_model
from .occlusion import HeatMap
from .occlusion import occlude as _occlude


def _model(model) -> Model:
    return model if isinstance(model, Model) else load_model(model)


def plan(model, patch=16, tau: float = 1.0):
    """The delta plan of an occlusion query (per-layer rule, patch and read-in sizes, MACs full
    vs incremental; with ``tau < 1`` the projective-field caps); ``print(plan(m).explain())``."""
    from .occlusion import _pair
    from .planner.delta_plan import plan_occlusion

    m = _model(model)
    return plan_occlusion(m.graph, _pair(patch, "patch"), m.executor.plan, tau=tau)


def theoretical_speedup(model, patch=16, tau: float = 1.0) -> float:
    """FLOPs(full) / FLOPs(incremental) for a patch (conv + FC, published patch-size rules);
    ``tau < 1``: of the approximate plan (projective-field thresholding)."""
    return plan(model, patch, tau).theoretical_speedup


def tune(model, images, target_ssim: float = 0.9, domain: str = "default", patch=16, stride=4,
         catalog=None, **kw):
    """Auto-tune tau of the approximate mode on a sample of the user's domain (>= 2 images;
    see :func:`krypton_db.planner.approx.tune_tau`): SSIM(exact, approximate(tau)) of the raw
    probability maps for tau = 1.0, 0.9, ..., 0.4, a degree-2 fit, the smallest tau whose
    predicted SSIM reaches ``target_ssim``. With ``catalog`` (a Catalog or session) the tau is
    stored for (model name, ``domain``), replacing an earlier one, so that
    ``occlude(model, image, mode="approximate", domain=..., catalog=...)`` reuses it.
    Returns a :class:`~krypton_db.planner.approx.TuneResult`."""
    from .planner.approx import check_target_ssim, tune_tau

    check_target_ssim(target_ssim)
    _check_domain(domain)
    m = _model(model)
    res = tune_tau(m, images, target_ssim=target_ssim, domain=domain, patch=patch,
                   stride=stride, **kw)
    if catalog is not None:
        cat = getattr(catalog, "catalog", catalog)
        cat.save_tuned_tau(m.name, domain, res.tau, res.target_ssim, res.coeffs, res.details())
    return res


def _check_domain(domain) -> None:
    if not isinstance(domain, str) or not domain:
        raise InputError(f"domain must be a non-empty string, got {domain!r}")


def _resolve_tau(m: Model, mode: str, tau, target_ssim, domain: str, catalog) -> tuple:
    """(tau to run with, where it came from)."""
    if target_ssim is not None:
        from .planner.approx import check_target_ssim

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
    cat = getattr(catalog, "catalog", catalog)
    rec = cat.tuned_tau(m.name, domain)
    if rec is None:
        raise InputError(f"no tuned tau for model {m.name!r}, domain {domain!r} in the catalog "
                         f"(tuned: {cat.tuned_taus() or 'none'}); run krypton_db.tune(model, "
                         "images, domain=..., catalog=...) first, or pass tau=...")
    if target_ssim is None or abs(target_ssim - rec["target_ssim"]) < 1e-6:
        return rec["tau"], f"tuned ({domain}, target SSIM {rec['target_ssim']:g})"
    from .planner.approx import choose_tau

    # another target than the one tuned for: re-read the stored SSIM(tau) fit, no re-tuning
    measured = {float(t): v for t, v in rec["details"].get("mean_ssim", {}).items()}
    return (choose_tau(rec["coeffs"], target_ssim, measured=measured),
            f"tuned fit ({domain}, target SSIM {target_ssim:g})")


def _image_name(image) -> str:
    if isinstance(image, (str, Path)):
        return Path(image).name
    from .images import to_pil

    px = np.asarray(to_pil(image).convert("RGB"), np.uint8)
    return "image-" + hashlib.sha256(px.tobytes()).hexdigest()[:12]


def occlude(model, image, patch=16, stride=4, color=0.0, target=None, mode: str = "exact",
            region=None, positions=None, all_classes: bool = False, catalog=None,
            image_name: str | None = None, tau: float | None = None,
            target_ssim: float | None = None, domain: str = "default", drilldown=None,
            **kw) -> HeatMap:
    """Occlusion heat map (see :func:`krypton_db.occlusion.occlude` for the semantics).

    ``catalog``: a :class:`~krypton_db.catalog.Catalog` or session (from ``connect``) to
    record the run in (model and image registered on first use); the run id lands in
    ``heatmap.stats['run_id']``.

    ``mode="approximate"``: projective-field thresholding with ``tau``; without ``tau`` the
    tau tuned for (model name, ``domain``) is read from ``catalog`` (see :func:`tune`);
    ``target_ssim`` other than the tuned one picks tau from the stored SSIM(tau) fit.
    ``stats['tau']`` / ``stats['tau_source']`` say what ran.

    ``drilldown``: ``dict(r=0.25, speedup=3.0)`` (or ``True`` for these defaults) runs the
    two-stage adaptive drill-down (:mod:`krypton_db.planner.approx`): a coarse stage over the
    whole grid, then the user's stride only at the fraction ``r`` of positions with the
    largest estimated drop; composable with ``mode="approximate"``.

    ``hooks``: an :class:`~krypton_db.hooks.OcclusionHooks` (plan rewrite, per-step profiling,
    materialization time, per-batch progress); with drill-down it serves both stages.
    """
    m = _model(model)
    tau, tau_source = _resolve_tau(m, mode, tau, target_ssim, domain, catalog)
    dd = _drilldown_settings(drilldown)
    if dd is not None:
        from .planner.approx import drilldown as _drilldown

        if positions is not None:
            raise InputError("drilldown runs on the stride grid; it cannot take positions=")
        hm = _drilldown(m, image, patch=patch, stride=stride, r=dd["r"], speedup=dd["speedup"],
                        color=color, target=target, mode=mode, region=region, tau=tau,
                        all_classes=all_classes, **kw)
    else:
        hm = _occlude(m, image, patch=patch, stride=stride, color=color, target=target,
                      mode=mode, region=region, positions=positions, all_classes=all_classes,
                      tau=tau, **kw)
    if tau_source is not None:
        hm.stats["tau_source"] = tau_source
    if catalog is not None and positions is None:
        cat = getattr(catalog, "catalog", catalog)
        if m.name not in cat.models():
            cat.register_model(m)
        name = image_name or _image_name(image)
        if name not in cat.images():
            cat.register_image(image, name)
        settings = dict(patch=list(hm.patch), stride=list(hm.stride),
                        color=np.asarray(color, float).tolist(), region=region, score=hm.score)
        if mode == "approximate":
            settings.update(tau=hm.stats["tau"], tau_source=tau_source, domain=domain)
        if dd is not None:
            d = hm.stats["drilldown"]
            settings["drilldown"] = dict(r=d["r"], speedup=d["speedup_target"],
                                         stride1=d["stride1"])
        timings = {k: hm.stats[k] for k in ("jit_s", "prepare_s", "run_s", "total_s")}
        timings["batch_size"] = hm.stats["batch_size"]
        if dd is not None:
            d = hm.stats["drilldown"]
            timings.update(stage1_s=d["stage1_s"], stage2_s=d["stage2_s"],
                           stage1_positions=d["stage1_positions"],
                           stage2_positions=d["stage2_positions"])
        hm.stats["run_id"] = cat.record_run(
            m.name, name, mode, settings, hm.target, timings, hm.probs,
            positions=(hm.positions[:, 0, 0], hm.positions[0, :, 1]), all_probs=hm.all_probs)
    return hm


def _drilldown_settings(drilldown) -> dict | None:
    from .planner.approx import DEFAULT_R, DEFAULT_SPEEDUP

    if drilldown is None or drilldown is False:
        return None
    if drilldown is True:
        return dict(r=DEFAULT_R, speedup=DEFAULT_SPEEDUP)
    if not isinstance(drilldown, dict) or set(drilldown) - {"r", "speedup"}:
        raise InputError(f"drilldown must be True or a dict with keys 'r' and/or 'speedup' "
                         f"(e.g. dict(r=0.25, speedup=3.0)), got {drilldown!r}")
    return dict(r=drilldown.get("r", DEFAULT_R), speedup=drilldown.get("speedup", DEFAULT_SPEEDUP))
