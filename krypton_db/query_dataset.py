"""Dataset queries of the language: ``occlusion(model => 'm', images => 'scans/*.png', ...)``
runs :func:`krypton_db.explain_dataset` (results streamed to Parquet, one ``dataset_runs``
row per image in the session's catalog) and exposes the rows of this call's images as the
heat-map relation every ``occlusion(...)`` call has. A part of
:class:`krypton_db.query.Engine`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .dataset import explain_dataset
from .errors import KryptonError
from .query_resolve import Resolved

DEFAULT_OUT = "datasets"  # beside the catalog file


class DatasetStatements:
    def _default_out(self, bq) -> str:
        path = str(self.catalog.path)
        if path == ":memory:":
            raise bq.error("an in-memory catalog has no folder for the results: give out => "
                           "'<folder or URI>'", "images")
        return str(Path(path).expanduser().resolve().parent / DEFAULT_OUT)

    def _explain_images(self, r: Resolved, schema: pa.Schema) -> tuple[pa.Table, object]:
        """Run a dataset query; returns (its heat-map relation in ``schema``, the
        :class:`~krypton_db.dataset.DatasetResult`)."""
        bq = r.bq
        for name in ("disable_rule", "naive_from"):
            if self.options.get(name):
                raise bq.error(f"SET {name} applies to single-image queries (a research "
                               f"rewrite); RESET {name} for images => ...", "images")
        if bq.positions is not None or bq.engine != "numba":
            raise bq.error("images => ... explains each image over the grid on the numba "
                           "executors: positions and engine => 'duckdb' are for one image",
                           "images")
        out = bq.out or self._default_out(bq)
        try:
            res = explain_dataset(
                r.model, r.images, patch=bq.patch, stride=bq.stride, color=bq.color,
                target=bq.target, mode=bq.mode, region=bq.region, all_classes=bq.all_classes,
                tau=r.tau if bq.mode == "approximate" else None, drilldown=bq.drilldown,
                out=out, catalog=self.catalog, backend=bq.backend, workers=bq.workers,
                progress=bool(self.options.get("progress")), batch_size=bq.batch_size,
                memory_budget=bq.memory_budget, score=bq.score, precision=bq.precision,
                regions=bq.regions,
                device="gpu" if bq.device != "cpu" else "cpu")
        except KryptonError as exc:
            raise bq.error(str(exc), "images") from None
        return self._dataset_rows(r, res, schema), res

    def _dataset_rows(self, r: Resolved, res, schema: pa.Schema) -> pa.Table:
        """The rows of this call's images (earlier calls' parts in the folder excluded; an
        image resumed from an earlier part takes this call's name)."""
        shas = list(res.images)
        if not shas:
            return schema.empty_table()
        import pyarrow.compute as pc  # here: pyarrow.dataset loads pandas (~0.4 s of start-up)
        import pyarrow.dataset as pads

        t = res.dataset().to_table(filter=pads.field("image_sha256").isin(shas))
        idx = pc.index_in(t["image_sha256"], value_set=pa.array(shas))
        image = pa.array([res.images[s] for s in shas], pa.string()).take(idx)
        n = t.num_rows
        if "probs" in t.column_names:  # all classes: one row per (position, class)
            probs = t["probs"].combine_chunks()
            k = probs.type.list_size
            rows = np.repeat(np.arange(n), k)
            cls = np.tile(np.arange(k, dtype=np.int32), n)
            vals = probs.flatten()
            image, y, x = image.take(rows), t["y"].take(rows), t["x"].take(rows)
        else:
            cls = t["target"].to_numpy()
            vals, y, x = t["prob"], t["y"], t["x"]
        labels = np.asarray(r.model.labels, dtype=object)
        lab = labels[cls] if len(labels) else cls.astype(str)
        m = len(cls)
        return pa.table([pa.array([r.bq.model] * m, pa.string()), image,
                         pa.nulls(m, pa.int64()), y, x, pa.array(cls, pa.int32()),
                         pa.array(lab.tolist(), pa.string()), vals], schema=schema)
