"""Exception types. Every message names what is wrong and what is allowed."""


class KryptonError(Exception):
    """Base class for krypton_db errors."""


class ModelError(KryptonError, ValueError):
    """A model file cannot be loaded (corrupt, unsupported op, dynamic shapes, ...)."""


class InputError(KryptonError, ValueError):
    """A user-supplied input (image, batch, option) is invalid."""


class SqlError(KryptonError, ValueError):
    """DuckDB refused the SQL a user wrote (syntax, unknown table or column, a constraint,
    a runtime error); the message is DuckDB's, on one line, with its category."""

    def __init__(self, exc: BaseException | str, message: str | None = None):
        self.duckdb_error = exc if isinstance(exc, BaseException) else None
        text = message if message is not None else " ".join(str(exc).split())
        super().__init__(text)
