"""Value checks shared by every input path (the option table of :mod:`krypton_db.options`,
model preprocessing in :func:`krypton_db.model.load_model`, the language's binder): Python
values made plain, values shown as the language writes them, numbers, unknown names with a
"did you mean", and the preprocessing dict. No dependency above the core data model.

Invariant: a check raises :class:`OptionValueError` (an ``InputError``) naming the option, the
value and what is allowed; it never lets a numpy or Python-internal exception through.
"""

from __future__ import annotations

import difflib
import math
import os

import numpy as np

from .errors import InputError


class OptionValueError(InputError):
    """An option's value is invalid; ``option`` names it (the language puts the caret there)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def plain(v):
    """A Python API value in the language's terms: numpy scalars -> int / float / bool,
    arrays and lists -> tuples (nested), paths -> str. Anything else is returned as is (and
    the option's check refuses what it does not take)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return plain(v.tolist())
    if isinstance(v, (list, tuple)):
        return tuple(plain(x) for x in v)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


def show(v) -> str:
    """A value as the language writes it (strings quoted, tuples in parentheses)."""
    if isinstance(v, str) and type(v) is not str:  # the language's bare words
        return str(v)
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, tuple):
        return "(" + ", ".join(show(x) for x in v) + ")"
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, (int, float, dict)):
        return repr(v)
    return f"a {type(v).__name__}"


def check_number(v, what: str) -> float:
    """A finite int or float (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OptionValueError(f"{what} must be a number, got {show(v)}")
    if not math.isfinite(v):
        raise OptionValueError(f"{what} must be finite, got {v!r}")
    return v


def unknown_option(name: str, allowed, kind: str = "option") -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; {kind}s: {', '.join(sorted(allowed))}"



# -- model preprocessing ---------------------------------------------------------------------------

PREPROCESS_KEYS = ("mean", "scale", "std", "window")
_FIXED_BY_MODEL = ("channels", "layout", "size")  # read from the ONNX input, not settable


def check_preprocess(pre, channels: int, fixed: dict | None = None) -> dict:
    """A user's preprocessing (``load_model(preprocess=...)``, ``CREATE MODEL ... WITH``):
    ``mean`` / ``std`` one number or one per channel (finite; std > 0), ``scale`` a finite
    number > 0. Returns ``{key: value}`` with per-channel lists of ``channels`` floats.
    ``fixed`` holds the model's size / layout / channels: a dict that repeats them (a stored
    spec) is accepted, one that changes them is refused. OptionValueError names the key."""
    if pre is None:
        return {}
    if not isinstance(pre, dict):
        raise OptionValueError(f"preprocess must be a dict with keys {', '.join(PREPROCESS_KEYS)}, "
                               f"got {type(pre).__name__}", "preprocess")
    out = {}
    for key, value in pre.items():
        try:
            _check_preprocess_key(out, key, value, channels, fixed)
        except OptionValueError as exc:
            exc.option = key
            raise
    return out


def _check_preprocess_key(out: dict, key, value, channels: int, fixed: dict | None) -> None:
    """Checks one key of a preprocessing dict; writes its normalized value into ``out``."""
    if key in _FIXED_BY_MODEL:
        if fixed is not None and plain(value) != plain(fixed.get(key)):
            raise OptionValueError(f"preprocess {key} is fixed by the model's ONNX input "
                                   f"({fixed.get(key)!r}), got {value!r}", key)
        return
    if key not in PREPROCESS_KEYS:
        raise OptionValueError(unknown_option(str(key), PREPROCESS_KEYS, "preprocess key"), key)
    v = plain(value)
    if key == "window":
        if not isinstance(v, bool):
            raise OptionValueError(f"preprocess window (apply a DICOM file's window centre / "
                                   f"width) must be true or false, got {show(v)}", key)
        out[key] = v
        return
    if key == "scale":
        x = check_number(v, "preprocess scale")
        if x <= 0:
            raise OptionValueError(f"preprocess scale must be > 0, got {v!r}", key)
        out[key] = float(x)
        return
    vals = v if isinstance(v, tuple) else (v,)
    if len(vals) not in (1, channels):
        raise OptionValueError(f"preprocess {key} needs 1 or {channels} values for this "
                               f"{channels}-channel model, got {len(vals)}", key)
    nums = [float(check_number(x, f"preprocess {key}")) for x in vals]
    if key == "std" and any(x <= 0 for x in nums):
        raise OptionValueError(f"preprocess std values must be > 0, got {show(v)}", key)
    out[key] = nums * channels if len(nums) == 1 else nums
