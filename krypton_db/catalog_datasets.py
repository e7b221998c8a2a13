"""The catalog's record of explained datasets (tables ``datasets`` and ``dataset_runs``).

A dataset is (a Parquet location, the settings it was explained with); its heat maps live in
the Parquet files, the catalog keeps what ran: one ``dataset_runs`` row per image and call
('done' with the part file it wrote, 'failed' with the message, 'recovered' for a part found
on disk that an interrupted call wrote but never recorded). Rows are only ever appended.
Mixed into :class:`~krypton_db.catalog.Catalog` (its connection and transactions).
"""

from __future__ import annotations

import pyarrow as pa

RUN_STATUSES = ("done", "failed", "recovered")

# the columns of one dataset_runs row, in the order record_dataset_runs takes them
RUN_COLUMNS = ("image", "image_sha256", "status", "error", "part", "target_class", "cells",
               "seconds", "worker")

# Each dataset with its model, settings hash and images done / failed (an image's latest row
# decides: a failure retried successfully counts as done). SHOW DATASETS runs it too.
SUMMARY_SQL = """
    WITH last AS (
        SELECT dataset_id, image, arg_max(status, created_at) AS status
        FROM dataset_runs GROUP BY dataset_id, image)
    SELECT d.id, m.name AS model, m.version AS model_version, d.location,
           left(d.settings_sha256, 16) AS settings,
           count(*) FILTER (WHERE l.status IN ('done', 'recovered')) AS done,
           count(*) FILTER (WHERE l.status = 'failed') AS failed, d.registered_at
    FROM datasets d JOIN models m ON m.id = d.model_id
    LEFT JOIN last l ON l.dataset_id = d.id
    GROUP BY ALL ORDER BY d.id"""


class DatasetRecords:
    def register_dataset(self, location: str, model_id: int, settings_json: str,
                         settings_sha256: str) -> int:
        """The id of the dataset (location, settings), created on first use."""
        with self._transaction():
            row = self._one("SELECT id FROM datasets WHERE location = ? AND settings_sha256 = ?",
                            [location, settings_sha256])
            if row is not None:
                return int(row[0])
            return int(self._one(
                "INSERT INTO datasets (location, model_id, settings, settings_sha256) "
                "VALUES (?, ?, ?, ?) RETURNING id",
                [location, model_id, settings_json, settings_sha256])[0])

    def record_dataset_runs(self, dataset_id: int, job: str, rows: list[dict]) -> None:
        """Append one row per image (keys: ``RUN_COLUMNS``), all in one transaction."""
        if not rows:
            return
        bad = {r["status"] for r in rows} - set(RUN_STATUSES)
        if bad:
            raise ValueError(f"dataset run status {sorted(bad)} not in {RUN_STATUSES}")
        table = pa.table({
            "image": pa.array([r["image"] for r in rows], pa.string()),
            "image_sha256": pa.array([r.get("image_sha256") for r in rows], pa.string()),
            "status": pa.array([r["status"] for r in rows], pa.string()),
            "error": pa.array([r.get("error") for r in rows], pa.string()),
            "part": pa.array([r.get("part") for r in rows], pa.string()),
            "target_class": pa.array([r.get("target_class") for r in rows], pa.int32()),
            "cells": pa.array([r.get("cells") for r in rows], pa.int32()),
            "seconds": pa.array([r.get("seconds") for r in rows], pa.float32()),
            "worker": pa.array([r.get("worker") for r in rows], pa.string()),
        })
        with self._transaction():
            self._insert_arrow(f"dataset_runs (dataset_id, job, {', '.join(RUN_COLUMNS)})",
                               "?, ?, " + ", ".join(RUN_COLUMNS), table, [dataset_id, job])

    def dataset_images_done(self, dataset_id: int) -> set[str]:
        """Content hashes of the images with a recorded result ('done' or 'recovered')."""
        return {r[0] for r in self._all(
            "SELECT DISTINCT image_sha256 FROM dataset_runs WHERE dataset_id = ? "
            "AND status IN ('done', 'recovered')", [dataset_id])}

    def datasets(self) -> list[dict]:
        """Every registered dataset (``SUMMARY_SQL``) as dicts."""
        return [dict(id=r[0], model=r[1], model_version=r[2], location=r[3], settings=r[4],
                     images_done=r[5], images_failed=r[6], registered_at=r[7])
                for r in self._all(SUMMARY_SQL)]
