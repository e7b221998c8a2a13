"""A user's session: SQL and the explanation query language over the catalog, with results
as rows or Arrow.

Invariant: ``Session.sql`` runs the caller's plain SQL text against the catalog connection
exactly as given; values belong in ``params`` (prepared-statement parameters, ``?`` or
``$1``), never spliced into the text. Text using the explanation language (CREATE MODEL /
IMAGE, SET of our options, ``occlusion(...)`` table functions, EXPLAIN of them; see
``krypton_db.sql.dsl``) is run by ``krypton_db.query.Engine``, statement by statement.
Statements other than SELECT run at once; a plain SELECT comes back as a lazy DuckDB relation
that runs when its rows are fetched (``fetchall`` / ``arrow``), and is always read out
completely, so no half-read result blocks the connection. A statement over ``occlusion(...)``
is run at once and its rows come back materialized (the heat map's Arrow registration is
dropped when the statement ends).
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
        self._engine = None

    @property
    def engine(self):
        """The statement engine (session options, loaded models); created on first use."""
        if self._engine is None:
            from .query import Engine

            self._engine = Engine(self)
        return self._engine

    @property
    def con(self):
        return self.catalog.con

    def sql(self, text: str, params: list | dict | None = None) -> Result:
        """Run SQL and/or explanation statements; ``params`` bind ``?`` / ``$name`` markers.
        A script of several statements returns the last one's result."""
        if not _uses_language(text):
            if params is None:
                return Result(self.con.sql(text))
            return Result(self.con.sql(text, params=params))
        return self.engine.run_script(text, params)

    def explain(self, text: str, verbose: bool = False, analyze: bool = False,
                format: str = "text") -> list[tuple[str, str]]:
        """EXPLAIN rows ``(plan_type, plan)`` of an occlusion query; ``text`` may start with
        its own ``EXPLAIN [VERBOSE | ANALYZE [ABLATION]] [FORMAT JSON]``."""
        t = text.strip().rstrip(";").strip()
        if not t[:7].upper() == "EXPLAIN":
            flags = (" VERBOSE" if verbose else "") + (" ANALYZE" if analyze else "")
            fmt = " FORMAT JSON" if format == "json" else ""
            t = f"EXPLAIN{flags}{fmt} {t}"
        return [tuple(r) for r in self.engine.run_script(t).fetchall()]

    def set(self, option: str, value) -> None:
        """``SET option = value`` from Python (validated like the statement)."""
        from .sql.dsl import check_option

        self.engine.options[option] = check_option(option, value)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _uses_language(text: str) -> bool:
    """Does ``text`` need the explanation-language engine (a statement of ours, an EXPLAIN, or
    an ``occlusion(`` call)? Plain SQL keeps going to DuckDB exactly as before."""
    low = text.lower()
    if not any(w in low for w in ("occlusion", "model", "image", "set", "show", "calibrate",
                                  "tune", "explain")):
        return False  # fast path: none of our keywords appear at all
    from .sql.dsl.binder import SESSION_OPTIONS
    from .sql.dsl.parser import is_ours
    from .sql.dsl.scanner import split

    try:
        chunks = split(text)
    except ValueError:
        return True  # let the engine report the unterminated quote with a caret
    routed = (["EXPLAIN"], ["SET"], ["RESET"])  # SET/RESET: clear errors for unknown names
    return any(is_ours(c, SESSION_OPTIONS) or c.words(1) in routed or any(
        t.kind == "word" and t.text.lower() == "occlusion" for t in c.tokens) for c in chunks)


def connect(path: str | os.PathLike | None = None, read_only: bool = False) -> Session:
    """Open (creating if needed) the catalog at ``path`` (default: see ``catalog.default_path``)."""
    return Session(path, read_only=read_only)
