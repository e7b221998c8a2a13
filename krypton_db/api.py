"""The public facade: ``occlude``, ``theoretical_speedup``, ``plan``, ``connect``.

The only module of the core that imports the planner (imports point one way: the planner
builds on the core data model; the core reaches the planner only through this facade and
the occlusion driver).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .model import Model, load_model
from .occlusion import HeatMap
from .occlusion import occlude as _occlude


def _model(model) -> Model:
    return model if isinstance(model, Model) else load_model(model)


def plan(model, patch=16):
    """The delta plan of an occlusion query (per-layer rule, patch and read-in sizes, MACs full
    vs incremental); ``print(plan(m).explain())``."""
    from .occlusion import _pair
    from .planner.delta_plan import plan_occlusion

    m = _model(model)
    return plan_occlusion(m.graph, _pair(patch, "patch"), m.executor.plan)


def theoretical_speedup(model, patch=16) -> float:
    """FLOPs(full) / FLOPs(incremental) for a patch (conv + FC, published patch-size rules)."""
    return plan(model, patch).theoretical_speedup


def _image_name(image) -> str:
    if isinstance(image, (str, Path)):
        return Path(image).name
    from .images import to_pil

    px = np.asarray(to_pil(image).convert("RGB"), np.uint8)
    return "image-" + hashlib.sha256(px.tobytes()).hexdigest()[:12]


def occlude(model, image, patch=16, stride=4, color=0.0, target=None, mode: str = "exact",
            region=None, positions=None, all_classes: bool = False, catalog=None,
            image_name: str | None = None, **kw) -> HeatMap:
    """Occlusion heat map (see :func:`krypton_db.occlusion.occlude` for the semantics).

    ``catalog``: a :class:`~krypton_db.catalog.Catalog` or session (from ``connect``) to
    record the run in (model and image registered on first use); the run id lands in
    ``heatmap.stats['run_id']``.
    """
    m = _model(model)
    hm = _occlude(m, image, patch=patch, stride=stride, color=color, target=target, mode=mode,
                  region=region, positions=positions, all_classes=all_classes, **kw)
    if catalog is not None and positions is None:
        cat = getattr(catalog, "catalog", catalog)
        if m.name not in cat.models():
            cat.register_model(m)
        name = image_name or _image_name(image)
        if name not in cat.images():
            cat.register_image(image, name)
        settings = dict(patch=list(hm.patch), stride=list(hm.stride),
                        color=np.asarray(color, float).tolist(), region=region, score=hm.score)
        timings = {k: hm.stats[k] for k in ("jit_s", "prepare_s", "run_s", "total_s")}
        timings["batch_size"] = hm.stats["batch_size"]
        hm.stats["run_id"] = cat.record_run(
            m.name, name, mode, settings, hm.target, timings, hm.probs,
            positions=(hm.positions[:, 0, 0], hm.positions[0, :, 1]), all_probs=hm.all_probs)
    return hm
