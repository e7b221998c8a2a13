"""Heat maps out: PNG overlays with a colour bar and a caption, arrays, rows (Parquet / CSV),
the per-pixel map in the original image's coordinates, and a matplotlib plot.

The PNG is drawn with Pillow only (a core dependency): the colour map is a 5-anchor
piecewise-linear "turbo-like" ramp written here and the text uses Pillow's built-in font, so
saving a heat map needs no plotting library; :func:`plot` uses matplotlib when installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .images import ModelInput, deep_pixels, pixels, to_pil

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


SAVE_SUFFIXES = (".png", ".npy", ".parquet", ".csv")


def overlay_png(image_rgb: np.ndarray, hm, path, alpha: float = 0.5, scale: int = 2) -> Path:
    """Write the image (model input size) with the heat map (per-pixel mean probability drop)
    blended on top, a colour bar with its value range, and a caption (target label and
    probability, patch, stride, mode)."""
    from PIL import Image, ImageDraw

    imp = cell_map(hm)
    lo, hi = float(imp.min()), float(imp.max())
    norm = (imp - lo) / (hi - lo) if hi > lo else np.zeros_like(imp)
    base = np.asarray(image_rgb, np.float64)
    if base.max() <= 1.0:
        base = base * 255.0
    if base.ndim == 2:
        base = np.repeat(base[..., None], 3, axis=2)
    if base.shape[2] == 1:
        base = np.repeat(base, 3, axis=2)
    out = (1 - alpha) * base[..., :3] + alpha * colormap(norm)
    h, w = out.shape[:2]
    pic = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).resize((w * scale, h * scale),
                                                                        Image.NEAREST)
    bar_w, margin, top = 16, 8, 30
    canvas = Image.new("RGB", (pic.width + bar_w + 70 + 2 * margin, pic.height + top + 16),
                       "white")
    canvas.paste(pic, (margin, top))
    ramp = colormap(np.linspace(1.0, 0.0, pic.height))[:, None, :].repeat(bar_w, axis=1)
    bx = margin + pic.width + margin
    canvas.paste(Image.fromarray(ramp), (bx, top))
    d = ImageDraw.Draw(canvas)
    d.rectangle([bx, top, bx + bar_w - 1, top + pic.height - 1], outline="black")
    what = "drop" if hm.score == "prob" else "logit drop"
    for frac, v in ((0.0, hi), (0.5, (lo + hi) / 2), (1.0, lo)):
        y = top + int(frac * (pic.height - 1))
        d.line([bx + bar_w, y, bx + bar_w + 4, y], fill="black")
        d.text((bx + bar_w + 6, max(top, min(y - 5, top + pic.height - 11))), f"{v:.3g}", fill="black")
    d.text((bx, top + pic.height + 1), what, fill="black")
    d.text((margin, 4), f"target {hm.label!r} p={hm.base_prob:.4f}  patch {hm.patch[0]}x{hm.patch[1]} "
                        f"stride {hm.stride[0]}x{hm.stride[1]}  {hm.mode}", fill="black")
    d.text((margin, 16), f"colour: mean {what} of the patches covering each pixel", fill="black")
    path = Path(path)
    canvas.save(path)
    return path


def table(hm):
    """The heat map as rows: y, x (top-left of the patch, model-input pixels), prob, and
    ``prob_<k>`` per class when all classes were recorded (a ``pyarrow.Table``)."""
    import pyarrow as pa

    pos = np.asarray(hm.positions).reshape(-1, 2)
    cols = {"y": pa.array(pos[:, 0].astype(np.int32)), "x": pa.array(pos[:, 1].astype(np.int32)),
            "prob": pa.array(np.asarray(hm.probs, np.float32).reshape(-1))}
    if hm.all_probs is not None:
        allp = np.asarray(hm.all_probs, np.float32).reshape(len(pos), -1)
        for k in range(allp.shape[1]):
            cols[f"prob_{k}"] = pa.array(allp[:, k])
    return pa.table(cols)


def save(hm, path, image=None) -> Path:
    """Write ``hm`` by the path's suffix: ``.png`` overlay (needs the image: the one the heat
    map was computed from by default), ``.npy`` the 2-D map, ``.parquet`` / ``.csv`` its rows."""

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise InputError(f"cannot save a heat map as {suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join(SAVE_SUFFIXES)}")
    if not path.parent.is_dir():
        raise InputError(f"folder {str(path.parent)!r} does not exist")
    if suffix == ".npy":
        np.save(path, np.asarray(hm.probs))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table(hm), path)
    elif suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table(hm), path)
    else:
        overlay_png(_input_pixels(hm, image), hm, path)
    return path


def _input_pixels(hm, image=None) -> np.ndarray:
    """The image as the model saw it: [H, W, C] in [0, 1] at the model input size."""

    if hm._ctx is None and image is None:
        raise InputError("this heat map has no image attached; pass image=... to draw it")
    model, img, _ = hm._ctx if hm._ctx is not None else (None, None, None)
    if model is None:
        raise InputError("this heat map has no model attached; pass image=... to draw it")
    if image is None and isinstance(img, ModelInput):
        raise InputError("this heat map was computed from a model-input tensor, not an image; "
                         "pass image=... to draw it over a picture (.npy / .parquet / .csv "
                         "need none)")
    return pixels(image if image is not None else img, model.spec)


def to_image(hm, original_size: bool = True) -> np.ndarray:
    """The per-pixel map (mean drop of the patches covering each pixel) as float32 [H, W]: at
    the model input size, or resized (bilinear) to the original image's size, the coordinates
    of the image the user gave (the model input is the image resized to the model's size)."""
    from PIL import Image

    imp = cell_map(hm).astype(np.float32)
    if not original_size or hm._ctx is None or isinstance(hm._ctx[1], ModelInput):
        return imp  # a model-input tensor has no other size
    deep = deep_pixels(hm._ctx[1])  # 16-bit / float / DICOM sources: their own size
    h0, w0 = deep.shape[:2] if deep is not None else to_pil(hm._ctx[1]).size[::-1]
    if (h0, w0) == imp.shape:
        return imp
    return np.asarray(Image.fromarray(imp, mode="F").resize((w0, h0), Image.BILINEAR), np.float32)


def plot(hm, ax=None, alpha: float = 0.5, cmap: str = "turbo"):
    """Draw the image with the per-pixel map over it and a colour bar on a matplotlib axes
    (a new figure without ``ax``); returns the axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("HeatMap.plot needs matplotlib: pip install matplotlib") from None
    if ax is None:
        _, ax = plt.subplots()
    px = _input_pixels(hm)
    ax.imshow(px[..., 0] if px.shape[2] == 1 else px, cmap="gray" if px.shape[2] == 1 else None)
    im = ax.imshow(cell_map(hm), cmap=cmap, alpha=alpha)
    ax.figure.colorbar(im, ax=ax, label="probability drop" if hm.score == "prob" else "logit drop")
    ax.set_title(f"{hm.label} (p={hm.base_prob:.3f}), patch {hm.patch[0]}, stride {hm.stride[0]}")
    ax.set_axis_off()
    return ax
