"""A user's session: SQL over the catalog, with results as rows or Arrow.

Invariant: ``Session.sql`` runs the caller's SQL text against the catalog connection exactly as
given; values belong in ``params`` (prepared-statement parameters, ``?`` or ``$1``), never
spliced into the text. Statements other than SELECT run at once; a SELECT comes back as a
lazy DuckDB relation that runs when its rows are fetched (``fetchall`` / ``arrow``), and is
always read out completely, so no half-read result blocks the connection.
"""

from __future__ import annotations

import os

import pyarrow as pa

from .catalog import Catalog


class Result:
    """The outcome of one statement: rows, column names and an Arrow accessor."""

    def __init__(self, relation):
        self.relation = relation  # a DuckDB relation, or None for statements without rows

    @property
    def columns(self) -> list[str]:
        return list(self.relation.columns) if self.relation is not None else []

    def fetchall(self) -> list[tuple]:
        return self.relation.fetchall() if self.relation is not None else []

    def arrow(self) -> pa.Table:
        """All rows as a ``pyarrow.Table`` (empty table for statements without rows)."""
        return self.relation.to_arrow_table() if self.relation is not None else pa.table({})

    def __repr__(self) -> str:
        return f"Result(columns={self.columns})"


class Session:
    """SQL access to a catalog; use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike | None = None, read_only: bool = False):
        self.catalog = Catalog(path, read_only=read_only)

    @property
    def con(self):
        return self.catalog.con

    def sql(self, text: str, params: list | dict | None = None) -> Result:
        """Run SQL against the catalog; ``params`` bind ``?`` / ``$name`` markers."""
        if params is None:
            return Result(self.con.sql(text))
        return Result(self.con.sql(text, params=params))

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(path: str | os.PathLike | None = None, read_only: bool = False) -> Session:
    """Open (creating if needed) the catalog at ``path`` (default: see ``catalog.default_path``)."""
    return Session(path, read_only=read_only)
