"""SQL text we generate ourselves: identifiers we named and numeric literals, nothing else.

Invariant: the only strings spliced into SQL text are identifiers matching
``^[A-Za-z_][A-Za-z0-9_]*$`` (always double-quoted) and numbers formatted from Python numbers;
user-facing strings travel as prepared-statement parameters.
"""

from __future__ import annotations

import re

import numpy as np

from .errors import KryptonError

IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FLOAT_TEXT = re.compile(r"^-?(\d+(\.\d*)?(e[-+]?\d+)?|inf|nan)$")


class SqlIdentifierError(KryptonError, ValueError):
    """An identifier handed to the SQL renderer is not one we could have generated."""


def ident(name: str) -> str:
    """Validate one of our relation names and return it double-quoted.

    >>> ident("l007_conv")
    '"l007_conv"'
    """
    if not isinstance(name, str) or not IDENT_RE.fullmatch(name) or len(name) > 120:
        raise SqlIdentifierError(
            f"refusing SQL identifier {name!r}: relation names must match "
            f"^[A-Za-z_][A-Za-z0-9_]*$ (at most 120 characters); user-supplied names go through "
            f"query parameters, never into SQL text"
        )
    return f'"{name}"'


def literal(value) -> str:
    """A Python number as a SQL literal (integers as is, floats as exact DOUBLE casts).

    >>> literal(3), literal(-2), literal(0.5), literal(float("-inf"))
    ('3', '(-2)', "CAST('0.5' AS DOUBLE)", "CAST('-inf' AS DOUBLE)")
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                      np.floating)):
        raise SqlIdentifierError(f"SQL parameters must be int or float, got {type(value).__name__}")
    if isinstance(value, (int, np.integer)):
        v = int(value)
        return f"({v})" if v < 0 else str(v)  # parenthesised: '-' after '-' would open a comment
    text = repr(float(value))
    if not _FLOAT_TEXT.fullmatch(text):  # belt and braces: only digits, '.', 'e', sign, inf/nan
        raise SqlIdentifierError(f"unexpected float text {text!r}")
    # a string cast parses with correct rounding (a bare 0.1 would be a DECIMAL first)
    return f"CAST('{text}' AS DOUBLE)"
