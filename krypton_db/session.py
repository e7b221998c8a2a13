"""A user's session: SQL and the explanation query language over the catalog, with results
as rows or Arrow.

Invariant: ``Session.sql`` runs the caller's plain SQL text against the catalog connection
exactly as given; values belong in ``params`` (prepared-statement parameters, ``?`` or
``$1``), never spliced into the text. Text using the explanation language (CREATE MODEL /
IMAGE, SET of our options, ``occlusion(...)`` table functions, EXPLAIN of them; see
``krypton_db.sql.dsl``) is run by ``krypton_db.query.Engine``, statement by statement.
Every statement runs at once and its rows come back materialized (Arrow), because the catalog
file is attached only while a statement runs (see :mod:`krypton_db.catalog`): between
statements the session holds no lock, so other processes can read and write the catalog.
Session state (temporary tables, DuckDB settings, our ``SET`` options) lives in the session's
in-memory connection and survives between statements.
"""

from __future__ import annotations

import os

import duckdb

from .catalog import Catalog
from .errors import InputError, SqlError
from .query import Engine
from .result import Result
from .sql.dsl import check_option
from .sql.dsl.binder import SESSION_OPTIONS
from .sql.dsl.parser import is_ours
from .sql.dsl.scanner import split


class Session:
    """SQL access to a catalog; use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike | None = None, read_only: bool = False,
                 **catalog_options):
        self.catalog = Catalog(path, read_only=read_only, **catalog_options)
        self._engine = None

    @property
    def engine(self):
        """The statement engine (session options, loaded models); created on first use."""
        if self._engine is None:
            self._engine = Engine(self)
        return self._engine

    @property
    def con(self):
        """The DuckDB connection with the catalog attached until ``release()`` (for direct
        use; while it is held, other processes wait for the catalog)."""
        return self.catalog.con

    def release(self) -> None:
        """Give the catalog file back after using ``con``."""
        self.catalog.release()

    def sql(self, text: str, params: list | dict | None = None) -> Result:
        """Run SQL and/or explanation statements; ``params`` bind ``?`` / ``$name`` markers.
        A script of several statements returns the last one's result."""
        if not isinstance(text, str):
            raise InputError(f"sql() takes the statement text as a str, got {type(text).__name__}")
        if not _uses_language(text):
            try:
                with self.catalog.connection() as con:
                    return Result(con.sql(text) if params is None else con.sql(text, params=params))
            except duckdb.Error as exc:
                raise SqlError(exc) from None
        return self.engine.run_script(text, params)

    def explain(self, text: str, verbose: bool = False, analyze: bool = False,
                format: str = "text") -> list[tuple[str, str]]:
        """EXPLAIN rows ``(plan_type, plan)`` of an occlusion query; ``text`` may start with
        its own ``EXPLAIN [VERBOSE | ANALYZE [ABLATION]] [FORMAT JSON | SQL]``; ``format``:
        ``"text"``, ``"json"`` or ``"sql"`` (the delta queries of the rewrite)."""
        t = text.strip().rstrip(";").strip()
        if not t[:7].upper() == "EXPLAIN":
            flags = (" VERBOSE" if verbose else "") + (" ANALYZE" if analyze else "")
            if format not in ("text", "json", "sql"):
                raise InputError(f"format must be 'text', 'json' or 'sql', got {format!r}")
            fmt = "" if format == "text" else f" FORMAT {format.upper()}"
            t = f"EXPLAIN{flags}{fmt} {t}"
        return [tuple(r) for r in self.engine.run_script(t).fetchall()]

    def set(self, option: str, value) -> None:
        """``SET option = value`` from Python (validated like the statement)."""

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

    try:
        chunks = split(text)
    except ValueError:
        return True  # let the engine report the unterminated quote with a caret
    routed = (["EXPLAIN"], ["SET"], ["RESET"])  # SET/RESET: clear errors for unknown names
    return any(is_ours(c, SESSION_OPTIONS) or c.words(1) in routed or any(
        t.kind == "word" and t.text.lower() == "occlusion" for t in c.tokens) for c in chunks)


def connect(path: str | os.PathLike | None = None, read_only: bool = False,
            **catalog_options) -> Session:
    """Open (creating if needed) the catalog at ``path`` (default: see ``catalog.default_path``);
    ``lock_timeout=`` (seconds) and ``allow_foreign=`` go to :class:`~krypton_db.catalog.Catalog`."""
    return Session(path, read_only=read_only, **catalog_options)
