"""The outcome of one statement of a session, materialized as Arrow (rows, columns, numpy and
pandas accessors)."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from .errors import InputError


class Result:
    """The outcome of one statement, materialized: rows, column names and an Arrow accessor.
    ``relation`` (a DuckDB relation or None) is read out at once."""

    def __init__(self, relation):
        self.table = relation.to_arrow_table() if relation is not None else None

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names) if self.table is not None else []

    def fetchall(self) -> list[tuple]:
        """The rows as tuples of Python values (DuckDB's conversions)."""
        if self.table is None:
            return []
        with duckdb.connect() as con:
            return con.from_arrow(self.table).fetchall()

    def arrow(self) -> pa.Table:
        """All rows as a ``pyarrow.Table`` (empty table for statements without rows)."""
        return self.table if self.table is not None else pa.table({})

    def numpy(self) -> dict:
        """The columns as numpy arrays, by name."""
        t = self.arrow()
        return {name: t.column(name).to_numpy(zero_copy_only=False) for name in t.column_names}

    def df(self):
        """The rows as a pandas DataFrame (pandas must be installed)."""
        try:
            import pandas  # noqa: F401 - pyarrow's to_pandas needs it
        except ImportError:
            raise InputError("Result.df() needs pandas: pip install pandas "
                             "(or use .arrow() / .numpy())") from None
        return self.arrow().to_pandas()

    def __repr__(self) -> str:
        return f"Result(columns={self.columns})"
