"""The catalog's file and its locking: the part of :mod:`krypton_db.catalog` that decides
when the DuckDB file is held.

Invariant: a session's state (temporary tables, DuckDB settings, registrations) lives in an
in-memory DuckDB connection; the catalog file is ATTACHed to it only inside ``connection()``
(one statement, one write) or while ``con`` pins it, and DETACHed after, so a long
computation or an idle session holds no lock. Another process's lock is waited for up to
``lock_timeout`` seconds (then ``CatalogBusyError`` naming the holder); the file's own
problems (a directory, not a DuckDB file, read-only) are each one ``CatalogError`` before
DuckDB sees the file.
"""

from __future__ import annotations

import re
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb

from .errors import KryptonError

DEFAULT_LOCK_TIMEOUT = 30.0  # seconds a statement waits for another process's write
ALIAS = "krypton_catalog"  # the attached file's database name


class CatalogError(KryptonError, ValueError):
    """The catalog file is missing, of another schema version, or a name is unknown/taken."""


class CatalogBusyError(CatalogError):
    """Another process (or session) held the catalog longer than the lock timeout."""


# One lock per catalog file in this process: DuckDB refuses to attach a file twice in one
# process, so two sessions of one process take turns like two processes do.
_PATH_LOCKS: dict[str, threading.RLock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _path_lock(path: str) -> threading.RLock:
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(path, threading.RLock())


def check_file(path: Path, read_only: bool) -> None:
    """The file's own problems, each one clear error before DuckDB sees it."""
    if path.is_dir():
        raise CatalogError(f"catalog path {str(path)!r} is a directory; give a file such as "
                           f"{str(path / 'catalog.duckdb')!r}")
    if not path.exists():
        if read_only:
            raise CatalogError(f"no catalog at {str(path)!r} to open read-only")
        if not path.parent.is_dir():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CatalogError(f"cannot create the folder of catalog {str(path)!r}: "
                                   f"{exc.strerror}") from None
        return
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CatalogError(f"cannot read catalog {str(path)!r}: {exc.strerror}") from None
    if head[8:12] != b"DUCK":
        raise CatalogError(f"{str(path)!r} is not a DuckDB database file, so not a krypton_db "
                           "catalog; give a new file name or an existing catalog")
    if not read_only and not (path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)):
        raise CatalogError(f"catalog file {str(path)!r} is read-only; open it with read_only=True "
                           "(krypton shell --read-only) or make it writable")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


class CatalogFile:
    """A catalog file behind an in-memory session connection (see the module docstring).

    ``connection()`` attaches the file for the duration of a ``with`` block (re-entrant);
    ``con`` attaches it until :meth:`release` or :meth:`close` (for direct SQL by the caller);
    ``transaction()`` is one (re-entrant) transaction; ``suspended()`` detaches it for a long
    computation inside a statement."""

    def __init__(self, path: str, read_only: bool = False, lock_timeout: float | None = None):
        self.path = path
        self.read_only = read_only
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT if lock_timeout is None else float(lock_timeout)
        self._memory = self.path == ":memory:"
        if self._memory and read_only:
            raise CatalogError("an in-memory catalog cannot be opened read-only")
        self._file = None if self._memory else Path(self.path).expanduser().resolve()
        if self._file is not None:
            check_file(self._file, read_only)
            self._lock = _path_lock(str(self._file))
        self._db = duckdb.connect(":memory:")  # session state; the file is attached per use
        self._depth = 0  # nesting of connection() blocks
        self._tx_depth = 0
        self._attached = False
        self._pinned = False

    # -- attaching the file --------------------------------------------------------------------
    def _attach(self) -> None:
        if self._memory or self._attached:
            return
        deadline = time.monotonic() + self.lock_timeout
        if not self._lock.acquire(timeout=self.lock_timeout):
            raise CatalogBusyError(f"catalog {self.path!r} is in use by another session of this "
                                   f"process for more than {self.lock_timeout:g} s")
        try:
            delay = 0.01
            while True:
                try:
                    self._db.execute(f"ATTACH ? AS {ALIAS}" + (" (READ_ONLY)" if self.read_only
                                                               else ""), [str(self._file)])
                    break
                except duckdb.IOException as exc:
                    held = re.search(r"Conflicting lock is held in (.*?) \(PID (\d+)\)", str(exc))
                    if "lock" not in str(exc).lower():
                        raise CatalogError(f"cannot open catalog {self.path!r}: "
                                           f"{_one_line(exc)}") from None
                    if time.monotonic() >= deadline:
                        who = f" (PID {held.group(2)}, {held.group(1)})" if held else ""
                        raise CatalogBusyError(
                            f"catalog {self.path!r} is locked by another process{who} for more "
                            f"than {self.lock_timeout:g} s; it holds the file only while it "
                            "writes, so retry, or raise lock_timeout") from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.25)
                except duckdb.Error as exc:
                    if "already attached" in str(exc):
                        raise CatalogBusyError(
                            f"catalog {self.path!r} is held open by another catalog object or "
                            "session in this thread (e.g. through .con); use that one or close "
                            "it first") from None
                    raise CatalogError(f"cannot open catalog {self.path!r}: {_one_line(exc)}") \
                        from None
            self._db.execute(f"USE {ALIAS}")
            self._attached = True
        except BaseException:
            self._lock.release()
            raise

    def _detach(self) -> None:
        if self._memory or not self._attached:
            return
        try:
            self._db.execute("USE memory")
            self._db.execute(f"DETACH {ALIAS}")
        finally:
            self._attached = False
            self._lock.release()

    @contextmanager
    def connection(self):
        """The DuckDB connection with the catalog file attached for the ``with`` block (the
        outermost block detaches it again unless ``con`` pinned it)."""
        if self._db is None:
            raise CatalogError(f"catalog {self.path!r} is closed")
        if self._depth == 0:
            self._attach()
        self._depth += 1
        try:
            yield self._db
        finally:
            self._depth -= 1
            if self._depth == 0 and not self._pinned and self._tx_depth == 0:
                self._detach()

    @contextmanager
    def suspended(self):
        """Detach the file for a long computation inside a ``connection()`` block (other
        processes may write meanwhile); re-attached afterwards. Session state stays."""
        if self._tx_depth:
            raise RuntimeError("cannot suspend the catalog inside a transaction")
        was = self._attached and not self._pinned
        if was:
            self._detach()
        try:
            yield
        finally:
            if was:
                self._attach()

    @property
    def db(self) -> duckdb.DuckDBPyConnection:
        """The session's in-memory connection; the file is reachable through it only inside
        ``connection()`` (or while ``con`` holds it)."""
        if self._db is None:
            raise CatalogError(f"catalog {self.path!r} is closed")
        return self._db

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection with the file attached until :meth:`release` / :meth:`close`."""
        if self._db is None:
            raise CatalogError(f"catalog {self.path!r} is closed")
        self._attach()
        self._pinned = True
        return self._db

    def release(self) -> None:
        """Undo ``con``: the file is detached when no block uses it."""
        self._pinned = False
        if self._depth == 0 and self._tx_depth == 0:
            self._detach()

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._db is None:
            return
        self._pinned = False
        try:
            self._detach()
        finally:
            self._db.close()
            self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self):
        """One transaction around the block (re-entrant: an inner block joins the outer one,
        which commits or rolls back everything)."""
        if self.read_only:
            raise CatalogError("catalog opened read-only")
        with self.connection() as con:
            outer = self._tx_depth == 0
            if outer:
                con.begin()
            self._tx_depth += 1
            try:
                yield con
            except BaseException:
                self._tx_depth -= 1
                if outer:
                    con.rollback()
                raise
            else:
                self._tx_depth -= 1
                if outer:
                    con.commit()

    transaction = _transaction
