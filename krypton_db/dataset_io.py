"""What ``explain_dataset`` reads and writes, shared by the driver and every worker: the
images of a dataset (references, content hashes, decoding), the Parquet parts (one per image,
written atomically), and :class:`DatasetWorker`, a loaded model explaining images.

Invariant: a part is named by its image's content hash inside the folder of one settings
hash, and only ever appears whole (temporary name, then rename).
"""

from __future__ import annotations

import glob
import hashlib
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import images as image_io
from .api import run_checked
from .catalog import Catalog, image_digest
from .errors import InputError, KryptonError
from .exec import view_cache
from .model import Model

# a folder's image files: what images.pixels reads by suffix, plus Netpbm and DICOM
IMAGE_SUFFIXES = frozenset(image_io.IMAGE_SUFFIXES) | {".pgm", ".ppm", ".pnm", ".dcm", ".dicom"}


# -- what to explain ------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRef:
    """One image of the dataset before it is read: ``key`` names it in the results (the path
    as given, the catalog name, or ``array-<i>``); exactly one of the sources is set."""

    key: str
    path: str | None = None
    value: object = None  # a pixel array or PIL image
    catalog_name: str | None = None


def image_refs(images, catalog: Catalog | None = None) -> Iterator[ImageRef]:
    """The images of ``images``: a folder (its image files, sorted), a glob (``**`` recurses),
    a file, a Catalog (its registered images), or an iterable of paths / arrays / PIL images
    (or ``ImageRef``s, as the language resolves them).
    Lazy over iterables, so a generator of arrays is never held whole."""
    if isinstance(images, Catalog) or isinstance(getattr(images, "catalog", None), Catalog):
        cat = images if isinstance(images, Catalog) else images.catalog
        names = cat.images()
        if not names:
            raise InputError("the catalog has no registered images to explain")
        yield from (ImageRef(n, catalog_name=n) for n in names)
        return
    if isinstance(images, (str, os.PathLike)):
        yield from (ImageRef(p, path=p) for p in _expand(str(images)))
        return
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        raise InputError("images= takes many images: a folder, a glob, a list of paths or "
                         "arrays; for one array use krypton_db.occlude")
    if not isinstance(images, Iterable):
        raise InputError(f"images must be a folder, a glob, a list of paths / arrays / PIL "
                         f"images or a catalog, got {type(images).__name__}")
    n = 0
    for i, item in enumerate(images):
        n += 1
        if isinstance(item, ImageRef):
            yield item
        elif isinstance(item, (str, os.PathLike)):
            yield ImageRef(str(item), path=str(item))
        elif isinstance(item, np.ndarray) or _is_pil(item):
            yield ImageRef(f"array-{i}", value=item)
        else:
            raise InputError(f"images[{i}] is a {type(item).__name__}; each image is a path, "
                             "a pixel array or a PIL image")
    if n == 0:
        raise InputError("images is empty")


def _is_pil(v) -> bool:
    return type(v).__module__.startswith("PIL.")


def _expand(spec: str) -> list[str]:
    p = Path(spec).expanduser()
    if p.is_dir():
        found = sorted(str(f) for f in p.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise InputError(f"folder {spec!r} holds no image files (suffixes: "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        return found
    if glob.has_magic(spec):
        found = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not found:
            raise InputError(f"no files match {spec!r}")
        return found
    if p.is_file():
        return [str(p)]
    raise InputError(f"images {spec!r} is not a folder, a file or a glob that matches files")


@dataclass
class LoadedImage:
    """An image read on the driver: its content hash and what a worker decodes (the file's
    bytes with its suffix, or the pixel array / PIL image); ``error`` when it cannot be read."""

    ref: ImageRef
    sha256: str | None
    payload: object = None
    suffix: str = ""
    error: str | None = None
    recovered: bool = False  # its part is on disk but not in the catalog: record, don't run


def load_ref(ref: ImageRef, catalog: Catalog | None) -> LoadedImage:
    """Read one image's content and hash it (file bytes; pixels for arrays and catalog
    images). A failure is recorded on the result, never raised."""
    try:
        if ref.path is not None:
            data = Path(ref.path).read_bytes()
            return LoadedImage(ref, hashlib.sha256(data).hexdigest(), data,
                               Path(ref.path).suffix.lower())
        if ref.catalog_name is not None:
            px = catalog.get_image(ref.catalog_name)
            return LoadedImage(ref, image_digest(px), px)
        if _is_pil(ref.value):
            img = ref.value
            head = f"PIL:{img.mode}:{img.size}:".encode()
            return LoadedImage(ref, hashlib.sha256(head + img.tobytes()).hexdigest(), img)
        a = np.asarray(ref.value)
        head = f"{a.dtype.str}:{a.shape}:".encode()
        return LoadedImage(ref, hashlib.sha256(head + np.ascontiguousarray(a).tobytes())
                           .hexdigest(), a)
    except (OSError, KryptonError) as e:
        return LoadedImage(ref, None, error=message(e))


def decode(img: LoadedImage, spec, scratch: Path | None = None) -> np.ndarray:
    """The model-input pixels (float32 [H, W, C] in [0, 1]) of a loaded image. File bytes are
    decoded from a file of the same suffix (every reader - Pillow, numpy, pydicom - takes
    paths); ``scratch`` is the folder for it (a worker away from the driver's disk)."""
    if not isinstance(img.payload, bytes):
        return image_io.pixels(img.payload, spec)
    if img.ref.path is not None and scratch is None:
        return image_io.pixels(img.ref.path, spec)
    tmp = Path(scratch) / f"{img.sha256}{img.suffix}"
    tmp.write_bytes(img.payload)
    try:
        return image_io.pixels(tmp, spec)
    finally:
        tmp.unlink(missing_ok=True)


def message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if not isinstance(e, KryptonError) else str(e)


# -- where results go -----------------------------------------------------------------------

def output_location(out) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, root path in it, the location as recorded) of ``out``: a local folder or
    a ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``)."""
    s = str(out)
    if "://" in s:
        try:
            fs, root = pafs.FileSystem.from_uri(s)
        except (pa.ArrowException, ValueError) as e:
            raise InputError(f"out={s!r}: not a usable pyarrow.fs location ({e})") from e
        return fs, root.rstrip("/"), s.rstrip("/")
    root = str(Path(s).expanduser().resolve())
    return pafs.LocalFileSystem(), root, root


def part_name(image_sha256: str) -> str:
    return f"part-{image_sha256[:32]}.parquet"


def write_part(fs: pafs.FileSystem, folder: str, name: str, table: pa.Table) -> None:
    """Write ``folder/name`` atomically: a temporary name in the same folder, then a rename
    (replacing an earlier copy of the same part). Readers glob ``*.parquet``; the temporary
    name does not match."""
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, f"{folder}/{name}")
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, pa.ArrowException):
            pass
        raise


def part_exists(fs: pafs.FileSystem, folder: str, name: str) -> bool:
    return fs.get_file_info(f"{folder}/{name}").type == pafs.FileType.File


def part_table(hm, key: str, image_sha256: str, settings_sha256: str, model_name: str,
               all_classes: bool) -> pa.Table:
    """One image's rows: image, image_sha256, settings_sha256, model, target, label, y, x
    (top-left of the patch, model-input pixels), prob, and ``probs`` (every class) if kept."""
    pos = np.asarray(hm.positions).reshape(-1, 2)
    n = len(pos)
    cols = {
        "image": pa.array([key] * n, pa.string()),
        "image_sha256": pa.array([image_sha256] * n, pa.string()),
        "settings_sha256": pa.array([settings_sha256] * n, pa.string()),
        "model": pa.array([model_name] * n, pa.string()),
        "target": pa.array(np.full(n, hm.target, np.int32)),
        "label": pa.array([hm.label] * n, pa.string()),
        "y": pa.array(pos[:, 0].astype(np.int32)),
        "x": pa.array(pos[:, 1].astype(np.int32)),
        "prob": pa.array(np.asarray(hm.probs, np.float32).reshape(-1)),
    }
    if all_classes:
        allp = np.asarray(hm.all_probs, np.float32).reshape(n, -1)
        cols["probs"] = pa.FixedSizeListArray.from_arrays(pa.array(allp.reshape(-1)),
                                                          allp.shape[1])
    return pa.table(cols)


# -- one worker: a loaded model explaining images -------------------------------------------

@dataclass
class Job:
    """Everything a worker needs besides the model: the checked options, the settings hash,
    the output folder and the job id."""

    opts: dict
    tau_source: str | None
    settings_sha256: str
    out: str         # the location as given to pyarrow (local root or URI)
    folder: str      # the part folder's path inside the filesystem
    all_classes: bool
    job: str


class DatasetWorker:
    """Explains images one after another with one loaded model (its executor, compiled
    kernels and buffers stay warm between images). Used in-process by the local backend and
    inside each Ray actor."""

    def __init__(self, model: Model, job: Job, name: str = "local",
                 scratch: Path | None = None):
        self.model, self.job, self.name, self.scratch = model, job, name, scratch
        self.fs = output_location(job.out)[0]

    def explain(self, img: LoadedImage, pixels: np.ndarray | None = None) -> dict:
        """One image -> its part on disk; returns the record for the catalog (status 'done'
        or 'failed' with the message). Never raises for a bad image or a model error."""
        t0 = time.perf_counter()
        rec = dict(image=img.ref.key, image_sha256=img.sha256, worker=self.name)
        if img.error is not None:
            return dict(rec, status="failed", error=img.error, seconds=0.0)
        try:
            px = pixels if pixels is not None else decode(img, self.model.spec, self.scratch)
            # each image is explained once: keeping its views (a copy of every layer's
            # output) in the model's view cache would only cost time and memory
            with view_cache.paused():
                hm = run_checked(self.model, px, self.job.opts, None,
                                 self.job.opts["drilldown"], self.job.tau_source)
            table = part_table(hm, img.ref.key, img.sha256, self.job.settings_sha256,
                               self.model.name, self.job.all_classes)
            name = part_name(img.sha256)
            write_part(self.fs, self.job.folder, name, table)
        except (KryptonError, OSError, ValueError, RuntimeError, MemoryError) as e:
            return dict(rec, status="failed", error=message(e),
                        seconds=time.perf_counter() - t0)
        return dict(rec, status="done", part=name, target_class=int(hm.target),
                    cells=table.num_rows, seconds=time.perf_counter() - t0)
