"""The persistent catalog: models, images, occlusion runs and heatmaps in one DuckDB file.

Invariants:
- Every write is one transaction (BEGIN ... COMMIT, ROLLBACK on any exception), so a crash or
  error mid-write leaves no partial rows: a run row exists iff all its heatmap rows do.
- History is never rewritten. Models and images are content-addressed: a model version is
  the hash of its ONNX file, preprocessing and labels, an image version the hash of its
  pixels. Registering the same content under a name reuses that row; other content under a
  used name becomes the next version of the name (``CREATE OR REPLACE`` too); a run refers to
  the exact versions it used, so old runs keep theirs. Plain lookups by name see the latest.
- The file is held only while a statement reads or writes it: the catalog lives in an
  in-memory DuckDB connection (session state: temporary tables, settings, registrations) that
  ATTACHes the file for one statement or one write and DETACHes it after. Long computations
  hold no lock, so several processes can explain into one catalog, and a reader waits at most
  for one write (:mod:`krypton_db.catalog_file`: attaching, locks, the file's own
  problems). A DuckDB database that is not a krypton catalog is refused unless asked.
- User-facing strings (model, image names, labels, paths, JSON settings) only ever reach
  DuckDB as prepared-statement parameters, never inside SQL text.
- Plain tables and plain types only (INTEGER, BIGINT, FLOAT, VARCHAR, VARCHAR[], INTEGER[],
  BLOB, TIMESTAMP; JSON kept as VARCHAR text), so the DuckDB CLI reads the file as is.
  Referential integrity is kept by this API rather than FOREIGN KEY clauses.
- ``meta.schema_version`` names the layout (:mod:`krypton_db.catalog_schema`); older layouts
  are migrated in one transaction when opened read-write, newer ones refused.

Location: ``Catalog(path)``; ``path=None`` uses ``$KRYPTON_DB`` if set, else the platform data
directory (``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux, ``~/Library/Application Support``
on macOS, ``%LOCALAPPDATA%`` on Windows) + ``krypton_db/catalog.duckdb``; ``":memory:"`` works.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .catalog_datasets import DatasetRecords
from .catalog_file import ALIAS, DEFAULT_LOCK_TIMEOUT, CatalogBusyError, CatalogError, CatalogFile
from .catalog_schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION, TABLES
from .errors import InputError, KryptonError
from .images import deep_pixels, to_pil
from .model import load_model

__all__ = ["ALIAS", "DEFAULT_LOCK_TIMEOUT", "MIGRATIONS", "SCHEMA", "SCHEMA_VERSION", "TABLES",
           "Catalog", "CatalogBusyError", "CatalogError", "ModelRecord", "default_path",
           "image_digest",
           "model_digest", "to_json"]

def default_path() -> str:
    """``$KRYPTON_DB`` if set, else ``<platform data dir>/krypton_db/catalog.duckdb``."""
    env = os.environ.get("KRYPTON_DB")
    if env:
        return env
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return str(base / "krypton_db" / "catalog.duckdb")


def to_json(obj) -> str:
    """JSON text of settings/params: numpy scalars and tuples made plain, non-finite floats as
    the strings "inf", "-inf", "nan" (strict JSON has no such numbers)."""
    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, np.ndarray):
            return clean(v.tolist())
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            f = float(v)
            return f if math.isfinite(f) else str(f)
        if v is None or isinstance(v, str):
            return v
        return str(v)

    return json.dumps(clean(obj), sort_keys=True, allow_nan=False)


def model_digest(model) -> str:
    """The content address of a model: sha256 of its files (the ONNX file and its external
    data), preprocessing and labels."""
    meta = to_json({"preprocessing": model.spec.to_dict(), "labels": list(model.labels)})
    return hashlib.sha256(f"{model.content_digest}:{meta}".encode()).hexdigest()


def image_digest(px: np.ndarray) -> str:
    """The content address of stored pixels (shape and bytes)."""
    h, w = px.shape[:2]
    c = 1 if px.ndim == 2 else px.shape[2]
    return hashlib.sha256(f"{h}x{w}x{c}:".encode() + np.ascontiguousarray(px).tobytes()).hexdigest()


@dataclass(frozen=True)
class ModelRecord:
    """A registered model version as the catalog stores it (see ``Catalog.model_record``)."""
    name: str
    version: int
    source: str
    preprocessing: dict
    labels: list
    sha256: str

    def load(self):
        """The model from its source file; refused when the file changed since registration."""
        try:
            m = load_model(self.source, preprocess=self.preprocessing, labels=self.labels,
                           name=self.name)
        except KryptonError as exc:
            raise CatalogError(f"model {self.name!r} version {self.version}: cannot load its "
                               f"file {self.source!r} ({exc}); if the file changed since it was "
                               "registered, register it again with CREATE OR REPLACE MODEL") \
                from None
        if self.sha256 != "unknown" and model_digest(m) != self.sha256:
            raise CatalogError(f"model {self.name!r} version {self.version}: its file "
                               f"{self.source!r} changed since it was registered; register "
                               "the new file with CREATE OR REPLACE MODEL")
        return m


class Catalog(DatasetRecords, CatalogFile):
    """A handle on one catalog database (see the module docstring for the invariants).

    The file and its locking come from :class:`~krypton_db.catalog_file.CatalogFile`
    (``connection()``, ``con``, ``transaction()``, ``suspended()``, ``close()``).
    ``allow_foreign=True`` adds krypton's tables to a DuckDB database that is not a catalog
    yet (refused by default)."""

    def __init__(self, path: str | os.PathLike | None = None, read_only: bool = False,
                 lock_timeout: float | None = None, allow_foreign: bool = False):
        super().__init__(str(path) if path is not None else default_path(), read_only,
                         lock_timeout)
        try:
            with self.connection():
                self._check_schema(allow_foreign)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------
    def _check_schema(self, allow_foreign: bool) -> None:
        con = self._db
        if not self._has_table("meta"):
            others = [r[0] for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                "ORDER BY 1").fetchall()]
            if others and not allow_foreign:
                shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
                raise CatalogError(f"{self.path!r} is a DuckDB database but not a krypton_db "
                                   f"catalog (tables: {shown}); give another file, or "
                                   "allow_foreign=True to add krypton's tables to it")
            if self.read_only:
                raise CatalogError(f"{self.path!r} is not a krypton_db catalog (no meta table)")
            with self._transaction():
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
                con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            return
        row = con.sql("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        version = int(row[0][0]) if row and str(row[0][0]).isdigit() else None
        if version in MIGRATIONS and not self.read_only:
            with self._transaction():
                for v in range(version, SCHEMA_VERSION):
                    for stmt in MIGRATIONS[v].split(";"):
                        if stmt.strip():
                            con.execute(stmt)
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                            [str(SCHEMA_VERSION)])
            return
        if version in MIGRATIONS and self.read_only:
            raise CatalogError(f"catalog {self.path!r} has schema version {version}; open it "
                               f"read-write once to migrate it to version {SCHEMA_VERSION}")
        if version != SCHEMA_VERSION:
            raise CatalogError(f"catalog {self.path!r} has schema version {version}; this "
                               f"krypton_db reads version {SCHEMA_VERSION}")

    def _one(self, sql: str, params: list) -> tuple | None:
        with self.connection() as con:
            rows = con.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def _all(self, sql: str, params: list | None = None) -> list[tuple]:
        with self.connection() as con:
            return con.execute(sql, params or []).fetchall()

    def _insert_arrow(self, table: str, select_list: str, arrow: pa.Table, params: list) -> None:
        """INSERT INTO <table> SELECT <select_list> FROM <arrow> (our fixed SQL text)."""
        name = f"__krypton_rows_{id(arrow):x}"
        with self.connection() as con:
            con.register(name, arrow)
            try:
                con.execute(f'INSERT INTO {table} SELECT {select_list} FROM "{name}"', params)
            finally:
                con.unregister(name)

    def _version_for(self, table: str, name: str, digest: str, replace: bool,
                     what: str) -> tuple[int | None, int]:
        """(id of ``name``'s row with this content or None, the version a new row gets).
        Other content under a registered name needs ``replace`` (then it is the next version).
        ``table`` is ours ("models" / "images"), never user text."""
        same = self._one(f"SELECT id FROM {table} WHERE name = ? AND sha256 = ? "
                         "ORDER BY version DESC LIMIT 1", [name, digest])
        if same is not None:
            return int(same[0]), 0
        version = int(self._one(f"SELECT coalesce(max(version), 0) FROM {table} WHERE name = ?",
                                [name])[0]) + 1
        if version > 1 and not replace:
            raise CatalogError(f"{what} {name!r} is already registered with other content "
                               "(replace=True / CREATE OR REPLACE registers a new version)")
        return None, version

    def _version_id(self, table: str, name: str, version: int | None, what: str) -> int:
        """The id of ``name``'s latest (or given) version in ``table`` (ours, never user text)."""
        row = self._one(f"SELECT id FROM {table} WHERE name = ? AND (? IS NULL OR version = ?) "
                        "ORDER BY version DESC LIMIT 1", [name, version, version])
        if row is None:
            raise CatalogError(f"no {what} named {name!r}"
                               + (f" with version {version}" if version else "") + " in the catalog")
        return int(row[0])

    # -- models ------------------------------------------------------------------------------
    def register_model(self, model, name: str | None = None, replace: bool = False) -> int:
        """Store a :class:`~krypton_db.model.Model` version (its source path, preprocessing,
        labels and layer table); returns its id. The same content under ``name`` reuses the
        row; other content under a registered name needs ``replace=True`` and becomes the
        next version (older versions and their runs stay)."""
        name = name or model.name
        g = model.graph
        digest = model_digest(model)
        values = [digest, str(Path(model.source).expanduser().resolve()),
                  to_json(model.spec.to_dict()), list(g.input_shape), model.layout,
                  list(model.labels), g.num_classes, g.macs]
        with self._transaction():
            same, version = self._version_for("models", name, digest, replace, "model")
            if same is not None:
                return same
            model_id = self._one(
                "INSERT INTO models (name, version, sha256, source, preprocessing, input_shape, "
                "layout, labels, num_classes, macs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "RETURNING id", [name, version] + values)[0]
            layers = pa.table({
                "ordinal": pa.array(range(len(g.nodes)), pa.int32()),
                "node_name": [n.name for n in g.nodes],
                "op": [n.op.value for n in g.nodes],
                "inputs": pa.array([list(n.inputs) for n in g.nodes], pa.list_(pa.string())),
                "params": [to_json(n.params) for n in g.nodes],
                "output_shape": pa.array([list(n.shape) for n in g.nodes], pa.list_(pa.int32())),
                "macs": pa.array([n.macs for n in g.nodes], pa.int64()),
            })
            self._insert_arrow("model_layers", "?, ordinal, node_name, op, inputs, params, "
                               "output_shape, macs", layers, [model_id])
        return int(model_id)

    def model_id(self, name: str, version: int | None = None) -> int:
        """The id of model ``name``'s latest (or given) version."""
        return self._version_id("models", name, version, "model")

    def get_model(self, name: str, version: int | None = None):
        """The registered model (latest version, or ``version``), reloaded from its source
        with the stored preprocessing / labels; refused when its file changed since."""
        return self.model_record(name, version).load()

    def model_record(self, name: str, version: int | None = None) -> ModelRecord:
        """What the catalog holds to reload model ``name`` (latest version, or ``version``);
        ``.load()`` reads the file (no catalog access: a caller may load outside its lock)."""
        mid = self.model_id(name, version)
        source, pre, labels, digest, v = self._one(
            "SELECT source, preprocessing, labels, sha256, version FROM models WHERE id = ?", [mid])
        return ModelRecord(name, v, source, json.loads(pre), list(labels), digest)

    def models(self) -> list[str]:
        """Registered model names (each once, in registration order)."""
        return [r[0] for r in self._all("SELECT name FROM models GROUP BY name ORDER BY min(id)")]

    # -- images ------------------------------------------------------------------------------
    def register_image(self, image, name: str | None = None, replace: bool = False,
                       default_name: str | None = None) -> int:
        """Store an image (path / PIL image / array / DICOM file) as its pixels + sha256: 8-bit
        images as uint8, deeper ones as float32 in [0, 1] by the reading rule of
        :mod:`krypton_db.images` (DICOM: the stored range, no window). Returns the id of its
        version. The same pixels under ``name`` reuse the row; other pixels under a
        registered name need ``replace=True`` and become its next version. ``name=None``
        reuses any image with the same pixels, else registers them as ``default_name`` (or
        ``image-<hash>``)."""

        if name is not None and (not isinstance(name, str) or not name):
            raise InputError("image name must be a non-empty string")
        path = str(Path(image).expanduser().resolve()) if isinstance(image, (str, Path)) else None
        deep = deep_pixels(image)
        if deep is not None:
            px = np.ascontiguousarray(deep, np.float32)
        else:
            img = to_pil(image)
            if img.mode not in ("L", "RGB", "RGBA"):
                img = img.convert("L" if img.mode.startswith(("I", "F")) else "RGB")
            px = np.ascontiguousarray(np.asarray(img, np.uint8))
        h, w = px.shape[:2]
        c = 1 if px.ndim == 2 else px.shape[2]
        digest = image_digest(px)
        with self._transaction():
            if name is None:
                same = self._one("SELECT id FROM images WHERE sha256 = ? ORDER BY id LIMIT 1",
                                 [digest])
                if same is not None:
                    return int(same[0])
                name = default_name or "image-" + digest[:12]
            same, version = self._version_for("images", name, digest, replace, "image")
            if same is not None:
                return same
            return int(self._one(
                "INSERT INTO images (name, version, path, width, height, channels, sha256, pixels, "
                "dtype) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                [name, version, path, w, h, c, digest, px.tobytes(), px.dtype.name])[0])

    def image_id(self, name: str, version: int | None = None) -> int:
        """The id of image ``name``'s latest (or given) version."""
        return self._version_id("images", name, version, "image")

    def get_image(self, name: str, version: int | None = None) -> np.ndarray:
        """The stored pixels of the latest (or given) version, ``[H, W]`` or ``[H, W, C]``:
        uint8, or float32 in [0, 1] for images deeper than 8 bits."""
        h, w, c, blob, dtype = self._one(
            "SELECT height, width, channels, pixels, dtype FROM images WHERE id = ?",
            [self.image_id(name, version)])
        a = np.frombuffer(bytes(blob), np.dtype(dtype))
        return a.reshape((h, w) if c == 1 else (h, w, c)).copy()

    def images(self) -> list[str]:
        """Registered image names (each once, in registration order)."""
        return [r[0] for r in self._all("SELECT name FROM images GROUP BY name ORDER BY min(id)")]

    # -- runs and heatmaps ------------------------------------------------------------------
    def record_run(self, model: str | int, image: str | int, mode: str, settings: dict,
                   target, timings: dict, heatmap_2d: np.ndarray, positions=None,
                   all_probs: np.ndarray | None = None, status: str = "done") -> int:
        """Store one occlusion run and its heatmap atomically; returns the run id. ``model``
        and ``image`` are the ids of the versions used (or names: their latest versions).

        ``heatmap_2d[i, j]`` is the target probability with the patch at heatmap cell (i, j);
        ``positions = (ys, xs)`` gives the pixel row/column of each heatmap row/column
        (default: the cell indices), or an array [h, w, 2] the (y, x) of every cell (listed
        positions); ``all_probs[i, j, k]`` optionally keeps every class.
        """
        hm = np.asarray(heatmap_2d, np.float32)
        if hm.ndim != 2:
            raise InputError(f"heatmap must be 2-D, got shape {hm.shape}")
        hh, hw = hm.shape
        if isinstance(positions, np.ndarray) and positions.ndim == 3:
            cell_pos = np.asarray(positions)
            if cell_pos.shape != (hh, hw, 2):
                raise InputError(f"positions must be [{hh}, {hw}, 2] for a {hm.shape} heatmap")
            yy, xx = cell_pos[..., 0].astype(np.int32), cell_pos[..., 1].astype(np.int32)
        else:
            ys, xs = (np.arange(hh), np.arange(hw)) if positions is None else map(np.asarray,
                                                                                   positions)
            if ys.shape != (hh,) or xs.shape != (hw,):
                raise InputError(f"positions must be (ys[{hh}], xs[{hw}]) for a {hm.shape} "
                                 f"heatmap")
            yy, xx = np.meshgrid(ys.astype(np.int32), xs.astype(np.int32), indexing="ij")
        cells = pa.table({"y": yy.ravel(), "x": xx.ravel(), "prob": hm.ravel()})
        with self._transaction():
            model_id = self.model_id(model) if isinstance(model, str) else int(model)
            image_id = self.image_id(image) if isinstance(image, str) else int(image)
            m = self._one("SELECT id, labels FROM models WHERE id = ?", [model_id])
            if m is None:
                raise CatalogError(f"no model with id {model_id} in the catalog")
            im = self._one("SELECT id FROM images WHERE id = ?", [image_id])
            if im is None:
                raise CatalogError(f"no image with id {image_id} in the catalog")
            tgt = _class_index(target, list(m[1]))
            run_id = self._one(
                "INSERT INTO runs (model_id, image_id, mode, settings, target_class, timings, "
                "heatmap_h, heatmap_w, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                [m[0], im[0], mode, to_json(settings), tgt, to_json(timings), hh, hw, status])[0]
            self._write_heatmap(run_id, cells)
            if all_probs is not None:
                self._write_all_probs(run_id, np.asarray(all_probs, np.float32), yy, xx)
        return int(run_id)

    def _write_heatmap(self, run_id: int, cells: pa.Table) -> None:
        self._insert_arrow("heatmaps", "?, y, x, prob", cells, [run_id])

    def _write_all_probs(self, run_id: int, probs: np.ndarray, yy, xx) -> None:
        hh, hw = yy.shape
        if probs.ndim != 3 or probs.shape[:2] != (hh, hw):
            raise InputError(f"all_probs must be [{hh}, {hw}, classes], got {probs.shape}")
        k = probs.shape[2]
        t = pa.table({"y": np.repeat(yy.ravel(), k), "x": np.repeat(xx.ravel(), k),
                      "class": np.tile(np.arange(k, dtype=np.int32), hh * hw),
                      "prob": probs.reshape(-1)})
        self._insert_arrow("heatmap_probs", "?, y, x, class, prob", t, [run_id])

    def heatmap(self, run_id: int) -> np.ndarray:
        """The run's heatmap as a float32 2-D array (rows/columns in position order)."""
        return self._grid(run_id)[0]

    def heatmap_positions(self, run_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Pixel rows and columns of the heatmap cells."""
        return self._grid(run_id)[1:]

    def _grid(self, run_id: int):
        shape = self._one("SELECT heatmap_h, heatmap_w FROM runs WHERE id = ?", [int(run_id)])
        if shape is None:
            raise CatalogError(f"no run {run_id} in the catalog")
        with self.connection() as con:
            t = con.sql("SELECT y, x, prob FROM heatmaps WHERE run_id = ?",
                        params=[int(run_id)]).to_arrow_table()
        y, x = t.column("y").to_numpy(), t.column("x").to_numpy()
        ys, iy = np.unique(y, return_inverse=True)
        xs, ix = np.unique(x, return_inverse=True)
        if (ys.size, xs.size) != tuple(shape) or t.num_rows != shape[0] * shape[1]:
            raise CatalogError(f"run {run_id}: heatmap rows do not form a {shape} grid")
        out = np.full(tuple(shape), np.nan, np.float32)
        out[iy, ix] = t.column("prob").to_numpy()
        return out, ys, xs

    def run_info(self, run_id: int) -> dict:
        cols = ["id", "model", "image", "mode", "settings", "target_class", "timings", "status",
                "created_at", "model_version", "image_version", "model_id", "image_id"]
        row = self._one(
            "SELECT r.id, m.name, i.name, r.mode, r.settings, r.target_class, r.timings, r.status, "
            "r.created_at, m.version, i.version, m.id, i.id FROM runs r "
            "JOIN models m ON m.id = r.model_id "
            "JOIN images i ON i.id = r.image_id WHERE r.id = ?", [int(run_id)])
        if row is None:
            raise CatalogError(f"no run {run_id} in the catalog")
        d = dict(zip(cols, row))
        d["settings"], d["timings"] = json.loads(d["settings"]), json.loads(d["timings"])
        return d

    # -- tuned tau (approximate mode) -------------------------------------------------------
    def save_tuned_tau(self, model_name: str, domain: str, tau: float, target_ssim: float,
                       coeffs, details: dict | None = None) -> None:
        """Store (insert or replace) the tuned tau of ``(model_name, domain)`` in one
        transaction; ``coeffs`` are the SSIM(tau) polynomial coefficients (highest degree
        first, as ``np.polyfit``), ``details`` any JSON-able tuning summary."""
        for what, v in (("model_name", model_name), ("domain", domain)):
            if not isinstance(v, str) or not v:
                raise InputError(f"{what} must be a non-empty string, got {v!r}")
        if not (0.0 < float(tau) <= 1.0):
            raise InputError(f"tau must lie in (0, 1], got {tau!r}")
        values = [float(tau), float(target_ssim), to_json([float(c) for c in coeffs]),
                  to_json(details or {})]
        with self._transaction() as con:
            con.execute(
                "INSERT INTO tuned_tau (model_name, domain, tau, target_ssim, coeffs, details) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model_name, domain) DO UPDATE SET "
                "tau = excluded.tau, target_ssim = excluded.target_ssim, "
                "coeffs = excluded.coeffs, details = excluded.details, "
                "created_at = now()", [model_name, domain] + values)

    def tuned_tau(self, model_name: str, domain: str = "default") -> dict | None:
        """``{tau, target_ssim, coeffs, details, created_at}`` stored for ``(model_name,
        domain)``, or None. FLOAT columns are rounded back to 6 decimals (0.7 stays 0.7)."""
        if not self._has_table("tuned_tau"):
            return None
        row = self._one("SELECT tau, target_ssim, coeffs, details, created_at FROM tuned_tau "
                        "WHERE model_name = ? AND domain = ?", [model_name, domain])
        if row is None:
            return None
        return dict(tau=round(float(row[0]), 6), target_ssim=round(float(row[1]), 6),
                    coeffs=json.loads(row[2]), details=json.loads(row[3]), created_at=row[4])

    def tuned_taus(self) -> list[tuple[str, str, float]]:
        """All stored ``(model_name, domain, tau)``, sorted."""
        if not self._has_table("tuned_tau"):
            return []
        return [(m, d, round(float(t), 6)) for m, d, t in self._all(
            "SELECT model_name, domain, tau FROM tuned_tau ORDER BY model_name, domain")]

    def _has_table(self, name: str) -> bool:
        return bool(self._one("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' "
                              "AND database_name = current_database() AND table_name = ?",
                              [name])[0])


def _class_index(target, labels: list[str]) -> int | None:
    if target is None:
        return None
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if not 0 <= int(target) < len(labels):
            raise InputError(f"class index {target} out of range [0, {len(labels) - 1}]")
        return int(target)
    if isinstance(target, str) and target in labels:
        return labels.index(target)
    raise InputError(f"unknown target class {target!r}")
