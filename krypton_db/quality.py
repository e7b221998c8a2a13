"""Quality of an approximate heat map: SSIM against the exact one.

Definition used throughout krypton_db (tuning, benchmarks): SSIM of the RAW probability maps
(``HeatMap.probs``, the target-class probability per patch position), not of rendered colour
images (the published prototype compared rendered heat maps; the raw maps are the cleaner
definition: no colour map, no per-image normalisation choices).

It is the standard SSIM (Wang et al. 2004) exactly as ``skimage.metrics.structural_similarity``
computes it with its defaults for 2-D float data: uniform (not Gaussian) window, sample
covariance (N / (N - 1)), K1 = 0.01, K2 = 0.03, the mean of the SSIM map over the cells whose
window lies fully inside the map. It is written here with numpy (a summed-area table gives
every window mean) rather than imported from scikit-image, because scikit-image is a
test-only dependency of krypton_db (the tests check this function against it to 1e-6) and is
too heavy to require at run time for ~30 lines of arithmetic.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

K1 = 0.01
K2 = 0.03
DEFAULT_WIN = 7


def default_win_size(shape) -> int:
    """Window rule: 7 (scikit-image's default) when both sides are >= 7; else the largest odd
    size <= min(H, W), which is at least 3 (maps with a side below 3 have no SSIM)."""
    side = int(min(shape))
    if side < 3:
        raise InputError(f"SSIM needs a heat map of at least 3x3 cells, got {tuple(shape)}")
    return min(DEFAULT_WIN, side if side % 2 == 1 else side - 1)


def default_data_range(a: np.ndarray, b: np.ndarray) -> float:
    """The joint range of the pair, max(a.max(), b.max()) - min(a.min(), b.min()); 1.0 when both
    maps are the same constant.

    Why not the fixed 1.0 that probabilities allow: SSIM's stabilising constants are
    (K * data_range)^2, so with 1.0 a heat map whose probabilities move by only 0.01 (a
    confident model, a patch that barely matters) scores ~1 whatever its structure. The joint
    range measures the structure on the scale the pair actually uses, as the prototype's
    rendered (normalised) heat maps did, while one shared range (not one per map) still
    penalises an offset or a change of contrast between the two maps."""
    lo = min(float(a.min()), float(b.min()))
    hi = max(float(a.max()), float(b.max()))
    return hi - lo if hi > lo else 1.0


def _window_means(x: np.ndarray, w: int) -> np.ndarray:
    """Mean of every fully-inside w x w window (the 'valid' part of a uniform filter)."""
    s = np.zeros((x.shape[0] + 1, x.shape[1] + 1))
    s[1:, 1:] = x.cumsum(0).cumsum(1)
    return (s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]) / (w * w)


def ssim(a, b, win_size: int | None = None, data_range: float | None = None) -> float:
    """Mean structural similarity of two 2-D heat maps (raw probability maps; see module doc).

    ``a``, ``b``: arrays of the same 2-D shape, or :class:`~krypton_db.occlusion.HeatMap`
    objects (their ``probs`` are used). ``win_size``: odd, 3 <= win_size <= min(H, W); default
    :func:`default_win_size` (7, or the largest odd size that fits a smaller map).
    ``data_range``: default :func:`default_data_range` (the pair's joint range).
    Equals ``skimage.metrics.structural_similarity(a, b, win_size=..., data_range=...)`` on
    float64 input.
    """
    a = np.asarray(getattr(a, "probs", a), np.float64)
    b = np.asarray(getattr(b, "probs", b), np.float64)
    if a.shape != b.shape:
        raise InputError(f"SSIM needs two heat maps of the same shape, got {a.shape} and {b.shape}")
    if a.ndim != 2:
        raise InputError(f"SSIM needs 2-D heat maps, got shape {a.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("SSIM needs finite heat maps (got NaN or inf)")
    if win_size is None:
        win_size = default_win_size(a.shape)
    elif (not isinstance(win_size, (int, np.integer)) or win_size < 3 or win_size % 2 == 0
          or win_size > min(a.shape)):
        raise InputError(f"win_size must be an odd int with 3 <= win_size <= {min(a.shape)} "
                         f"(the smaller side of the map), got {win_size!r}")
    win_size = int(win_size)
    if data_range is None:
        data_range = default_data_range(a, b)
    elif not (np.isfinite(data_range) and data_range > 0):
        raise InputError(f"data_range must be a positive number, got {data_range!r}")
    n = win_size * win_size
    cov_norm = n / (n - 1.0)  # sample covariance, as scikit-image's default
    ux, uy = _window_means(a, win_size), _window_means(b, win_size)
    uxx, uyy = _window_means(a * a, win_size), _window_means(b * b, win_size)
    uxy = _window_means(a * b, win_size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())
