"""The persistent catalog: models, images, occlusion runs and heatmaps in one DuckDB file.

Invariants:
- Every write is one transaction (BEGIN ... COMMIT, ROLLBACK on any exception), so a crash or
  error mid-write leaves no partial rows: a run row exists iff all its heatmap rows do.
- User-facing strings (model, image names, labels, paths, JSON settings) only ever reach
  DuckDB as prepared-statement parameters, never inside SQL text.
- Plain tables and plain types only (INTEGER, BIGINT, FLOAT, VARCHAR, VARCHAR[], INTEGER[],
  BLOB, TIMESTAMP; JSON kept as VARCHAR text), so the DuckDB CLI reads the file as is.
  Referential integrity is kept by this API rather than FOREIGN KEY clauses, because DuckDB
  refuses to update any row referenced by a foreign key (``replace=True`` needs that).
- ``meta.schema_version`` names the layout; opening a file with another version fails loudly.

Location: ``Catalog(path)``; ``path=None`` uses ``$KRYPTON_DB`` if set, else the platform data
directory (``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux, ``~/Library/Application Support``
on macOS, ``%LOCALAPPDATA%`` on Windows) + ``krypton_db/catalog.duckdb``; ``":memory:"`` works.
DuckDB allows one read-write process *or* many read-only processes per file: open with
``read_only=True`` to share a catalog between readers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from .errors import InputError, KryptonError

SCHEMA_VERSION = 2
# Version 2 added the ``tuned_tau`` table (additive): a version-1 file opened read-write is
# migrated in place (table created, version bumped, one transaction); opened read-only it is
# read as is and simply has no tuned tau values.
MIGRATIONS = {
    1: """
CREATE TABLE IF NOT EXISTS tuned_tau (
    model_name VARCHAR NOT NULL,
    domain VARCHAR NOT NULL,
    tau FLOAT NOT NULL,
    target_ssim FLOAT NOT NULL,
    coeffs VARCHAR NOT NULL,
    details VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    UNIQUE (model_name, domain)
);
""",
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE SEQUENCE IF NOT EXISTS models_id_seq START 1;
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY DEFAULT nextval('models_id_seq'),
    name VARCHAR NOT NULL UNIQUE,
    source VARCHAR NOT NULL,
    preprocessing VARCHAR NOT NULL,
    input_shape INTEGER[] NOT NULL,
    layout VARCHAR NOT NULL,
    labels VARCHAR[] NOT NULL,
    num_classes INTEGER NOT NULL,
    macs BIGINT NOT NULL,
    registered_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS model_layers (
    model_id INTEGER NOT NULL,
    ordinal INTEGER NOT NULL,
    node_name VARCHAR NOT NULL,
    op VARCHAR NOT NULL,
    inputs VARCHAR[] NOT NULL,
    params VARCHAR NOT NULL,
    output_shape INTEGER[] NOT NULL,
    macs BIGINT NOT NULL,
    PRIMARY KEY (model_id, ordinal)
);
CREATE SEQUENCE IF NOT EXISTS images_id_seq START 1;
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY DEFAULT nextval('images_id_seq'),
    name VARCHAR NOT NULL UNIQUE,
    path VARCHAR,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    channels INTEGER NOT NULL,
    sha256 VARCHAR NOT NULL,
    pixels BLOB NOT NULL,
    registered_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
CREATE SEQUENCE IF NOT EXISTS runs_id_seq START 1;
CREATE TABLE IF NOT EXISTS runs (
    id BIGINT PRIMARY KEY DEFAULT nextval('runs_id_seq'),
    model_id INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    mode VARCHAR NOT NULL,
    settings VARCHAR NOT NULL,
    target_class INTEGER,
    timings VARCHAR NOT NULL,
    heatmap_h INTEGER NOT NULL,
    heatmap_w INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    status VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS heatmaps (
    run_id BIGINT NOT NULL, y INTEGER NOT NULL, x INTEGER NOT NULL, prob FLOAT NOT NULL
);
CREATE TABLE IF NOT EXISTS heatmap_probs (
    run_id BIGINT NOT NULL, y INTEGER NOT NULL, x INTEGER NOT NULL, class INTEGER NOT NULL,
    prob FLOAT NOT NULL
);
""" + MIGRATIONS[1]

TABLES = ("meta", "models", "model_layers", "images", "runs", "heatmaps", "heatmap_probs",
          "tuned_tau")


class CatalogError(KryptonError, ValueError):
    """The catalog file is missing, of another schema version, or a name is unknown/taken."""


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


class Catalog:
    """A handle on one catalog database (see the module docstring for the invariants)."""

    def __init__(self, path: str | os.PathLike | None = None, read_only: bool = False):
        self.path = str(path) if path is not None else default_path()
        self.read_only = read_only
        memory = self.path == ":memory:"
        if not memory and not read_only:
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if read_only and (memory or not Path(self.path).expanduser().is_file()):
            raise CatalogError(f"no catalog at {self.path!r} to open read-only")
        target = self.path if memory else str(Path(self.path).expanduser())
        self.con = duckdb.connect(target, read_only=read_only)
        try:
            self._check_schema()
        except BaseException:
            self.con.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------
    def _check_schema(self) -> None:
        has_meta = self.con.sql(
            "SELECT count(*) FROM duckdb_tables() "
            "WHERE schema_name = 'main' AND table_name = 'meta'"
        ).fetchall()[0][0]
        if not has_meta:
            if self.read_only:
                raise CatalogError(f"{self.path!r} is not a krypton_db catalog (no meta table)")
            with self._transaction():
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.con.execute(stmt)
                self.con.execute("INSERT INTO meta VALUES ('schema_version', ?)",
                                 [str(SCHEMA_VERSION)])
            return
        row = self.con.sql("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        version = int(row[0][0]) if row else None
        if version in MIGRATIONS and not self.read_only:
            with self._transaction():
                for v in range(version, SCHEMA_VERSION):
                    for stmt in MIGRATIONS[v].split(";"):
                        if stmt.strip():
                            self.con.execute(stmt)
                self.con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                                 [str(SCHEMA_VERSION)])
            return
        if version in MIGRATIONS and self.read_only:
            return  # an older, compatible layout: readable as is
        if version != SCHEMA_VERSION:
            raise CatalogError(f"catalog {self.path!r} has schema version {version}; this "
                               f"krypton_db reads version {SCHEMA_VERSION}")

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    class _Tx:
        def __init__(self, con):
            self.con = con

        def __enter__(self):
            self.con.begin()

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                self.con.commit()
            else:
                self.con.rollback()
            return False

    def _transaction(self) -> "Catalog._Tx":
        if self.read_only:
            raise CatalogError("catalog opened read-only")
        return Catalog._Tx(self.con)

    def _one(self, sql: str, params: list) -> tuple | None:
        rows = self.con.execute(sql, params).fetchall()
        return rows[0] if rows else None

    def _insert_arrow(self, table: str, select_list: str, arrow: pa.Table, params: list) -> None:
        """INSERT INTO <table> SELECT <select_list> FROM <arrow> (our fixed SQL text)."""
        name = f"__krypton_rows_{id(arrow):x}"
        self.con.register(name, arrow)
        try:
            self.con.execute(f'INSERT INTO {table} SELECT {select_list} FROM "{name}"', params)
        finally:
            self.con.unregister(name)

    # -- models ------------------------------------------------------------------------------
    def register_model(self, model, name: str | None = None, replace: bool = False) -> int:
        """Store a :class:`~krypton_db.model.Model` (its source path, preprocessing, labels
        and layer table); returns the model id."""
        name = name or model.name
        g = model.graph
        values = [str(Path(model.source).expanduser().resolve()), to_json(model.spec.to_dict()),
                  list(g.input_shape), model.layout, list(model.labels), g.num_classes, g.macs]
        with self._transaction():
            row = self._one("SELECT id FROM models WHERE name = ?", [name])
            if row and not replace:
                raise CatalogError(f"model {name!r} is already registered "
                                   "(replace=True updates it)")
            if row:
                model_id = row[0]
                self.con.execute(
                    "UPDATE models SET source = ?, preprocessing = ?, input_shape = ?, layout = ?, "
                    "labels = ?, num_classes = ?, macs = ?, registered_at = current_timestamp "
                    "WHERE id = ?", values + [model_id])
                self.con.execute("DELETE FROM model_layers WHERE model_id = ?", [model_id])
            else:
                model_id = self._one(
                    "INSERT INTO models (name, source, preprocessing, input_shape, layout, labels, "
                    "num_classes, macs) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    [name] + values)[0]
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

    def get_model(self, name: str):
        """The registered model, reloaded from its source with the stored preprocessing/labels."""
        from .model import load_model

        row = self._one("SELECT source, preprocessing, labels FROM models WHERE name = ?", [name])
        if row is None:
            raise CatalogError(f"no model named {name!r} in the catalog")
        source, pre, labels = row
        return load_model(source, preprocess=json.loads(pre), labels=list(labels), name=name)

    def models(self) -> list[str]:
        return [r[0] for r in self.con.sql("SELECT name FROM models ORDER BY id").fetchall()]

    # -- images ------------------------------------------------------------------------------
    def register_image(self, image, name: str, replace: bool = False) -> int:
        """Store an image (path / PIL image / array) as raw 8-bit pixels + sha256; returns id."""
        from .images import to_pil

        if not isinstance(name, str) or not name:
            raise InputError("image name must be a non-empty string")
        path = str(Path(image).expanduser().resolve()) if isinstance(image, (str, Path)) else None
        img = to_pil(image)
        if img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("L" if img.mode.startswith(("I", "F")) else "RGB")
        px = np.ascontiguousarray(np.asarray(img, np.uint8))
        h, w = px.shape[:2]
        c = 1 if px.ndim == 2 else px.shape[2]
        blob = px.tobytes()
        digest = hashlib.sha256(f"{h}x{w}x{c}:".encode() + blob).hexdigest()
        values = [path, w, h, c, digest, blob]
        with self._transaction():
            row = self._one("SELECT id FROM images WHERE name = ?", [name])
            if row and not replace:
                raise CatalogError(f"image {name!r} is already registered "
                                   "(replace=True updates it)")
            if row:
                self.con.execute("UPDATE images SET path = ?, width = ?, height = ?, channels = ?, "
                                 "sha256 = ?, pixels = ?, registered_at = current_timestamp "
                                 "WHERE id = ?", values + [row[0]])
                return int(row[0])
            return int(self._one("INSERT INTO images (name, path, width, height, channels, sha256, "
                                 "pixels) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                                 [name] + values)[0])

    def get_image(self, name: str) -> np.ndarray:
        """The stored pixels, uint8 ``[H, W]`` or ``[H, W, C]``."""
        row = self._one("SELECT height, width, channels, pixels FROM images WHERE name = ?", [name])
        if row is None:
            raise CatalogError(f"no image named {name!r} in the catalog")
        h, w, c, blob = row
        a = np.frombuffer(bytes(blob), np.uint8)
        return a.reshape((h, w) if c == 1 else (h, w, c)).copy()

    def images(self) -> list[str]:
        return [r[0] for r in self.con.sql("SELECT name FROM images ORDER BY id").fetchall()]

    # -- runs and heatmaps ------------------------------------------------------------------
    def record_run(self, model_name: str, image_name: str, mode: str, settings: dict,
                   target, timings: dict, heatmap_2d: np.ndarray, positions=None,
                   all_probs: np.ndarray | None = None, status: str = "done") -> int:
        """Store one occlusion run and its heatmap atomically; returns the run id.

        ``heatmap_2d[i, j]`` is the target probability with the patch at heatmap cell (i, j);
        ``positions = (ys, xs)`` gives the pixel row/column of each heatmap row/column
        (default: the cell indices); ``all_probs[i, j, k]`` optionally keeps every class.
        """
        hm = np.asarray(heatmap_2d, np.float32)
        if hm.ndim != 2:
            raise InputError(f"heatmap must be 2-D, got shape {hm.shape}")
        hh, hw = hm.shape
        ys, xs = (np.arange(hh), np.arange(hw)) if positions is None else map(np.asarray, positions)
        if ys.shape != (hh,) or xs.shape != (hw,):
            raise InputError(f"positions must be (ys[{hh}], xs[{hw}]) for a {hm.shape} heatmap")
        yy, xx = np.meshgrid(ys.astype(np.int32), xs.astype(np.int32), indexing="ij")
        cells = pa.table({"y": yy.ravel(), "x": xx.ravel(), "prob": hm.ravel()})
        with self._transaction():
            m = self._one("SELECT id, labels FROM models WHERE name = ?", [model_name])
            if m is None:
                raise CatalogError(f"no model named {model_name!r} in the catalog")
            im = self._one("SELECT id FROM images WHERE name = ?", [image_name])
            if im is None:
                raise CatalogError(f"no image named {image_name!r} in the catalog")
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
        t = self.con.sql("SELECT y, x, prob FROM heatmaps WHERE run_id = ?",
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
                "created_at"]
        row = self._one(
            "SELECT r.id, m.name, i.name, r.mode, r.settings, r.target_class, r.timings, r.status, "
            "r.created_at FROM runs r JOIN models m ON m.id = r.model_id "
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
        with self._transaction():
            self.con.execute(
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
        return [(m, d, round(float(t), 6)) for m, d, t in self.con.sql(
            "SELECT model_name, domain, tau FROM tuned_tau ORDER BY model_name, domain").fetchall()]

    def _has_table(self, name: str) -> bool:
        return bool(self._one("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' "
                              "AND table_name = ?", [name])[0])


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
