"""The options of an occlusion query: one table of checks for the Python API and the language.

``OPTIONS`` holds, per option, its check (type, range, finiteness, units), default, scope and a
one-line doc (``SHOW OPTIONS`` prints it). ``occlude(...)`` (``krypton_db.api``) and an
``occlusion(...)`` call or ``SET`` (``krypton_db.sql.dsl.binder``) go through the same checks,
so the same bad value gets the same message from both; the binder only adds the caret.

Values arrive in two forms: the language's (int, float, str, tuple, dict, bool, None) and
Python's (numpy scalars and arrays, lists, paths). :func:`~krypton_db.checks.plain` turns the
second into the first before any check, so ``np.float32(0.5)`` or ``[(0, 0), (8, 8)]`` mean
what they say. The value checks themselves live in :mod:`krypton_db.checks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .checks import (
    PREPROCESS_KEYS,
    OptionValueError,
    check_number,
    check_preprocess,
    plain,
    show,
    unknown_option,
)
from .exec.view_cache import DEFAULT_BUDGET as VIEW_CACHE_BUDGET
from .planner.batching import DEFAULT_MEMORY_BUDGET, NAIVE_DEFAULT_BUDGET

__all__ = ["INPUT_OPTIONS", "OPTIONS", "PREPROCESS_KEYS", "QUERY_OPTIONS", "SESSION_OPTIONS",
           "Option", "OptionValueError", "check", "check_against_model", "check_combination",
           "check_preprocess", "parse_bytes", "plain", "show", "unknown_option"]


def _pos_int(v, what: str, hi: int = 1 << 20) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise OptionValueError(f"{what} must be a positive integer, got {show(v)}")
    if not 1 <= v <= hi:
        raise OptionValueError(f"{what} must lie in [1, {hi}], got {v}")
    return v


def _pair(what: str):
    def check(v):
        if isinstance(v, tuple):
            if len(v) != 2:
                raise OptionValueError(f"{what} must be an integer or an (h, w) pair, "
                                       f"got {show(v)}")
            return (_pos_int(v[0], what, 1 << 16), _pos_int(v[1], what, 1 << 16))
        n = _pos_int(v, what, 1 << 16)
        return (n, n)
    return check


def _enum(what: str, allowed: tuple[str, ...]):
    def check(v):
        if not isinstance(v, str) or v.lower() not in allowed:
            raise OptionValueError(f"{what} must be one of {', '.join(allowed)}; got {show(v)}")
        return v.lower()
    return check


def _unit(what: str, lo_open: float = 0.0, hi: float = 1.0, optional: bool = True):
    def check(v):
        if v is None and optional:
            return None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo_open < v <= hi
        if not ok:  # also NaN, which fails every comparison
            raise OptionValueError(f"{what} must lie in ({lo_open:g}, {hi:g}], got {show(v)}")
        return float(v)
    return check


def _color(v):
    vals = v if isinstance(v, tuple) else (v,)
    if not 1 <= len(vals) <= 4:
        raise OptionValueError(f"color must be a number or one number per channel, got {show(v)}")
    out = []
    for x in vals:
        x = float(check_number(x, "color"))
        if not 0.0 <= x <= 1.0:
            raise OptionValueError(f"color values must lie in [0, 1] (pixel scale, black = 0), "
                                   f"got {show(v)}")
        out.append(x)
    return out[0] if not isinstance(v, tuple) else tuple(out)


def _bool(what: str):
    def check(v):
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("on", "off", "true", "false"):
            return v.lower() in ("on", "true")
        raise OptionValueError(f"{what} must be TRUE or FALSE, got {show(v)}")
    return check


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 1 << 10,
          "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(v, what: str = "memory_budget") -> int:
    """Bytes as a number or a size like '512MB', '128MiB', '2GiB' -> int bytes in [1, 16 TiB]."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", v, re.IGNORECASE)
        if not m:
            raise OptionValueError(f"{what} must be bytes or a size like '512MB', '128MiB', "
                                   f"'2GiB'; got {show(v)}")
        v = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    x = check_number(v, what)
    if not 1 <= x <= 1 << 44:
        raise OptionValueError(f"{what} must lie in [1 byte, 16 TiB], got {v!r}")
    return int(x)


def _text(what: str):
    def check(v):
        if not isinstance(v, str) or not v or len(v) > 256:
            raise OptionValueError(f"{what} must be a non-empty name (at most 256 characters), "
                                   f"got {show(v)}")
        return str(v)
    return check


def _target(v):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise OptionValueError(f"target must be a class index, a 'label' or ALL, got {show(v)}")
    if isinstance(v, int) and v < 0:
        raise OptionValueError(f"target class index must be >= 0, got {v}")
    return v if isinstance(v, int) else str(v)


def _region(v):
    if v is None:
        return None
    if not isinstance(v, tuple) or len(v) != 4 or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise OptionValueError(f"region must be (y0, x0, y1, x1) of non-negative integers, "
                               f"got {show(v)}")
    if not (v[0] < v[2] and v[1] < v[3]):
        raise OptionValueError(f"region (y0, x0, y1, x1) needs y0 < y1 and x0 < x1, got {show(v)}")
    return v


MAX_POSITIONS = 1 << 20


def _positions(v):
    if v is None:
        return None
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
        v = (v,)
    if not isinstance(v, tuple) or not v or not all(
            isinstance(p, tuple) and len(p) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p) for p in v):
        shown = show(v) if not isinstance(v, tuple) or len(v) <= 4 else show(v[:4])[:-1] + ", ...)"
        raise OptionValueError(f"positions must be a non-empty list of (y, x) pairs of "
                               f"non-negative integers, e.g. ((0, 0), (8, 16)); got {shown}")
    if len(v) > MAX_POSITIONS:
        raise OptionValueError(f"at most {MAX_POSITIONS} positions, got {len(v)}")
    return tuple(tuple(p) for p in v)


def _drilldown(v):
    if v is None or isinstance(v, bool):
        return v or None
    if not isinstance(v, dict) or set(v) - {"r", "speedup", "select"}:
        raise OptionValueError(f"drilldown must be TRUE, FALSE or a dict with keys 'r', "
                               f"'speedup' and/or 'select' ({{r: 0.25, speedup: 3, select: "
                               f"'uncertainty'}}), got {v!r}")
    out = {}
    if "select" in v:
        if v["select"] not in ("drop", "uncertainty", "refine"):
            raise OptionValueError(f"drilldown select must be 'drop', 'uncertainty' or 'refine', "
                                   f"got {show(v['select'])}")
        out["select"] = v["select"]
    if "r" in v:
        out["r"] = _unit("drilldown r", optional=False)(v["r"])
    if "speedup" in v:
        s = float(check_number(v["speedup"], "drilldown speedup"))
        if s <= 0.0:
            raise OptionValueError(f"drilldown speedup (the target) must be a positive number, "
                                   f"got {v['speedup']!r}")
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
                                   f"got {show(v)}")
        out.append(x.lower())
    return tuple(sorted(set(out)))


def _opt_text(what):
    t = _text(what)
    return lambda v: None if v is None or v == "" else t(v)


def _path(what: str):
    def check(v):
        if v is None:
            return None
        if not isinstance(v, str) or not v.strip() or len(v) > 4096:
            raise OptionValueError(f"{what} must be a non-empty path, glob or URI (at most 4096 "
                                   f"characters), got {show(v)}")
        return v
    return check


@dataclass(frozen=True)
class Option:
    check: Callable[[Any], Any]
    default: Any
    scope: str  # query | session | both
    doc: str


OPTIONS: dict[str, Option] = {
    "model": Option(_text("model"), None, "query", "registered model name (CREATE MODEL)"),
    "image": Option(_text("image"), None, "query", "registered image name (CREATE IMAGE)"),
    # a dataset query: many images, results streamed to Parquet (krypton_db.explain_dataset)
    "images": Option(_path("images"), None, "query",
                     "many images: a folder, a glob, or 'catalog:<name pattern>' (registered)"),
    "out": Option(_path("out"), None, "both", "images: where the Parquet results go (a folder "
                  "or pyarrow.fs URI; default: datasets/ beside the catalog file)"),
    "backend": Option(_enum("backend", ("local", "ray")), "local", "both",
                      "images: this process, or actors on a Ray cluster"),
    "workers": Option(lambda v: None if v is None else _pos_int(v, "workers", 4096), None,
                      "both", "images, backend ray: number of actors (default: CPUs / 2)"),
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
    "engine": Option(_enum("engine", ("numba", "duckdb")), "numba", "both",
                     "numba executors | duckdb (exact mode as SQL delta queries, a reference)"),
    "batch_size": Option(lambda v: None if v is None else _pos_int(v, "batch_size", 1 << 16),
                         None, "both", "queries per batch (default: largest fitting memory_budget)"),
    "memory_budget": Option(lambda v: None if v is None else parse_bytes(v), None, "both",
                            "buffer memory per batch: bytes or '128MiB' (default: "
                            f"{DEFAULT_MEMORY_BUDGET >> 20}MiB, naive {NAIVE_DEFAULT_BUDGET >> 20}MiB)"),
    "score": Option(_enum("score", ("prob", "logit")), "prob", "both",
                    "heat-map value: softmax probability or raw logit"),
    "precision": Option(_enum("precision", ("fast", "exact")), "fast", "both",
                        "fast (Winograd convs where faster) | exact (direct convs only: "
                        "closer to ONNX Runtime, see README 'Precision')"),
    "regions": Option(_enum("regions", ("position", "published")), "position", "both",
                      "position (each batch at its queries' exact changed boxes) | published "
                      "(the position-independent sizes of the paper)"),
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
    "view_cache": Option(lambda v: 0 if v in (0, "0") else parse_bytes(v, "view_cache"),
                         VIEW_CACHE_BUDGET, "session", "materialized views kept per model "
                         f"between queries (LRU): bytes or '1GiB', 0 = off (default "
                         f"{VIEW_CACHE_BUDGET >> 20}MiB)"),
    "progress": Option(_bool("progress"), False, "session", "progress bar on stderr"),
}
SESSION_OPTIONS = frozenset(k for k, o in OPTIONS.items() if o.scope in ("both", "session"))
QUERY_OPTIONS = tuple(k for k, o in OPTIONS.items() if o.scope in ("both", "query"))
# what names the input and where a dataset query's results go: not options of one heat map
INPUT_OPTIONS = ("model", "image", "images", "out", "backend", "workers")


def check(name: str, value):
    """The normalized value of option ``name`` (API or language value); OptionValueError."""
    try:
        return OPTIONS[name].check(plain(value))
    except OptionValueError as exc:
        exc.option = name
        raise


def check_combination(vals: dict, given: set[str]) -> dict:
    """Rules across options (``vals`` holds every query option, ``given`` the ones the caller
    set explicitly): region xor positions, tau / target_ssim only in approximate mode and not
    both, no drill-down over explicit positions. Returns ``vals`` with tau / target_ssim
    cleared outside approximate mode. Raises OptionValueError naming the option to blame."""
    if vals.get("region") is not None and vals.get("positions") is not None:
        raise OptionValueError("give either region or positions, not both", "positions")
    if vals.get("mode") != "approximate":
        for k in ("tau", "target_ssim"):
            if k in given and vals.get(k) is not None:
                raise OptionValueError(f"{k} applies to mode 'approximate' (mode is "
                                       f"{vals.get('mode')!r})", k)
            vals[k] = None
    if vals.get("tau") is not None and vals.get("target_ssim") is not None:
        raise OptionValueError("give either tau or target_ssim, not both",
                               "target_ssim" if "target_ssim" in given else "tau")
    if vals.get("engine") == "duckdb":
        for k, ok in (("mode", ("exact",)), ("device", ("cpu",))):
            if vals.get(k) not in ok:
                raise OptionValueError(f"engine 'duckdb' runs mode 'exact' on the cpu (delta "
                                       f"queries in SQL); {k} is {vals.get(k)!r}",
                                       k if k in given else "engine")
        if vals.get("drilldown") is not None:
            raise OptionValueError("engine 'duckdb' runs exact mode; drilldown is approximate",
                                   "drilldown" if "drilldown" in given else "engine")
    if vals.get("drilldown") is not None and vals.get("positions") is not None:
        raise OptionValueError("drilldown runs on the stride grid; it cannot take positions",
                               "positions")
    return vals


def check_against_model(vals: dict, channels: int, height: int, width: int) -> None:
    """Checks that need the model input (C, H, W): the patch fits, positions / region lie
    inside, a per-channel colour has 1 or C values."""
    ph, pw = vals["patch"]
    if ph > height or pw > width:
        raise OptionValueError(f"patch {ph}x{pw} is larger than the model input {height}x{width}",
                               "patch")
    pos = vals.get("positions")
    if pos is not None:
        bad = [p for p in pos if p[0] + ph > height or p[1] + pw > width]
        if bad:
            raise OptionValueError(f"positions {list(bad[:3])} put the {ph}x{pw} patch outside "
                                   f"the {height}x{width} input", "positions")
    region = vals.get("region")
    if region is not None and not (region[2] <= height and region[3] <= width):
        raise OptionValueError(f"region {region} must satisfy 0 <= y0 < y1 <= {height}, "
                               f"0 <= x0 < x1 <= {width}", "region")
    color = vals.get("color")
    if isinstance(color, tuple) and len(color) not in (1, channels):
        raise OptionValueError(f"color needs 1 or {channels} values for this {channels}-channel "
                               f"model, got {len(color)}", "color")
