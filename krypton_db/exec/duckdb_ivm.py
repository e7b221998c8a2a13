"""The DuckDB executor of exact occlusion: materialized view tables + delta queries, in SQL.

It runs :class:`~krypton_db.planner.delta_sql.DeltaSql` as written: the layer views of the
unoccluded image become tables once (``materialize``), then each batch of occlusion queries
loads its positions and runs every delta query in order. It is the relational reference of
the IVM rules (the numba executors must agree with it to 1e-5), not a fast path: DuckDB
joins and aggregates cell by cell, so use it on small nets or few positions.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

from .. import relation
from ..planner.delta_sql import PATCH_TABLE, POSITIONS_TABLE, QUERIES_TABLE, DeltaSql
from ..sqlviews import ident


class DuckDbIncrementalExecutor:
    """One in-memory DuckDB database per executor (``close()`` frees it)."""

    def __init__(self, delta_sql: DeltaSql, threads: int | None = None):
        self.dsql = delta_sql
        self.con = duckdb.connect(config={"threads": threads} if threads else {})
        self._materialized = False

    def materialize(self, x_chw: np.ndarray) -> np.ndarray:
        """Materialize every layer view of the unoccluded image as a table; returns the graph
        output for it, shape ``[1, ...]``."""
        views = self.dsql.views
        views.install(self.con, np.asarray(x_chw, np.float32)[None], materialize=True)
        self._materialized = True
        g = views.graph
        return relation.load(self.con, views.view_of[g.output], (1,) + tuple(g[g.output].shape))

    def run_batch(self, positions: np.ndarray, patch_colour: np.ndarray) -> np.ndarray:
        """Graph outputs ``[B, ...]`` of the occluded images: query ``i`` puts the patch with
        per-channel values ``patch_colour`` (``[C]``) at ``positions[i] = (y, x)``."""
        if not self._materialized:
            raise RuntimeError("materialize() the image's views before running deltas")
        pos = np.asarray(positions, np.int64).reshape(-1, 2)
        n = np.arange(pos.shape[0], dtype=np.int32)
        colour = np.asarray(patch_colour, np.float32).reshape(-1)
        relation.store_arrow(self.con, POSITIONS_TABLE, pa.table(
            {"n": n, "y": pos[:, 0].astype(np.int32), "x": pos[:, 1].astype(np.int32)}))
        relation.store_arrow(self.con, QUERIES_TABLE, pa.table({"n": n}))
        relation.store_arrow(self.con, PATCH_TABLE, pa.table(
            {"c": np.arange(colour.size, dtype=np.int32), "v": colour}))
        for stmt in self.dsql.statements():
            self.con.execute(stmt)
        g = self.dsql.graph
        return relation.load(self.con, self.dsql.output, (pos.shape[0],) + tuple(g[g.output].shape))

    def delta_cells(self, view: str) -> pa.Table:
        """The last batch's delta relation of layer view ``view`` (for tests and research)."""

        return self.con.sql(f"SELECT * FROM {ident(self.dsql.delta_of[view])}").to_arrow_table()

    def close(self) -> None:
        self.con.close()
