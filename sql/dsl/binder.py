"""Binder, part one: option names, types and ranges (no catalog access here).

The options themselves (checks, defaults, scopes, docs) are one table shared with the Python
API, :data:`krypton_db.options.OPTIONS`. ``bind_call`` merges a call's arguments over the
session's ``SET`` values and validates each with that table, raising a ``DslBindError`` with a
caret at the offending argument. Names that need the catalog (model,
image, class labels, layer names) are resolved by ``krypton_db.query``, which calls back into
``BoundQuery.error`` to report them at the right position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...options import (OPTIONS, QUERY_OPTIONS, SESSION_OPTIONS, OptionValueError,
                        check_combination, show, unknown_option)
from ...planner.batching import DEFAULT_MEMORY_BUDGET
from .ast import Arg, OcclusionCall, Word
from .errors import DslBindError

__all__ = ["OPTIONS", "QUERY_OPTIONS", "SESSION_OPTIONS", "BoundQuery", "bind_call",
           "check_option"]


# merge policies that exist as words but are not implemented: a clear error, not a typo hint
_KNOWN_UNIMPLEMENTED = {"merge_policy": ("union", "exact", "per_branch")}


def check_option(name: str, value, text: str | None = None, name_pos: int | None = None,
                 value_pos: int | None = None, scope: str = "session"):
    """Validate ``SET name = value`` (or one call argument); returns the normalized value."""
    allowed = SESSION_OPTIONS if scope == "session" else QUERY_OPTIONS
    if name not in allowed:
        if name in OPTIONS:
            where = "in occlusion(...)" if scope == "session" else "with SET"
            raise DslBindError(f"option {name!r} can only be given {where}", text, name_pos)
        raise DslBindError(unknown_option(name, allowed), text, name_pos)
    if name == "merge_policy" and isinstance(value, str) and \
            value.lower() in _KNOWN_UNIMPLEMENTED["merge_policy"]:
        raise DslBindError(f"merge_policy {value.lower()!r} is not implemented; available: bbox "
                           "(the bounding box of the input patches)", text, value_pos)
    if name == "target" and isinstance(value, Word) and value.upper() == "ALL":
        return Word("ALL")
    try:
        return OPTIONS[name].check(value)
    except OptionValueError as exc:
        raise DslBindError(str(exc), text, value_pos if value_pos is not None else name_pos) \
            from None


@dataclass
class BoundQuery:
    """One ``occlusion(...)`` call with every option resolved (call > SET > default)."""

    model: str
    image: str | None
    patch: tuple[int, int]
    stride: tuple[int, int]
    color: float | tuple = 0.0
    target: int | str | None = None
    all_classes: bool = False
    mode: str = "exact"
    tau: float | None = None
    target_ssim: float | None = None
    domain: str = "default"
    drilldown: dict | None = None
    region: tuple | None = None
    positions: tuple | None = None
    device: str = "cpu"
    engine: str = "numba"
    batch_size: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    score: str = "prob"
    precision: str = "fast"
    regions: str = "position"
    images: str | None = None  # a dataset query (then image is None)
    out: str | None = None
    backend: str = "local"
    workers: int | None = None
    text: str = field(default="", repr=False)
    start: int = field(default=0, repr=False)
    arg_pos: dict = field(default_factory=dict, repr=False)

    def error(self, message: str, option: str | None = None) -> DslBindError:
        """An error positioned at ``option``'s argument (or the call)."""
        return DslBindError(message, self.text, self.arg_pos.get(option, self.start))

    def describe(self) -> str:
        """Canonical, deterministic text of the bound query (two spellings -> one text)."""
        source = (f"image={show(self.image)}" if self.images is None
                  else f"images={show(self.images)}")
        parts = [f"model={show(self.model)}", source,
                 f"patch={self.patch[0]}x{self.patch[1]}",
                 f"stride={self.stride[0]}x{self.stride[1]}", f"color={show(self.color)}",
                 f"target={'predicted' if self.target is None else show(self.target)}",
                 f"mode={self.mode}"]
        if self.all_classes:
            parts.append("all_classes")
        for k in ("tau", "target_ssim"):
            if getattr(self, k) is not None:
                parts.append(f"{k}={getattr(self, k):g}")
        if self.mode == "approximate" and self.tau is None:
            parts.append(f"domain={show(self.domain)}")
        if self.drilldown is not None:
            parts.append("drilldown=" + (",".join(f"{k}:{v:g}" if not isinstance(v, str)
                                                  else f"{k}:{v}"
                                                  for k, v in sorted(self.drilldown.items()))
                                         or "default"))
        if self.region is not None:
            parts.append("region=" + show(self.region))
        if self.positions is not None:
            parts.append(f"positions={len(self.positions)} listed")
        if self.score != "prob":
            parts.append(f"score={self.score}")
        if self.precision != "fast":
            parts.append(f"precision={self.precision}")
        if self.regions != "position":
            parts.append(f"regions={self.regions}")
        if self.images is not None and self.backend != "local":
            parts.append(f"backend={self.backend}" + (f"({self.workers} workers)"
                                                      if self.workers else ""))
        parts.append(f"device={self.device}")
        if self.engine != "numba":
            parts.append(f"engine={self.engine}")
        return "occlusion(" + ", ".join(parts) + ")"


def bind_call(call: OcclusionCall, text: str, session: dict | None = None) -> BoundQuery:
    """Validate a call's arguments and merge them over ``session`` (SET values)."""
    session = session or {}
    given: dict[str, Arg] = {}
    positional = ["model", "image"]
    for i, a in enumerate(call.args):
        if a.name is None:
            if given and any(g.name is not None for g in call.args[:i]):
                raise DslBindError("positional arguments must come before named ones", text, a.pos)
            if i >= len(positional):
                raise DslBindError("only model and image may be given by position; name the "
                                   "others (patch => 16)", text, a.pos)
            name = positional[i]
        else:
            name = a.name
        if name in given:
            raise DslBindError(f"option {name!r} given twice", text, a.pos)
        given[name] = Arg(name, a.value, a.pos, a.value_pos)
    vals: dict[str, Any] = {}
    for name, a in given.items():
        vals[name] = check_option(name, a.value, text, a.pos, a.value_pos, scope="query")
    if "model" not in vals:
        raise DslBindError("occlusion(...) needs model => '...'", text, call.start)
    if ("image" in vals) == ("images" in vals):
        at = given["images"].pos if "images" in given else call.start
        raise DslBindError("occlusion(...) needs image => '<registered name>' or images => "
                           "'<folder, glob or catalog:pattern>', not both" if "image" in vals
                           else "occlusion(...) needs image => '...' (or images => '...' for "
                           "many)", text, at)
    for name in ("out", "backend", "workers"):
        if name in vals and "images" not in vals:
            raise DslBindError(f"{name} => ... goes with images => ... (a dataset query)",
                               text, given[name].pos)
    merged = {}
    for name in QUERY_OPTIONS:
        if name in vals:
            merged[name] = vals[name]
        elif name in session:
            merged[name] = session[name]
        else:
            merged[name] = OPTIONS[name].default
    if isinstance(merged["target"], Word):  # target => ALL
        merged["target"] = None
        merged["all_classes"] = True
    try:
        check_combination(merged, set(vals))
    except OptionValueError as exc:
        at = given.get(exc.option)
        raise DslBindError(str(exc), text, at.pos if at else call.start) from None
    return BoundQuery(**merged, text=text, start=call.start,
                      arg_pos={k: a.value_pos if a.value_pos >= 0 else a.pos
                               for k, a in given.items()})
