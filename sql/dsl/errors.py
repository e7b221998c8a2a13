"""Errors of the explanation query language, positioned in the script text.

Every error names the line and column (1-based) of the offending token and renders the
source line with a caret under it, so a shell user sees where a statement went wrong.
"""

from __future__ import annotations

from ...errors import KryptonError


class DslError(KryptonError, ValueError):
    """A statement of the explanation language is malformed or names something invalid."""

    def __init__(self, message: str, text: str | None = None, pos: int | None = None):
        self.message = message
        self.line = self.column = None
        self.context = ""
        if text is not None and pos is not None:
            pos = max(0, min(pos, len(text)))
            self.line = text.count("\n", 0, pos) + 1
            start = text.rfind("\n", 0, pos) + 1
            end = text.find("\n", pos)
            src = text[start : end if end >= 0 else len(text)]
            self.column = pos - start + 1
            # tabs keep their width under the caret
            pad = "".join("\t" if ch == "\t" else " " for ch in src[: self.column - 1])
            self.context = f"  {src}\n  {pad}^"
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" at line {self.line}, column {self.column}" if self.line is not None else ""
        head = f"{self.message}{where}"
        return f"{head}\n{self.context}" if self.context else head


class DslSyntaxError(DslError):
    """The text does not parse."""


class DslBindError(DslError):
    """The text parses, but a name or option value is unknown or out of range."""
