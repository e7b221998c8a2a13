"""Binder, part one: option names, types and ranges (no catalog access here).

``OPTIONS`` is the single table of every option of an ``occlusion(...)`` call and of ``SET``:
its type check, default, scope and a one-line doc (``SHOW OPTIONS`` prints it). ``bind_call``
merges a call's arguments over the session's ``SET`` values and validates each, raising a
``DslBindError`` with a caret at the offending argument. Names that need the catalog (model,
image, class labels, layer names) are resolved by ``krypton_db.query``, which calls back into
``BoundQuery.error`` to report them at the right position.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ...planner.batching import DEFAULT_MEMORY_BUDGET, NAIVE_DEFAULT_BUDGET
from .ast import Arg, OcclusionCall, Word
from .errors import DslBindError


class OptionValueError(ValueError):
    """Raised by a checker; the binder adds the position."""


def _num(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OptionValueError(f"{what} must be a number, got {_show(v)}")
    if not math.isfinite(v):
        raise OptionValueError(f"{what} must be finite, got {v!r}")
    return v


def _show(v) -> str:
    if isinstance(v, Word):
        return str(v)
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, tuple):
        return "(" + ", ".join(_show(x) for x in v) + ")"
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    return repr(v)


def _pos_int(v, what: str, hi: int = 1 << 20) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise OptionValueError(f"{what} must be a positive integer, got {_show(v)}")
    if not 1 <= v <= hi:
        raise OptionValueError(f"{what} must lie in [1, {hi}], got {v}")
    return v


def _pair(what: str):
    def check(v):
        if isinstance(v, tuple):
            if len(v) != 2:
                raise OptionValueError(f"{what} must be an integer or an (h, w) pair, "
                                       f"got {_show(v)}")
            return (_pos_int(v[0], what, 1 << 16), _pos_int(v[1], what, 1 << 16))
        n = _pos_int(v, what, 1 << 16)
        return (n, n)
    return check


def _enum(what: str, allowed: tuple[str, ...]):
    def check(v):
        if not isinstance(v, str) or v.lower() not in allowed:
            raise OptionValueError(f"{what} must be one of {', '.join(allowed)}; got {_show(v)}")
        return v.lower()
    return check


def _unit(what: str, lo_open: float = 0.0, hi: float = 1.0):
    def check(v):
        if v is None:
            return None
        x = float(_num(v, what))
        if not lo_open < x <= hi:
            raise OptionValueError(f"{what} must lie in ({lo_open:g}, {hi:g}], got {v!r}")
        return x
    return check


def _color(v):
    vals = v if isinstance(v, tuple) else (v,)
    if not 1 <= len(vals) <= 4:
        raise OptionValueError(f"color must be a number or one number per channel, got {_show(v)}")
    out = []
    for x in vals:
        x = float(_num(x, "color"))
        if not 0.0 <= x <= 1.0:
            raise OptionValueError(f"color values must lie in [0, 1] (pixel scale, black = 0), "
                                   f"got {_show(v)}")
        out.append(x)
    return out[0] if not isinstance(v, tuple) else tuple(out)


def _bool(what: str):
    def check(v):
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("on", "off", "true", "false"):
            return v.lower() in ("on", "true")
        raise OptionValueError(f"{what} must be TRUE or FALSE, got {_show(v)}")
    return check


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30}


def _bytes(v):
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", v, re.IGNORECASE)
        if not m:
            raise OptionValueError(f"memory_budget must be bytes or a size like '512MB', '2GiB'; "
                                   f"got {_show(v)}")
        v = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    x = _num(v, "memory_budget")
    if not 1 <= x <= 1 << 44:
        raise OptionValueError(f"memory_budget must lie in [1 byte, 16 TiB], got {v!r}")
    return int(x)


def _text(what: str):
    def check(v):
        if not isinstance(v, str) or not v or len(v) > 256:
            raise OptionValueError(f"{what} must be a non-empty name (at most 256 characters), "
                                   f"got {_show(v)}")
        return str(v)
    return check


def _target(v):
    if isinstance(v, Word) and v.upper() == "ALL":
        return Word("ALL")
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise OptionValueError(f"target must be a class index, a 'label' or ALL, got {_show(v)}")
    if isinstance(v, int) and v < 0:
        raise OptionValueError(f"target class index must be >= 0, got {v}")
    return v if isinstance(v, int) else str(v)


def _region(v):
    if not isinstance(v, tuple) or len(v) != 4 or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise OptionValueError(f"region must be (y0, x0, y1, x1) of non-negative integers, "
                               f"got {_show(v)}")
    if not (v[0] < v[2] and v[1] < v[3]):
        raise OptionValueError(f"region (y0, x0, y1, x1) needs y0 < y1 and x0 < x1, got {_show(v)}")
    return v


def _positions(v):
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
        v = (v,)
    if not isinstance(v, tuple) or not v or not all(
            isinstance(p, tuple) and len(p) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p) for p in v):
        raise OptionValueError(f"positions must be a list of (y, x) pairs of non-negative "
                               f"integers, e.g. ((0, 0), (8, 16)); got {_show(v)}")
    if len(v) > 1 << 20:
        raise OptionValueError("at most 1048576 positions")
    return tuple(tuple(p) for p in v)


def _drilldown(v):
    if v is None or isinstance(v, bool):
        return v or None
    if not isinstance(v, dict) or set(v) - {"r", "speedup"}:
        raise OptionValueError(f"drilldown must be TRUE, FALSE or {{r: 0.25, speedup: 3}}, "
                               f"got {v!r}")
    out = {}
    if "r" in v:
        out["r"] = _unit("drilldown r")(v["r"])
    if "speedup" in v:
        s = float(_num(v["speedup"], "drilldown speedup"))
        if s <= 1.0:
            raise OptionValueError(f"drilldown speedup must be > 1, got {v['speedup']!r}")
        out["speedup"] = s
    return out


def _rules(v):
    if v is None:
        return ()
    vals = v if isinstance(v, tuple) else tuple(p for p in re.split(r"[,\s]+", str(v)) if p)
    out = []
    for x in vals:
        if not isinstance(x, str) or not re.fullmatch(r"[A-Za-z_]+", x):
            raise OptionValueError(f"disable_rule takes layer-type names like 'conv', "
                                   f"got {_show(v)}")
        out.append(x.lower())
    return tuple(sorted(set(out)))


def _opt_text(what):
    t = _text(what)
    return lambda v: None if v is None or v == "" else t(v)


@dataclass(frozen=True)
class Option:
    check: Callable[[Any], Any]
    default: Any
    scope: str  # query | session | both
    doc: str


OPTIONS: dict[str, Option] = {
    "model": Option(_text("model"), None, "query", "registered model name (CREATE MODEL)"),
    "image": Option(_text("image"), None, "query", "registered image name (CREATE IMAGE)"),
    "patch": Option(_pair("patch"), (16, 16), "both", "occluding patch size: n or (h, w)"),
    "stride": Option(_pair("stride"), (4, 4), "both", "stride of the patch grid: n or (h, w)"),
    "color": Option(_color, 0.0, "both", "patch colour in [0, 1] pixel scale, or per channel"),
    "target": Option(_target, None, "query", "class index, 'label' or ALL (default predicted)"),
    "all_classes": Option(_bool("all_classes"), False, "query", "rows for every class"),
    "mode": Option(_enum("mode", ("exact", "naive", "approximate")), "exact", "both",
                   "exact (IVM) | naive (re-inference) | approximate (tau / target_ssim)"),
    "tau": Option(_unit("tau"), None, "both", "projective-field threshold in (0, 1]"),
    "target_ssim": Option(_unit("target_ssim"), None, "both",
                          "approximate: pick the tuned tau reaching this SSIM"),
    "domain": Option(_text("domain"), "default", "both", "image domain of the tuned tau"),
    "drilldown": Option(_drilldown, None, "both", "adaptive drill-down: TRUE or {r:, speedup:}"),
    "region": Option(_region, None, "query", "(y0, x0, y1, x1): grid positions inside it"),
    "positions": Option(_positions, None, "query", "explicit ((y, x), ...) patch positions"),
    "device": Option(_enum("device", ("cpu", "cuda", "gpu")), "cpu", "both", "executor device"),
    "batch_size": Option(lambda v: _pos_int(v, "batch_size", 1 << 16), None, "both",
                         "queries per batch (default: largest fitting memory_budget)"),
    "memory_budget": Option(_bytes, None, "both",
                            "buffer memory per batch: bytes or '128MiB' (default: "
                            f"{DEFAULT_MEMORY_BUDGET >> 20}MiB, naive {NAIVE_DEFAULT_BUDGET >> 20}MiB)"),
    "score": Option(_enum("score", ("prob", "logit")), "prob", "both",
                    "heat-map value: softmax probability or raw logit"),
    # research switches and session behaviour
    "disable_rule": Option(_rules, (), "session",
                           "layer types whose delta rule is off (full recompute), e.g. 'conv'"),
    "merge_policy": Option(_enum("merge_policy", ("bbox",)), "bbox", "session",
                           "how merges combine input patches (bbox: bounding box)"),
    "naive_from": Option(_opt_text("naive_from"), None, "session",
                         "layer name from which execution recomputes in full"),
    "explain_full_views": Option(_bool("explain_full_views"), False, "session",
                                 "EXPLAIN lists every layer view (default: first/last few)"),
    "explain_views": Option(lambda v: _pos_int(v, "explain_views", 1000), 3, "session",
                            "views shown at each end of an abbreviated logical plan"),
    "record_runs": Option(_bool("record_runs"), True, "session", "record runs in the catalog"),
    "progress": Option(_bool("progress"), False, "session", "progress bar on stderr"),
}
SESSION_OPTIONS = frozenset(k for k, o in OPTIONS.items() if o.scope in ("both", "session"))
QUERY_OPTIONS = tuple(k for k, o in OPTIONS.items() if o.scope in ("both", "query"))
# merge policies that exist as words but are not implemented: a clear error, not a typo hint
_KNOWN_UNIMPLEMENTED = {"merge_policy": ("union", "exact", "per_branch")}


def _unknown(name: str, allowed) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown option {name!r}{hint}; options: {', '.join(sorted(allowed))}"


def check_option(name: str, value, text: str | None = None, name_pos: int | None = None,
                 value_pos: int | None = None, scope: str = "session"):
    """Validate ``SET name = value`` (or one call argument); returns the normalized value."""
    allowed = SESSION_OPTIONS if scope == "session" else QUERY_OPTIONS
    if name not in allowed:
        if name in OPTIONS:
            where = "in occlusion(...)" if scope == "session" else "with SET"
            raise DslBindError(f"option {name!r} can only be given {where}", text, name_pos)
        raise DslBindError(_unknown(name, allowed), text, name_pos)
    if name == "merge_policy" and isinstance(value, str) and \
            value.lower() in _KNOWN_UNIMPLEMENTED["merge_policy"]:
        raise DslBindError(f"merge_policy {value.lower()!r} is not implemented; available: bbox "
                           "(the bounding box of the input patches)", text, value_pos)
    try:
        return OPTIONS[name].check(value)
    except OptionValueError as exc:
        raise DslBindError(str(exc), text, value_pos if value_pos is not None else name_pos) \
            from None


@dataclass
class BoundQuery:
    """One ``occlusion(...)`` call with every option resolved (call > SET > default)."""

    model: str
    image: str
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
    batch_size: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    score: str = "prob"
    text: str = field(default="", repr=False)
    start: int = field(default=0, repr=False)
    arg_pos: dict = field(default_factory=dict, repr=False)

    def error(self, message: str, option: str | None = None) -> DslBindError:
        """An error positioned at ``option``'s argument (or the call)."""
        return DslBindError(message, self.text, self.arg_pos.get(option, self.start))

    def describe(self) -> str:
        """Canonical, deterministic text of the bound query (two spellings -> one text)."""
        parts = [f"model={_show(self.model)}", f"image={_show(self.image)}",
                 f"patch={self.patch[0]}x{self.patch[1]}",
                 f"stride={self.stride[0]}x{self.stride[1]}", f"color={_show(self.color)}",
                 f"target={'predicted' if self.target is None else _show(self.target)}",
                 f"mode={self.mode}"]
        if self.all_classes:
            parts.append("all_classes")
        for k in ("tau", "target_ssim"):
            if getattr(self, k) is not None:
                parts.append(f"{k}={getattr(self, k):g}")
        if self.mode == "approximate" and self.tau is None:
            parts.append(f"domain={_show(self.domain)}")
        if self.drilldown is not None:
            parts.append("drilldown=" + ",".join(f"{k}:{v:g}" for k, v in
                                                 sorted(self.drilldown.items())) or "default")
        if self.region is not None:
            parts.append("region=" + _show(self.region))
        if self.positions is not None:
            parts.append(f"positions={len(self.positions)} listed")
        if self.score != "prob":
            parts.append(f"score={self.score}")
        parts.append(f"device={self.device}")
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
    for name in ("model", "image"):
        if name not in vals:
            raise DslBindError(f"occlusion(...) needs {name} => '...'", text, call.start)
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
    if merged["region"] is not None and merged["positions"] is not None:
        raise DslBindError("give either region or positions, not both", text,
                           given["positions"].pos)
    if merged["mode"] != "approximate":
        for k in ("tau", "target_ssim"):
            if k in vals:
                raise DslBindError(f"{k} applies to mode => 'approximate' (mode is "
                                   f"{merged['mode']!r})", text, given[k].pos)
            merged[k] = None
    if merged["tau"] is not None and merged["target_ssim"] is not None:
        at = given.get("target_ssim") or given.get("tau")
        raise DslBindError("give either tau or target_ssim, not both", text,
                           at.pos if at else call.start)
    if merged["drilldown"] is not None and merged["positions"] is not None:
        raise DslBindError("drilldown runs on the stride grid; it cannot take positions", text,
                           given.get("positions", given.get("drilldown")).pos)
    return BoundQuery(**merged, text=text, start=call.start,
                      arg_pos={k: a.value_pos if a.value_pos >= 0 else a.pos
                               for k, a in given.items()})
