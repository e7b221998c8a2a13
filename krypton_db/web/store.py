"""The viewer's access to one catalog: reads for browsing, the loaded models, uploads, and the
only writes the viewer makes (the runs it starts, the images uploaded to it).

Invariants: every catalog statement runs under ``self._lock`` (one DuckDB connection refuses
concurrent calls from threads) and no computation runs while it is held; a read-only viewer
(``read_only=True``) never opens the file for writing; uploads are written only inside
``upload_dir`` (a folder beside the catalog file), under a name derived from their content.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path

import numpy as np

from ..api import record_run, resolve_tau
from ..catalog import Catalog
from ..errors import InputError
from ..images import IMAGE_SUFFIXES, deep_pixels, pixels, to_pil

UPLOAD_FOLDER = "krypton_uploads"  # beside the catalog file
DEFAULT_MAX_UPLOAD = 32 << 20  # bytes
THUMB_PX = 96


class UnknownIdError(InputError):
    """No catalog row (or viewer job) with the id a request names."""


class ReadOnlyError(InputError):
    """A write asked of a viewer that opened its catalog read-only."""


class UploadTooLargeError(InputError):
    """An upload over the viewer's size limit."""


class ForbiddenError(InputError):
    """A write without the viewer page's header (another web page's request)."""


class ViewerStore:
    """One catalog file as the viewer uses it (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, read_only: bool = False,
                 lock_timeout: float = 5.0, max_upload: int = DEFAULT_MAX_UPLOAD):
        path = Path(path).expanduser().resolve()
        self.read_only = read_only
        self.catalog = Catalog(path, read_only=read_only, lock_timeout=lock_timeout)
        self.path = str(path)
        self.upload_dir = path.parent / UPLOAD_FOLDER
        self.max_upload = int(max_upload)
        self._lock = threading.RLock()
        self._models: dict[int, object] = {}  # model id -> loaded Model (keeps its warm views)
        self._models_lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self.catalog.close()

    def _all(self, sql: str, params: list | None = None) -> list[tuple]:
        with self._lock, self.catalog.connection() as con:
            return con.execute(sql, params or []).fetchall()

    def _one(self, sql: str, params: list, missing: str) -> tuple:
        rows = self._all(sql, params)
        if not rows:
            raise UnknownIdError(missing)
        return rows[0]

    # -- browsing ------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        cols = ("id", "name", "version", "source", "input_shape", "num_classes", "macs",
                "registered_at")
        return [_row(cols, r) for r in self._all(
            "SELECT id, name, version, source, input_shape, num_classes, macs, registered_at "
            "FROM models ORDER BY id")]

    def images(self, image_id: int | None = None) -> list[dict]:
        """Every image version (or version ``image_id``), oldest first."""
        cols = ("id", "name", "version", "width", "height", "channels", "dtype", "registered_at")
        return [_row(cols, r) for r in self._all(
            "SELECT id, name, version, width, height, channels, dtype, registered_at FROM images "
            "WHERE (? IS NULL OR id = ?) ORDER BY id", [image_id, image_id])]

    def runs(self, limit: int = 500, run_id: int | None = None) -> list[dict]:
        """The latest ``limit`` runs (or run ``run_id``), newest first."""
        cols = ("id", "model_id", "model", "model_version", "image_id", "image", "image_version",
                "mode", "settings", "target_class", "label", "timings", "heatmap_h", "heatmap_w",
                "status", "created_at", "all_classes")
        out = []
        for r in self._all(
                "SELECT r.id, m.id, m.name, m.version, i.id, i.name, i.version, r.mode, "
                "r.settings, "
                "r.target_class, CASE WHEN r.target_class IS NULL THEN NULL "
                "ELSE m.labels[r.target_class + 1] END, r.timings, r.heatmap_h, r.heatmap_w, "
                "r.status, r.created_at, EXISTS (SELECT 1 FROM heatmap_probs p "
                "WHERE p.run_id = r.id) FROM runs r JOIN models m ON m.id = r.model_id "
                "JOIN images i ON i.id = r.image_id WHERE (? IS NULL OR r.id = ?) "
                "ORDER BY r.id DESC LIMIT ?", [run_id, run_id, int(limit)]):
            d = _row(cols, r)
            d["settings"], d["timings"] = json.loads(d["settings"]), json.loads(d["timings"])
            out.append(d)
        return out

    def run(self, run_id: int) -> dict:
        runs = self.runs(1, int(run_id))
        if not runs:
            raise UnknownIdError(f"no run {run_id} in the catalog")
        d = runs[0]
        d["grid"] = self.grid(run_id)
        if d["all_classes"]:
            d["labels"] = self.labels(d["model_id"])
        return d

    def labels(self, model_id: int) -> list[str]:
        return list(self._one("SELECT labels FROM models WHERE id = ?", [int(model_id)],
                              f"no model {model_id} in the catalog")[0])

    def grid(self, run_id: int, klass: int | None = None) -> dict:
        """The run's heat map as rows (ys), columns (xs) and values [rows][cols] (the target's
        probability, or class ``klass``'s when all classes were recorded)."""
        if klass is None:
            rows = self._all("SELECT y, x, prob FROM heatmaps WHERE run_id = ?", [int(run_id)])
        else:
            rows = self._all("SELECT y, x, prob FROM heatmap_probs WHERE run_id = ? AND "
                             "class = ?", [int(run_id), int(klass)])
        if not rows:
            raise UnknownIdError(f"run {run_id} has no heat map"
                             + ("" if klass is None else f" for class {klass}"))
        a = np.asarray(rows, np.float64)
        ys, iy = np.unique(a[:, 0], return_inverse=True)
        xs, ix = np.unique(a[:, 1], return_inverse=True)
        vals = np.full((ys.size, xs.size), np.nan)
        vals[iy, ix] = a[:, 2]
        return dict(ys=ys.astype(int).tolist(), xs=xs.astype(int).tolist(),
                    values=[[None if np.isnan(v) else float(v) for v in row] for row in vals])

    def datasets(self) -> list[dict]:
        with self._lock:
            return self.catalog.datasets()

    # -- models and pixels ---------------------------------------------------------------------
    def model(self, model_id: int):
        """The registered model version, loaded once per viewer (its executor keeps the views
        that live occlusion reuses)."""
        with self._models_lock:
            m = self._models.get(int(model_id))
        if m is not None:
            return m
        name, version = self._one("SELECT name, version FROM models WHERE id = ?",
                                  [int(model_id)], f"no model {model_id} in the catalog")
        with self._lock:
            record = self.catalog.model_record(name, version)
        m = record.load()  # seconds for a large model: not under the catalog lock
        with self._models_lock:
            return self._models.setdefault(int(model_id), m)

    def image(self, image_id: int) -> tuple[str, np.ndarray]:
        """(name, stored pixels) of an image version."""
        name, version = self._one("SELECT name, version FROM images WHERE id = ?",
                                  [int(image_id)], f"no image {image_id} in the catalog")
        with self._lock:
            return name, self.catalog.get_image(name, version)

    def input_png(self, model_id: int, image_id: int) -> bytes:
        """The image as the model sees it (resized to its input, the model's channels)."""
        m = self.model(model_id)
        _, px = self.image(image_id)
        return _png(pixels(px, m.spec))

    def thumbnail_png(self, image_id: int) -> bytes:
        from PIL import Image

        _, px = self.image(image_id)
        a = px.astype(np.float32) / (255.0 if px.dtype == np.uint8 else 1.0)
        img = Image.fromarray(_to_uint8(a if a.ndim == 3 else a[..., None]))
        img.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    # -- writes: uploads and the viewer's own runs --------------------------------------------
    def upload(self, data: bytes, filename: str) -> dict:
        """Store uploaded image bytes under ``upload_dir`` and register them; refuses what
        does not decode as an image."""
        self.check_writable("upload images")
        if not data:
            raise InputError("the upload is empty; choose an image file")
        if len(data) > self.max_upload:
            raise UploadTooLargeError(f"the upload is {len(data)} bytes; the limit is "
                                      f"{self.max_upload}")
        stem, suffix = _safe_name(filename)
        if suffix not in IMAGE_SUFFIXES + (".dcm",):
            raise InputError(f"{filename!r}: unknown image type {suffix or '(no suffix)'!r}; "
                             f"upload one of {', '.join(IMAGE_SUFFIXES + ('.dcm',))}")
        digest = hashlib.sha256(data).hexdigest()
        self.upload_dir.mkdir(exist_ok=True)
        target = self.upload_dir / f"{digest[:24]}{suffix}"
        tmp = self.upload_dir / f".part-{digest[:24]}{suffix}"  # same suffix: same decoder
        tmp.write_bytes(data)
        try:
            try:
                _decode(tmp)
            except Exception as exc:  # noqa: BLE001 - any decoder failure is the upload's fault
                why = _one_line(exc).replace(str(tmp), repr(filename)[1:-1])
                raise InputError(f"{filename!r} is not a readable image ({why}); "
                                 "upload a PNG, JPEG, TIFF, DICOM or .npy file") from None
            os.replace(tmp, target)
            with self._lock:
                image_id = self.catalog.register_image(target, None, default_name=stem)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        return self.images(int(image_id))[0]

    def record(self, model, image_id: int, hm, color, region, domain: str) -> int:
        """Record a finished run of the viewer (one transaction: model, image, run, heat map)."""
        self.check_writable("record runs")
        name, px = self.image(image_id)
        with self._lock:
            return record_run(self.catalog, model, px, hm, image_name=name, color=color,
                              region=region, domain=domain)

    def resolve_tau(self, model, mode: str, tau) -> tuple:
        """(tau, where it came from): approximate mode without a tau reads the model's tuned
        tau (domain 'default') from the catalog, as the API does."""
        with self._lock:
            return resolve_tau(model, mode, tau, None, "default", self.catalog)

    def check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyError(f"this viewer opened the catalog read-only; it cannot {what} "
                             "(start krypton serve without --read-only)")


def _decode(path: Path) -> None:
    """Decode the file as the catalog will (raises on anything unreadable)."""
    if deep_pixels(path) is None:
        to_pil(path).load()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _row(cols, r) -> dict:
    d = dict(zip(cols, r))
    for k, v in d.items():
        if hasattr(v, "isoformat"):
            d[k] = v.isoformat(sep=" ", timespec="seconds")
        elif isinstance(v, tuple):
            d[k] = list(v)
    return d


def _to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.clip(np.asarray(a, np.float32), 0.0, 1.0)
    if a.shape[2] == 1:
        a = a[..., 0]
    elif a.shape[2] > 3:
        a = a[..., :3]
    return (a * 255.0 + 0.5).astype(np.uint8)


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(a)).save(buf, "PNG")
    return buf.getvalue()


def _safe_name(filename: str) -> tuple[str, str]:
    """(a display stem of letters, digits, ``._-``, the lower-case suffix) of an uploaded
    file's name; folders in the name are dropped (nothing is written outside upload_dir)."""
    base = re.split(r"[\\/]", str(filename or ""))[-1]
    p = Path(base)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.stem).strip("._") or "upload"
    return stem[:64], p.suffix.lower()
