"""Heat-map rendering: colour maps and PNG overlays (Pillow only, no matplotlib at run time).

The colour map is a 5-anchor piecewise-linear "turbo-like" ramp written here to keep the
runtime dependencies to the core list; matplotlib's maps are not needed for an overlay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ANCHORS = np.array([
    [0.19, 0.07, 0.23], [0.16, 0.47, 0.93], [0.16, 0.85, 0.55], [0.98, 0.73, 0.18], [0.60, 0.02, 0.01],
])


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 (low = dark blue, high = dark red)."""
    v = np.clip(np.nan_to_num(np.asarray(v, np.float64)), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(v.astype(int), len(_ANCHORS) - 2)
    f = (v - i)[..., None]
    rgb = _ANCHORS[i] * (1 - f) + _ANCHORS[i + 1] * f
    return (rgb * 255 + 0.5).astype(np.uint8)


def cell_map(hm) -> np.ndarray:
    """Per-pixel importance: mean probability drop over the patches covering each pixel."""
    h, w = hm.input_hw
    acc = np.zeros((h, w))
    cnt = np.zeros((h, w))
    ph, pw = hm.patch
    for (y, x), d in zip(hm.positions.reshape(-1, 2), hm.drop.reshape(-1)):
        acc[y : y + ph, x : x + pw] += d
        cnt[y : y + ph, x : x + pw] += 1
    return np.where(cnt > 0, acc / np.maximum(cnt, 1), 0.0)


def overlay_png(image_rgb: np.ndarray, hm, path, alpha: float = 0.5) -> Path:
    """Write the image with the heat map (probability drop, normalised) blended on top."""
    from PIL import Image

    imp = cell_map(hm)
    lo, hi = imp.min(), imp.max()
    norm = (imp - lo) / (hi - lo) if hi > lo else np.zeros_like(imp)
    base = np.asarray(image_rgb, np.float64)
    if base.max() <= 1.0:
        base = base * 255.0
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    out = (1 - alpha) * base[..., :3] + alpha * colormap(norm)
    path = Path(path)
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).resize(
        (base.shape[1] * 2, base.shape[0] * 2), Image.NEAREST).save(path)
    return path
