"""Images in, model inputs out; and the real sample images that ship inside PyPI packages.

Pixel convention: an image is read as ``p`` in the [0, 1] pixel scale (8-bit values / 255,
16-bit values / 65535, float arrays taken as already in [0, 1]); the model input is
``(p * 255 * scale - mean) / std`` per channel (see :class:`~krypton_db.graph.Preprocess`).
The same mapping turns an occlusion colour given in pixel scale into model-input units.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .graph import Preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".npy")


def to_pil(image):
    """Path / PIL image / array -> PIL image (RGB, L or I;16 as read)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        if path.suffix.lower() == ".npy":
            return array_to_pil(_load_npy(path))
        try:
            img = Image.open(path)
            img.load()
            return img
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(
                f"cannot read image {path}: {exc}; supported: PNG, JPEG and other Pillow "
                "formats, or .npy arrays"
            ) from None
    if isinstance(image, np.ndarray):
        return array_to_pil(image)
    if hasattr(image, "__array__") and not isinstance(image, (bytes, str)):
        return array_to_pil(np.asarray(image))
    raise InputError(f"unsupported image type {type(image).__name__}: give a path, PIL image or array")


def _load_npy(path: Path) -> np.ndarray:
    """A numeric .npy array (never a pickle: ``allow_pickle=False``)."""
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"cannot read {path} as a .npy array ({exc}); save images with "
                         "numpy.save of a numeric HxW, HxWx3 or 3xHxW array") from None


def check_finite(a: np.ndarray, what: str) -> None:
    """Refuse NaN / inf, naming the index of the first non-finite value."""
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise InputError(f"{what} has a non-finite value ({a[idx]}) at index {idx}; NaN and inf "
                         "are not allowed")


def array_to_pil(a: np.ndarray):
    from PIL import Image

    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise InputError(f"unsupported image dtype {a.dtype}; give uint8, uint16 or float "
                         "pixels")
    if a.size == 0:
        raise InputError(f"image array is empty (shape {a.shape})")
    check_finite(a, "image")
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)  # CHW -> HWC
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"image array must be HxW, HxWx3 or 3xHxW, got shape {a.shape}")
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.uint16:
        u8 = (a.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if np.nanmin(a) < -1e-6 or np.nanmax(a) > 1.0 + 1e-6:
            raise InputError(
                f"float image values must lie in [0, 1] (pixel scale), got "
                f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]"
            )
        u8 = (np.clip(a, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise InputError(f"unsupported image dtype {a.dtype}")
    return Image.fromarray(u8)


# One rule for every container: a sample's value over its type's full range. 8-bit samples
# (uint8 arrays, 8-bit PNG / JPEG / ...) / 255, resampled in 8 bits as PIL and torchvision do;
# deeper ones -- uint16 arrays and .npy, 16-bit PNG / TIFF, float arrays (already in [0, 1]),
# DICOM -- / 65535 (float as is), converted and resampled in float: no 8-bit step.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def deep_pixels(image, spec: Preprocess | None = None) -> np.ndarray | None:
    """The image as float64 [H, W] or [H, W, C] in [0, 1] when its samples have more than 8
    bits (see the rule above), else None (the 8-bit path)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_file() and is_dicom(path):
            return dicom_pixels(path, window=bool(spec is not None and spec.window))
        if path.is_file() and path.suffix.lower() == ".npy":
            return deep_pixels(_load_npy(path), spec)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as lazy:  # the header only: the mode, without decoding
                deep = lazy.mode in SIXTEEN_BIT_MODES or lazy.mode == "F"
        except (OSError, ValueError):
            return None  # to_pil reports what is wrong with the file
        if not deep:
            return None
        image = to_pil(path)
    if isinstance(image, Image.Image):
        if image.mode in SIXTEEN_BIT_MODES:
            a = np.asarray(image, np.float64)
            if a.min() < 0 or a.max() > 65535:
                raise InputError(f"{image.mode} image values must lie in [0, 65535] (16-bit), got "
                                 f"[{a.min():g}, {a.max():g}]")
            return a / 65535.0
        if image.mode == "F":
            return _unit_floats(np.asarray(image, np.float64))
        return None
    if isinstance(image, np.ndarray) or (hasattr(image, "__array__")
                                         and not isinstance(image, (bytes, str))):
        a = np.asarray(image)
        if a.dtype == np.uint16:
            return _hwc(a).astype(np.float64) / 65535.0
        if a.dtype.kind == "f" and a.size:
            check_finite(a, "image")
            return _unit_floats(_hwc(a).astype(np.float64))
    return None


def _unit_floats(a: np.ndarray) -> np.ndarray:
    if a.min() < -1e-6 or a.max() > 1.0 + 1e-6:
        raise InputError(f"float image values must lie in [0, 1] (pixel scale), got "
                         f"[{a.min():.3g}, {a.max():.3g}]")
    return np.clip(a, 0.0, 1.0)


def _hwc(a: np.ndarray) -> np.ndarray:
    """CHW -> HWC and a single channel -> HW, as ``array_to_pil`` reads arrays."""
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"image array must be HxW, HxWx3 or 3xHxW, got shape {a.shape}")
    return a


def is_dicom(path: Path) -> bool:
    """A DICOM file: the ``.dcm`` suffix or the ``DICM`` marker after the 128-byte preamble."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_pixels(path: Path, window: bool = False) -> np.ndarray:
    """A single-frame DICOM image as float64 in [0, 1] (pydicom, an optional extra): the
    modality LUT (rescale slope / intercept) applied; with ``window`` and a window in the file
    its centre / width (DICOM's linear VOI function), else the stored range mapped through the
    modality LUT; MONOCHROME1 inverted (bright = high)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        raise InputError("DICOM images need pydicom: pip install 'krypton_db[dicom]'") from None
    try:
        ds = pydicom.dcmread(str(path))
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any reader failure: name the file and the cause
        raise InputError(f"cannot read DICOM {path}: {type(exc).__name__}: {exc}") from None
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"DICOM {path} has {ds.NumberOfFrames} frames; give one frame "
                         "(an array of it, or a single-frame file)")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    bits = int(getattr(ds, "BitsStored", 16))
    if photometric.startswith("MONOCHROME"):
        v = np.asarray(apply_modality_lut(raw, ds), np.float64)
        signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
        lo_raw, hi_raw = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        icpt = float(getattr(ds, "RescaleIntercept", 0) or 0)
        lo, hi = sorted((lo_raw * slope + icpt, hi_raw * slope + icpt))
        if window and "WindowCenter" in ds and "WindowWidth" in ds:
            c = float(np.ravel(ds.WindowCenter)[0])
            w = max(float(np.ravel(ds.WindowWidth)[0]), 1.0)
            out = np.clip((v - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0) if w > 1 else \
                (v > c).astype(np.float64)
        else:
            out = np.clip((v - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
        return 1.0 - out if photometric == "MONOCHROME1" else out
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):  # pixel_array is RGB already
        return np.asarray(raw, np.float64) / (2 ** bits - 1)
    raise InputError(f"DICOM {path}: photometric interpretation {photometric} is not supported "
                     "(MONOCHROME1 / 2, RGB, YBR_FULL)")


def _float_resized(a: np.ndarray, spec: Preprocess) -> np.ndarray:
    """[H, W(, C)] floats in [0, 1] -> [h, w, channels] float32 at the model size, in float:
    grey <-> RGB as PIL converts (ITU-R 601-2 luma), bicubic per channel, clipped to [0, 1]."""
    from PIL import Image

    if a.ndim == 3:
        a = a[:, :, :3]
    if spec.channels == 1 and a.ndim == 3:
        a = a @ np.array([0.299, 0.587, 0.114])
    if spec.channels == 3 and a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    planes = [a] if a.ndim == 2 else [a[:, :, k] for k in range(a.shape[2])]
    h, w = spec.size
    out = []
    for p in planes:
        img = Image.fromarray(np.ascontiguousarray(p, np.float32))  # mode "F"
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        out.append(np.asarray(img, np.float32))
    return np.clip(np.stack(out, axis=2), 0.0, 1.0)


def pixels(image, spec: Preprocess) -> np.ndarray:
    """Image -> float32 [H, W, C] in [0, 1], resized to the model's input size (the rule
    above: 8-bit images in 8 bits, deeper ones in float)."""
    from PIL import Image

    deep = deep_pixels(image, spec)
    if deep is not None:
        return _float_resized(deep, spec)
    img = to_pil(image)
    img = img.convert("L" if spec.channels == 1 else "RGB")
    h, w = spec.size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BICUBIC)
    p = np.asarray(img, np.float32) / 255.0
    return p[:, :, None] if p.ndim == 2 else p


def normalize(p: np.ndarray, spec: Preprocess) -> np.ndarray:
    """[H, W, C] pixels in [0, 1] -> one model input in the model's layout (no batch axis)."""
    mean = np.asarray(spec.mean, np.float32)[: spec.channels]
    std = np.asarray(spec.std, np.float32)[: spec.channels]
    x = (p * np.float32(255.0 * spec.scale) - mean) / std
    x = x.astype(np.float32)
    return np.ascontiguousarray(x if spec.layout == "NHWC" else x.transpose(2, 0, 1))


@dataclass(frozen=True)
class ModelInput:
    """A model input taken as is (Captum's way), with the occlusion baseline in input units.

    ``values``: one sample, NCHW float32 [C, H, W]; ``baseline``: [C] (one value per channel)
    or [C, H, W] (the occluded cells take the baseline's own values there)."""

    values: np.ndarray
    baseline: np.ndarray


def color_to_input(color, spec: Preprocess) -> np.ndarray:
    """An occlusion colour in pixel scale (scalar or per channel) -> per-channel input values."""
    c = np.broadcast_to(np.asarray(color, np.float64).reshape(-1), (spec.channels,))
    if np.any(c < 0) or np.any(c > 1):
        raise InputError(f"colour {color} must lie in [0, 1] (image pixel scale; black = 0)")
    mean = np.asarray(spec.mean, np.float64)[: spec.channels]
    std = np.asarray(spec.std, np.float64)[: spec.channels]
    return ((c * 255.0 * spec.scale - mean) / std).astype(np.float32)


# -- real sample images shipped inside installed packages -----------------------------------

SAMPLES = {
    "mri": "brain MRI slice, 256x256 16-bit (matplotlib sample data s1045.ima.gz)",
    "grace_hopper": "portrait photo (matplotlib sample data grace_hopper.jpg)",
    "astronaut": "scikit-image skimage.data.astronaut()",
    "chelsea": "scikit-image skimage.data.chelsea() (a cat)",
    "coffee": "scikit-image skimage.data.coffee()",
    "rocket": "scikit-image skimage.data.rocket()",
    "camera": "scikit-image skimage.data.camera()",
}


def sample_image(name: str):
    """A real image that ships inside an installed package, as a PIL image."""
    from PIL import Image

    if name == "mri":
        try:
            from matplotlib import cbook
        except ImportError:
            raise InputError("sample 'mri' needs matplotlib: pip install matplotlib") from None
        with cbook.get_sample_data("s1045.ima.gz") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        a = np.frombuffer(raw, np.uint16).reshape(256, 256).astype(np.float64)
        return Image.fromarray((a / a.max() * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            img = Image.open(f)
            img.load()
        return img.convert("RGB")
    if name in SAMPLES:
        try:
            from skimage import data
        except ImportError:
            raise InputError(f"sample {name!r} needs scikit-image: pip install scikit-image") from None
        return array_to_pil(getattr(data, name)()).convert("RGB")
    raise InputError(f"unknown sample image {name!r}; available: {', '.join(SAMPLES)}")
