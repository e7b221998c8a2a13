"""Calibration of the cost model (:mod:`krypton_db.planner.cost`) on this machine: profiled
exact-occlusion runs of a suite of models, per-step times, a non-negative least-squares fit
of the constants, stored as JSON where ``load_cost_model`` reads them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .hooks import OcclusionHooks
from .images import sample_image
from .model import Model, load_model
from .occlusion import occlude
from .planner.cost import FEATURES, NQ, VERSION, cost_model_path, step_features
from .planner.delta_plan import plan_occlusion

CALIBRATION_SUITE = (("zoo:resnet18", "chelsea"), ("zoo:vgg16", "astronaut"),
                     ("zoo:inception3", "coffee"))


def nnls(a: np.ndarray, b: np.ndarray, iters: int = 200) -> np.ndarray:
    """Non-negative least squares min ||a x - b||, x >= 0 (Lawson-Hanson active set).

    Written here because scipy (``scipy.optimize.nnls``) is not a runtime dependency; the
    problems are tiny (6 unknowns). Columns are scaled to unit norm for conditioning."""
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, bool)
    for _ in range(iters):
        grad = a.T @ (b - a @ x)
        if passive.all() or (grad[~passive] <= 1e-12).all():
            break
        j = int(np.argmax(np.where(passive, -np.inf, grad)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x / scale


def profile_run(model, image, patch: int, positions: np.ndarray, batch: int):
    """One profiled exact-occlusion run: (delta plan, {step: seconds}, batch sizes). A run
    on one position first compiles the kernels outside the measurement. The run uses the
    published sizes, the features the cost model reads (``planner.cost``): predictions are
    then upper bounds for runs with per-position regions."""
    occlude(model, image, patch=patch, positions=positions[:1], regions="published")
    hooks = OcclusionHooks(profile=True)
    occlude(model, image, patch=patch, positions=positions, batch_size=batch, hooks=hooks,
            regions="published")
    n = len(positions)
    sizes = [min(batch, n - i) for i in range(0, n, batch)]
    return plan_occlusion(model.graph, (patch, patch), model.executor.plan), hooks.step_secs, sizes


def calibrate(suite=CALIBRATION_SUITE, path=None, patches=None, batches=(16, 64),
              seed: int = 0) -> dict:
    """Fit the cost constants on this machine from per-step times of profiled exact-occlusion
    runs of ``suite`` ((model, image) pairs: names or objects) at each patch size (default
    1/28 and 1/7 of the input side: 8 and 32 at 224) and batch size (two batches each, random
    positions), store them as JSON and return them."""
    rng = np.random.default_rng(seed)
    rows, ys, names = [], [], []
    t_start = time.perf_counter()
    for model, image in suite:
        m = model if isinstance(model, Model) else load_model(model)
        img = sample_image(image) if isinstance(image, str) else image
        _, h, w = m.graph.input_shape
        names.append(m.name)
        side = min(h, w)
        sizes_p = patches or sorted({max(2, round(side / 28)), max(3, round(side / 7))})
        for p in sizes_p:
            if p > min(h, w):
                continue
            for b in batches:
                n = 2 * b
                pos = np.stack([rng.integers(0, h - p + 1, n), rng.integers(0, w - p + 1, n)], 1)
                plan, secs, sizes = profile_run(m, img, p, pos, b)
                for name, f in step_features(plan):
                    rows.append(np.concatenate([f[:NQ] * sum(sizes), [f[NQ] * len(sizes)]]))
                    ys.append(secs.get(name, 0.0))
    if len(ys) < len(FEATURES):
        raise ValueError(f"calibration produced {len(ys)} samples; need >= {len(FEATURES)}")
    x, y = np.asarray(rows), np.asarray(ys)
    coef = nnls(x, y)
    pred = x @ coef
    out = dict(coef=dict(zip(FEATURES, map(float, coef))), models=names, samples=len(ys),
               rmse_s=float(np.sqrt(np.mean((pred - y) ** 2))), total_s=float(y.sum()),
               total_pred_s=float(pred.sum()), batches=list(batches),
               cpus=os.cpu_count(), seconds=round(time.perf_counter() - t_start, 1),
               created=time.strftime("%Y-%m-%dT%H:%M:%S"), version=VERSION)
    p = Path(path) if path else cost_model_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2, sort_keys=True))
    out["path"] = str(p)
    return out
