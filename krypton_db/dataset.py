"""Explaining whole datasets: many images in one call, each image's heat map streamed to a
Parquet dataset and recorded in the catalog, on this machine or on a Ray cluster.

Invariants:
- One image's result is one Parquet part, named by (settings hash, image content hash) and
  written under a temporary name then renamed into place: a crash never leaves a half file;
  an image computed twice (a dead Ray actor's image retried elsewhere) rewrites the same name
  with the same rows, so each image lands exactly once; ``resume=True`` skips images whose
  part exists.
- The driver holds a bounded number of images at a time and no heat map after it is written:
  its memory does not grow with the number of images.
- The driver is the only catalog writer (one ``dataset_runs`` row per image); workers write
  only their Parquet parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from .api import RUN_OPTIONS, check_occlude_args, opened_catalog, resolve_tau
from .catalog import Catalog, model_digest, to_json
from .dataset_io import (DatasetWorker, ImageRef, Job, LoadedImage, decode, image_refs, load_ref,
                         message, output_location, part_exists, part_name)
from .dataset_ray import run_ray
from .errors import InputError, KryptonError
from .model import Model, load_model

# bump when the rows of a part change meaning: a new format never resumes an old part
RESULT_FORMAT = 1
PREFETCH = 2  # images decoded ahead of the executor (local backend)


# -- the result handle ----------------------------------------------------------------------

@dataclass
class DatasetResult:
    """What one ``explain_dataset`` call did and where its results are.

    ``done`` / ``failed`` / ``skipped`` count images (skipped: a part existed, resume=True,
    or the same content twice in the input); ``failures`` lists (image, message);
    ``dataset()`` / ``relation()`` / ``sql()`` read the Parquet results (every image
    explained with these settings at this location, earlier calls' included)."""

    location: str
    folder: str
    settings_sha256: str
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    dataset_id: int | None = None
    job: str = ""
    backend: str = "local"
    workers: list[dict] = field(default_factory=list)  # Ray: name, pid, threads, load_s
    startup_s: float = 0.0  # Ray: until the workers were ready (part of ``seconds``)
    images: dict[str, str] = field(default_factory=dict)  # content hash -> name, this call's
    _fs: object = field(default=None, repr=False)

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.done / self.seconds if self.seconds > 0 else 0.0

    def dataset(self):
        """The results as a ``pyarrow.dataset.Dataset``."""
        import pyarrow.dataset as pads

        files = [f.path for f in self._fs.get_file_info(pafs.FileSelector(self.folder))
                 if f.path.endswith(".parquet") and not Path(f.path).name.startswith(".")]
        return pads.dataset(sorted(files), format="parquet", filesystem=self._fs)

    def relation(self, con=None):
        """The results as a DuckDB relation (``con``: a connection, default a new in-memory
        one); local folders are scanned by DuckDB directly, other filesystems via Arrow."""
        import duckdb

        con = con or duckdb.connect()
        if isinstance(self._fs, pafs.LocalFileSystem):
            return con.read_parquet(str(Path(self.folder) / "*.parquet"))
        return con.from_arrow(self.dataset())

    def sql(self, query: str, con=None):
        """Run ``query`` with the results as table ``heatmaps`` (e.g. ``SELECT image,
        max(1 - prob) FROM heatmaps GROUP BY image``); returns a DuckDB relation."""
        import duckdb

        con = con or duckdb.connect()
        self.relation(con).create_view("heatmaps", replace=True)
        return con.sql(query)

    def __str__(self) -> str:
        return (f"{self.done} done, {self.failed} failed, {self.skipped} skipped in "
                f"{self.seconds:.1f} s ({self.images_per_minute:.1f} images/min, {self.backend}"
                f"{'' if self.backend == 'local' else f', {len(self.workers)} workers'}) -> "
                f"{self.folder}")


# -- the call -------------------------------------------------------------------------------

BACKENDS = ("local", "ray")


def explain_dataset(model, images, *, patch=16, stride=4, mode: str = "exact", tau=None,
                    target=None, color=None, region=None, all_classes: bool = False,
                    drilldown=None, target_ssim=None, domain: str = "default",
                    out="heatmaps", catalog=None, backend: str = "local", address=None,
                    workers: int | None = None, cpus_per_worker: int | None = None,
                    resume: bool = True, progress: bool = True,
                    on_image: Callable[[dict], None] | None = None, **run_options
                    ) -> DatasetResult:
    """Explain every image of ``images`` with one model and one set of settings.

    ``images``: a folder, a glob (``'scans/**/*.png'``), a list of paths, an iterable of
    pixel arrays / PIL images, or a catalog (its registered images). The options are
    :func:`krypton_db.occlude`'s, checked the same way before anything runs (``target=None``
    explains each image's predicted class). Results stream to ``out`` (a folder or a
    ``pyarrow.fs`` URI): one Parquet part per image in ``out/<settings hash>/`` with rows
    image, image_sha256, settings_sha256, model, target, label, y, x, prob (and ``probs``
    with ``all_classes``). ``catalog`` (a path, Catalog or session) registers the dataset
    and one ``dataset_runs`` row per image, the failures with their message.

    ``resume=True`` skips images whose results exist for the same model and settings (image
    content hash + settings hash), so a rerun after a crash does only what is missing.
    An image that cannot be read or explained is recorded as failed; the rest go on.

    ``backend="local"`` explains in this process with all cores, decoding the next images on
    a thread meanwhile. ``backend="ray"``: ``workers`` Ray actors (default: the cluster's
    CPUs / ``cpus_per_worker``), each loading the model once, with threads = its CPUs;
    ``address`` joins a running cluster, else a local one is started on 127.0.0.1 and
    stopped after. An actor that dies has its images retried on the others.

    ``on_image(record)`` is called on the driver after each image (the catalog row's fields).
    Further keyword arguments: ``batch_size``, ``memory_budget``, ``score``, ``device``,
    ``precision``, ``regions``.
    """
    unknown = sorted(set(run_options) - (set(RUN_OPTIONS) - {"engine"}))
    if unknown:
        raise InputError(f"unknown option {unknown[0]!r}; explain_dataset takes occlude's "
                         "options and batch_size, memory_budget, score, device, precision, "
                         "regions")
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    for name, v in (("resume", resume), ("progress", progress), ("all_classes", all_classes)):
        if not isinstance(v, bool):
            raise InputError(f"{name} must be True or False, got {v!r}")
    for name, v in (("workers", workers), ("cpus_per_worker", cpus_per_worker)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if backend == "local" and (address is not None or workers is not None
                               or cpus_per_worker is not None):
        raise InputError("address / workers / cpus_per_worker are for backend='ray'")
    if on_image is not None and not callable(on_image):
        raise InputError("on_image must be a function of one record")
    m = model if isinstance(model, Model) else load_model(model)
    opts = check_occlude_args(m, dict(patch=patch, stride=stride, color=color, target=target,
                                      mode=mode, region=region, all_classes=all_classes,
                                      tau=tau, target_ssim=target_ssim, domain=domain,
                                      drilldown=drilldown, **run_options))
    with opened_catalog(catalog) as cat:
        tau_v, tau_source = resolve_tau(m, opts["mode"], opts["tau"], opts["target_ssim"],
                                        opts["domain"], cat)
        opts = dict(opts, tau=tau_v)
        # the catalog images are read from: the one given as images= (a Catalog or session),
        # else catalog= (which alone is recorded into)
        source = getattr(images, "catalog", images)
        source = source if isinstance(source, Catalog) else cat
        refs = image_refs(images, source)
        first = next(refs)  # a source that names no image fails before anything is written
        refs = itertools.chain([first], refs)
        settings = dataset_settings(m, opts)
        settings_sha = hashlib.sha256(to_json(settings).encode()).hexdigest()
        fs, root, location = output_location(out)
        folder = f"{root}/{settings_sha[:16]}"
        try:
            fs.create_dir(folder, recursive=True)
            _write_settings(fs, folder, settings)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot write results under {location!r}: {e}") from e
        job = Job(opts, tau_source, settings_sha, location if "://" in location else root,
                  folder, all_classes, uuid.uuid4().hex[:12])
        result = DatasetResult(location, folder, settings_sha, job=job.job, backend=backend,
                               _fs=fs)
        if cat is not None:
            with cat.transaction():
                model_id = cat.register_model(m, replace=True)
                result.dataset_id = cat.register_dataset(location, model_id, to_json(settings),
                                                         settings_sha)
        done_in_catalog = (cat.dataset_images_done(result.dataset_id) if cat is not None
                           else set())
        # the prefetch thread reads catalog images while the driver records rows: one DuckDB
        # connection, which refuses concurrent calls, so both go through this lock
        lock = threading.Lock()
        todo = _pending(refs, source, cat, lock, fs, folder, resume, done_in_catalog, result)
        t0 = time.perf_counter()
        with _Recorder(cat, lock, result, on_image, progress, m.name) as rec:
            if backend == "local":
                _run_local(m, job, todo, rec)
            else:
                result.workers, result.startup_s = run_ray(m, job, todo, rec, address, workers,
                                                           cpus_per_worker)
        result.seconds = time.perf_counter() - t0
    return result


def _write_settings(fs, folder: str, settings: dict) -> None:
    """``_settings.json`` beside the parts: what the folder's hash stands for."""
    tmp = f"{folder}/._settings.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(to_json(settings).encode())
    fs.move(tmp, f"{folder}/_settings.json")


def dataset_settings(m: Model, opts: dict) -> dict:
    """What the results depend on (the settings hash): the model's content, the checked
    options that change a heat map, the result format. Batch sizes, devices and the output
    regions (``regions``: the same values within float rounding) do not."""
    keep = ("patch", "stride", "color", "target", "mode", "region", "all_classes", "tau",
            "drilldown", "score")
    s = {k: opts.get(k) for k in keep}
    s["color"] = np.asarray(0.0 if s["color"] is None else s["color"], float).tolist()
    if s["mode"] != "approximate":
        s["tau"] = None
    if opts.get("precision", "fast") != "fast":  # absent at the default: older hashes hold
        s["precision"] = opts["precision"]
    return dict(model=m.name, model_sha256=model_digest(m), format=RESULT_FORMAT, **s)


def _pending(refs: Iterator[ImageRef], source, cat, lock, fs, folder: str, resume: bool,
             done_in_catalog: set[str], result: DatasetResult) -> Iterator[LoadedImage]:
    """The images still to explain, read and hashed lazily (on whichever thread iterates; it
    writes nothing to the catalog). Skips what exists (resume) and repeated content; a part
    found on disk that the catalog lacks (an interrupted call wrote it) comes through with
    ``recovered`` set, for the driver to record."""
    seen: set[str] = set()
    for ref in refs:
        with lock if ref.catalog_name is not None else contextlib.nullcontext():
            img = load_ref(ref, source)
        if img.sha256 is not None:
            if img.sha256 in seen:
                result.skipped += 1
                continue
            seen.add(img.sha256)
            result.images[img.sha256] = ref.key
            if resume and part_exists(fs, folder, part_name(img.sha256)):
                if cat is not None and img.sha256 not in done_in_catalog:
                    img.recovered = True  # the driver records it (the only catalog writer)
                    yield img
                else:
                    result.skipped += 1
                continue
        yield img


class _Recorder:
    """The driver's side of each finished image: counts, the catalog row, the callback and
    the progress bar."""

    def __init__(self, cat, lock, result: DatasetResult, on_image, progress: bool, label: str):
        self.cat, self.lock, self.result, self.on_image = cat, lock, result, on_image
        self.progress, self.label, self.bar = progress, label, None

    def __enter__(self):
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=f"{self.label}: images", unit="img", delay=2.0, leave=False)
        return self

    def recovered(self, img: LoadedImage) -> None:
        self(dict(image=img.ref.key, image_sha256=img.sha256, status="recovered",
                  part=part_name(img.sha256)))

    def __call__(self, rec: dict) -> None:
        r = self.result
        if rec["status"] == "done":
            r.done += 1
        elif rec["status"] == "recovered":
            r.skipped += 1
        else:
            r.failed += 1
            r.failures.append((rec["image"], rec.get("error") or ""))
        if self.cat is not None:
            with self.lock:
                self.cat.record_dataset_runs(r.dataset_id, r.job, [rec])
        if self.bar is not None:
            self.bar.update(1)
        if self.on_image is not None:
            self.on_image(rec)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_local(m: Model, job: Job, todo: Iterator[LoadedImage], record) -> None:
    """One image after another in this process; a thread reads and decodes the next
    ``PREFETCH`` images meanwhile (numpy / Pillow release the GIL while decoding)."""
    worker = DatasetWorker(m, job)
    for img, px in _prefetched(todo, m.spec):
        if img.recovered:
            record.recovered(img)
        else:
            record(worker.explain(img, px))


def _prefetched(todo: Iterator[LoadedImage], spec) -> Iterator[tuple[LoadedImage, object]]:
    q: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for img in todo:
                px = None
                if img.error is None and not img.recovered:
                    try:
                        px = decode(img, spec)
                    except (KryptonError, OSError, ValueError) as e:
                        img.error = message(e)
                while not stop.is_set():
                    try:
                        q.put((img, px), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)
            return
        q.put(end)

    t = threading.Thread(target=produce, name="krypton-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)
