"""Statement execution for the explanation query language (``Session.sql`` / ``.explain``).

Invariants:
- A script is parsed completely before anything runs: a syntax or binding error anywhere
  means no statement of it ran.
- ``occlusion(...)`` runs in Python (``api.occlude``, the run recorded in the catalog), its
  heat-map relation is registered as Arrow data under a generated name
  (``__krypton_occl_<n>``, validated by ``sqlviews.ident``) that replaces the call's text;
  DuckDB then runs the rest of the statement, and the registration is dropped. User values
  never reach SQL text: names/paths go to the catalog API (prepared parameters), options are
  parsed by the grammar. The SQL around a call is the user's own and runs as written.
- Research switches (:mod:`krypton_db.research`) are scoped to the session: ``SET
  disable_rule`` is passed to each plan this session builds (``plan_occlusion(disabled=)``,
  ``OcclusionHooks.disabled_rules``), ``SET naive_from`` is a delta-plan rewrite passed to
  the run as a hook; nothing process-wide changes.
- Runs are observed through ``occlude(..., hooks=OcclusionHooks(...))`` (:mod:`krypton_db.hooks`:
  per-step times, materialization time, per-batch progress, plan rewrite); nothing global is
  patched.
- EXPLAIN output is deterministic (see ``planner/explain.py``); ANALYZE adds measured times.

Size: this file is over the ~400-line guideline because one ``Engine`` owns every statement
kind (create/set/show/explain/analyze/run); the cost model behind EXPLAIN's estimate and
``CALIBRATE`` lives in ``planner/cost.py``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from .errors import InputError, KryptonError, SqlError
from .hooks import OcclusionHooks
from .calibration import CALIBRATION_SUITE, calibrate
from .planner.cost import FEATURES, cost_model_path, load_cost_model  # noqa: F401 (re-export)
from .options import PREPROCESS_KEYS, OptionValueError, check_against_model, show, unknown_option
from .progress import Progress
from .research import ablation, force_naive_from, naive_from_rewrite
from .result import Result
from .sql.dsl import ast as A
from .sql.dsl import DslBindError, DslError, bind_call, check_option, parse
from .sql.dsl.binder import OPTIONS, SESSION_OPTIONS, BoundQuery

HEATMAP_SCHEMA = pa.schema([("model", pa.string()), ("image", pa.string()),
                            ("run_id", pa.int64()), ("y", pa.int32()), ("x", pa.int32()),
                            ("class", pa.int32()), ("label", pa.string()),
                            ("prob", pa.float32())])


# -- binding against the catalog -------------------------------------------------------------------

@dataclass
class Resolved:
    """A bound query resolved against the catalog: model, grid, the plan that will run."""

    bq: BoundQuery
    model: object
    graph: object  # the graph that runs (truncated at the logits for score => 'logit')
    positions: int
    grid: tuple
    tau: float
    tau_note: str
    plan: object | None = None  # final delta plan (None for naive mode: nothing to maintain)
    batch: int = 1
    per_query: int = 0
    image: object | None = None  # the pixels, once read from the catalog for the run


class Engine:
    """Executes scripts for one :class:`~krypton_db.session.Session`."""

    def __init__(self, session):
        self.session = session
        self.options: dict = {}
        self._models: dict[str, object] = {}
        self._seq = 0

    @property
    def catalog(self):
        return self.session.catalog

    @property
    def con(self):
        """The session connection; every statement runs inside ``catalog.connection()``,
        which attaches the catalog file for it."""
        return self.session.catalog.db

    # -- scripts ---------------------------------------------------------------------------------
    def iter_script(self, text: str, params=None):
        """Parse ``text`` whole, then run its statements one by one, yielding
        ``(statement, Result)``."""
        stmts = parse(text, SESSION_OPTIONS)
        if len(stmts) > 1 and params is not None:
            raise InputError("query parameters need a single statement")
        for st in stmts:
            with self.catalog.connection():
                res = self.execute(st, text, params)
            yield st, res

    def run_script(self, text: str, params=None):

        last = Result(None)
        for _, res in self.iter_script(text, params):
            last = res
        return last

    def execute(self, st, text: str, params=None):

        if isinstance(st, A.Explain):
            rows = self.explain_stmt(st, text, params)
            return self._rows(["plan_type", "plan"], rows)
        if isinstance(st, A.SqlStatement):
            if not st.calls:
                sql = text[st.start : st.end]
                try:
                    return Result(self.con.sql(sql) if params is None else
                                  self.con.sql(sql, params=params))
                except duckdb.Error as exc:
                    raise self._unknown_setting(text, st, exc) or SqlError(exc) from None
            return self._run_sql(st, text, params)
        handler = getattr(self, "_do_" + type(st).__name__.lower())
        return handler(st, text)

    def _unknown_setting(self, text: str, st, exc):
        """SET/RESET of a name that is neither ours nor DuckDB's: one clear error naming both."""
        import difflib
        import re

        m = re.match(r"\s*(SET|RESET)\s+([A-Za-z_][A-Za-z0-9_]*)", text[st.start : st.end],
                     re.IGNORECASE)
        if not m or "unrecognized configuration parameter" not in str(exc):
            return None
        name = m.group(2).lower()
        close = difflib.get_close_matches(name, sorted(SESSION_OPTIONS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return DslBindError(f"unknown option {name!r}{hint}: not a krypton option ("
                            f"{', '.join(sorted(SESSION_OPTIONS))}) nor a DuckDB setting",
                            text, st.start + m.start(2))

    def _rows(self, columns: list[str], rows: list[tuple], types=None):

        cols = list(zip(*rows)) if rows else [[] for _ in columns]
        arrays = [pa.array(list(c), type=(types or {}).get(n, None) or
                           (pa.string() if not rows else None)) for n, c in zip(columns, cols)]
        return Result(self.con.from_arrow(pa.table(dict(zip(columns, arrays)))))

    # -- our statements --------------------------------------------------------------------------
    def _check_name(self, name: str, text: str, pos: int) -> str:
        if not name or len(name) > 128 or any(ord(ch) < 32 for ch in name):
            raise DslBindError("a name must be 1..128 printable characters", text, pos)
        return name

    def _do_createmodel(self, st: A.CreateModel, text: str):
        from .model import load_model

        self._check_name(st.name, text, st.name_pos)
        pre, labels, at = {}, None, {}
        for a in st.options:
            if a.name in PREPROCESS_KEYS:
                pre[a.name] = a.value
                at[a.name] = a.value_pos
            elif a.name == "labels":
                if not isinstance(a.value, tuple) or not all(isinstance(x, str) for x in a.value):
                    raise DslBindError("labels must be a tuple of 'strings'", text, a.value_pos)
                labels = [str(x) for x in a.value]
            else:
                raise DslBindError(unknown_option(a.name, ("labels",) + PREPROCESS_KEYS,
                                                  "model option"), text, a.pos)
        if st.kind == "file":
            p = Path(st.source).expanduser()
            if not p.is_file():
                raise DslBindError(f"no model file {st.source!r}", text, st.source_pos)
            src = str(p)
        else:
            src = ("zoo:" if st.kind == "zoo" else "pkg:") + st.source
        if st.name in self.catalog.models() and not st.replace:
            raise DslBindError(f"model {st.name!r} is already registered (CREATE OR REPLACE "
                               "MODEL replaces it)", text, st.name_pos)
        try:
            m = load_model(src, preprocess=pre or None, labels=labels, name=st.name)
        except OptionValueError as exc:  # the same preprocessing checks as load_model's
            raise DslBindError(str(exc), text, at.get(exc.option, st.source_pos)) from None
        except KryptonError as exc:
            raise DslBindError(str(exc), text, st.source_pos) from None
        model_id = self.catalog.register_model(m, st.name, replace=st.replace)
        self._models[model_id] = m
        return self._rows(["model", "source", "input", "classes", "gmacs"],
                          [(st.name, src, "x".join(map(str, m.graph.input_shape)),
                            m.graph.num_classes, round(m.graph.macs / 1e9, 3))])

    def _register_image(self, source, name: str, replace_: bool):
        from .images import to_pil

        img = to_pil(source)
        self.catalog.register_image(source if isinstance(source, (str, Path)) else img, name,
                                    replace=replace_)
        return (name, img.width, img.height)

    def _do_createimage(self, st: A.CreateImage, text: str):
        from .images import sample_image

        self._check_name(st.name, text, st.name_pos)
        if st.name in self.catalog.images() and not st.replace:
            raise DslBindError(f"image {st.name!r} is already registered (CREATE OR REPLACE "
                               "IMAGE replaces it)", text, st.name_pos)
        try:
            if st.kind == "sample":
                src = sample_image(st.source)
            else:
                p = Path(st.source).expanduser()
                if not p.is_file():
                    raise InputError(f"no image file {st.source!r}")
                src = str(p)
            row = self._register_image(src, st.name, st.replace)
        except (KryptonError, OSError) as exc:
            raise DslBindError(str(exc), text, st.source_pos) from None
        return self._rows(["image", "width", "height"], [row])

    def _do_createimages(self, st: A.CreateImages, text: str):
        files = sorted(f for f in glob.glob(os.path.expanduser(st.pattern)) if os.path.isfile(f))
        if not files:
            raise DslBindError(f"no files match {st.pattern!r}", text, st.source_pos)
        names = [Path(f).stem for f in files]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DslBindError(f"several files share the stem {dup[0]!r}", text, st.source_pos)
        have = set(self.catalog.images())
        taken = [n for n in names if n in have]
        if taken and not st.replace:
            raise DslBindError(f"image {taken[0]!r} is already registered (CREATE OR REPLACE "
                               "IMAGES replaces)", text, st.source_pos)
        rows = []
        for f, n in zip(files, names):
            try:
                rows.append(self._register_image(f, n, st.replace))
            except (KryptonError, OSError) as exc:
                raise DslBindError(f"{f}: {exc} ({len(rows)} images registered before it)",
                                   text, st.source_pos) from None
        return self._rows(["image", "width", "height"], rows)

    def _do_setoption(self, st: A.SetOption, text: str):

        v = check_option(st.name, st.value, text, st.name_pos, st.value_pos)
        if st.name == "disable_rule":
            from .graph import Op

            known = {o.value for o in Op if o is not Op.INPUT}
            for r in v:
                if r not in known:
                    raise DslBindError(f"unknown layer type {r!r} for disable_rule; layer types: "
                                       f"{', '.join(sorted(known))}", text, st.value_pos)
        if st.name == "device":
            self._check_device(v, None, text, st.value_pos)
        self.options[st.name] = v
        return Result(None)

    def _do_resetoption(self, st: A.ResetOption, text: str):

        if st.name == "all":
            self.options.clear()
        else:
            self.options.pop(st.name, None)
        return Result(None)

    def _do_show(self, st: A.Show, text: str):
        w = st.what
        if w == "OPTIONS":
            rows = [(k, show(self.options.get(k, o.default)), show(o.default), o.scope, o.doc)
                    for k, o in OPTIONS.items()]
            return self._rows(["option", "value", "default", "scope", "description"], rows)
        if w == "RULES":
            from .graph import Op
            from .planner.ivm import registry

            rows = []
            for op in Op:
                if op is Op.INPUT:
                    continue
                r = registry.DELTA_RULES.get(op)
                off = op.value in self.options.get("disable_rule", ())
                rows.append((op.value, type(r).__name__ if r else "FullRecompute",
                             r.kind if r else "global", r.origin if r else "-",
                             "disabled" if off else ("active" if r else "missing")))
            return self._rows(["op", "rule", "kind", "origin", "status"], rows)

        # every version is listed (a name's latest is the one statements use)
        sql = {"MODELS": "SELECT name, version, source, input_shape, num_classes, macs, "
                         "left(sha256, 12) AS sha256, registered_at FROM models ORDER BY name, version",
               "IMAGES": "SELECT name, version, path, width, height, channels, left(sha256, 12) "
                         "AS sha256, registered_at FROM images ORDER BY name, version",
               "RUNS": "SELECT r.id, m.name AS model, m.version AS model_version, i.name AS image, "
                       "i.version AS image_version, r.mode, r.target_class, r.heatmap_h, "
                       "r.heatmap_w, r.created_at FROM runs r JOIN models m ON "
                       "m.id = r.model_id JOIN images i ON i.id = r.image_id ORDER BY r.id"}[w]
        return Result(self.con.sql(sql))

    def _do_calibrate(self, st: A.Calibrate, text: str):
        """``CALIBRATE``: fit the cost model on the built-in suite (zoo models); ``CALIBRATE
        MODEL m IMAGE i``: on that registered model and image."""

        if st.model is None:
            suite = CALIBRATION_SUITE
        else:
            suite = ((self._model(st.model, text, st.model_pos),
                      self._image(st.image, text, st.image_pos)),)
        res = calibrate(suite)
        return self._rows(list(FEATURES) + ["samples", "rmse_s", "seconds", "path"],
                          [tuple(res["coef"][k] for k in FEATURES)
                           + (res["samples"], res["rmse_s"], res["seconds"], res["path"])])

    def _do_tune(self, st: A.Tune, text: str):
        from . import api

        m = self._model(st.model, text, st.model_pos)
        imgs = [self._image(n, text, st.model_pos) for n in st.images]
        kw = {}
        for a in st.options:
            if a.name not in ("target_ssim", "domain", "patch", "stride"):
                raise DslBindError(f"unknown TUNE option {a.name!r}; options: domain, patch, "
                                   "stride, target_ssim", text, a.pos)
            kw[a.name] = check_option(a.name, a.value, text, a.pos, a.value_pos)
        try:
            res = api.tune(m, imgs, catalog=self.catalog, **kw)
        except KryptonError as exc:
            raise DslBindError(str(exc), text, st.start) from None
        return self._rows(["model", "domain", "tau", "target_ssim"],
                          [(st.model, kw.get("domain", "default"), float(res.tau),
                            float(res.target_ssim))])

    # -- names -----------------------------------------------------------------------------------
    def model(self, name: str):
        """The loaded latest version of registered model ``name`` (as statements use it)."""
        with self.catalog.connection():
            return self._model(name, name, 0)

    def _model(self, name: str, text: str, pos: int):
        """The latest version of model ``name`` (loaded once per version and session)."""
        if name not in self.catalog.models():
            have = ", ".join(self.catalog.models()) or "none"
            raise DslBindError(f"unknown model {name!r} (registered: {have}); register it with "
                               f"CREATE MODEL {_ident_hint(name)} FROM '<file.onnx>'", text, pos)
        model_id = self.catalog.model_id(name)
        m = self._models.get(model_id)
        if m is not None:
            return m
        try:
            m = self.catalog.get_model(name)
        except KryptonError as exc:
            raise DslBindError(str(exc), text, pos) from None
        self._models[model_id] = m
        return m

    def _image(self, name: str, text: str, pos: int):
        if name not in self.catalog.images():
            have = self.catalog.images()
            shown = ", ".join(have[:10]) + (" ..." if len(have) > 10 else "") or "none"
            raise DslBindError(f"unknown image {name!r} (registered: {shown}); register it "
                               f"with CREATE IMAGE {_ident_hint(name)} FROM '<file.png>'",
                               text, pos)
        return self.catalog.get_image(name)

    def _check_device(self, device: str, bq, text, pos):
        if device == "cpu":
            return
        from .exec.gpu import gpu_status

        ok, why = gpu_status()
        if not ok:
            msg = (f"device {device!r} is not available: it needs a CUDA GPU and the numba-cuda "
                   f"package; none found: {why} (executors available: cpu)")
            raise bq.error(msg, "device") if bq is not None else DslBindError(msg, text, pos)

    # -- resolve + plan ----------------------------------------------------------------------------
    def resolve(self, bq: BoundQuery) -> Resolved:
        """Names -> catalog objects, model-dependent checks, the plan passes' inputs."""
        from .occlusion import grid_positions

        m = self._model(bq.model, bq.text, bq.arg_pos.get("model", bq.start))
        if bq.image not in self.catalog.images():
            self._image(bq.image, bq.text, bq.arg_pos.get("image", bq.start))
        c, h, w = m.graph.input_shape
        try:
            check_against_model(dict(patch=bq.patch, positions=bq.positions, region=bq.region,
                                     color=bq.color), c, h, w)
        except OptionValueError as exc:
            raise bq.error(str(exc), exc.option) from None
        if bq.positions is not None:
            n, grid = len(bq.positions), (1, len(bq.positions))
        else:
            try:
                g, grid = grid_positions(h, w, bq.patch, bq.stride, bq.region)
            except InputError as exc:
                raise bq.error(str(exc), "region" if bq.region is not None else "patch") from None
            n = int(grid[0] * grid[1])
        if bq.target is not None:
            try:
                m.class_index(bq.target)
            except InputError as exc:
                raise bq.error(str(exc), "target") from None
        self._check_device(bq.device, bq, bq.text, None)
        nf = self.options.get("naive_from")
        if nf is not None and nf not in m.graph:
            names = [s.node.name for s in m.executor.plan.steps]
            raise DslBindError(f"naive_from: no layer {nf!r} in model {bq.model!r} (layers: "
                               f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''})",
                               bq.text, bq.start)
        tau, note = self._tau(m, bq)
        graph = m.graph
        if bq.score == "logit":
            graph = graph.truncated(graph.logits_node())
        return Resolved(bq, m, graph, n, grid, tau, note)

    def _tau(self, m, bq: BoundQuery) -> tuple[float, str]:
        if bq.mode != "approximate":
            return 1.0, ""
        if bq.tau is not None:
            return bq.tau, "given"
        try:
            from .api import resolve_tau

            tau, src = resolve_tau(m, bq.mode, None, bq.target_ssim, bq.domain, self.catalog)
        except ImportError:  # the facade changed: leave it to run time
            return 1.0, "resolved at run time"
        except KryptonError as exc:
            raise bq.error(str(exc), "target_ssim" if bq.target_ssim is not None else "mode") \
                from None
        return float(tau), str(src)

    def passes(self, r: Resolved) -> list[tuple[str, object]]:
        """The named planning passes, in order: (name, result). The last ones are the plan
        that runs. bind -> plan_deltas -> apply_tau -> force_naive_from -> choose_batch ->
        lower."""
        from .planner.physical import PhysicalPlan
        from .occlusion import prepare
        from .planner.batching import resolve_budget

        bq = r.bq
        out: list[tuple[str, object]] = [("bind", self._bind_text(r))]
        cpu_plan = r.model.executor.plan if r.graph is r.model.graph else PhysicalPlan.lower(r.graph)
        # the same preparation the run makes (occlusion.prepare), so EXPLAIN shows what runs
        prep = prepare(r.graph, cpu_plan, bq.patch, mode=bq.mode, positions=r.positions,
                       tau=r.tau, device=bq.device, memory_budget=bq.memory_budget,
                       batch_size=bq.batch_size,
                       disabled=frozenset(self.options.get("disable_rule", ())),
                       rewrite=self._plan_rewrite())
        (_, p1), (_, p2), (_, p3) = prep.passes
        out += [("plan_deltas", p1), ("apply_tau", p2), ("force_naive_from", p3)]
        per_q, bs = prep.per_query, prep.batch
        r.plan, r.batch, r.per_query = p3, bs, per_q
        out.append(("choose_batch",
                    f"batch size {bs} for {r.positions} positions ({-(-r.positions // bs)} "
                    f"batches): {fmt_bytes_(per_q)} per query, budget "
                    f"{fmt_bytes_(resolve_budget(bq.mode, bq.memory_budget))}"
                    + (" (batch_size set)" if bq.batch_size else "")))
        out.append(("lower", None))
        return out

    def _bind_text(self, r: Resolved) -> str:
        bq = r.bq
        c, h, w = r.graph.input_shape
        lines = [bq.describe(),
                 f"model {bq.model!r}: graph {r.graph.name}, input {c}x{h}x{w}, "
                 f"{r.graph.num_classes} classes, {len(r.graph.nodes)} nodes",
                 f"positions {r.positions} ({r.grid[0]}x{r.grid[1]} grid)"
                 if bq.positions is None else f"positions {r.positions} (listed)"]
        if bq.mode == "approximate":
            lines.append(f"tau {r.tau:g} ({r.tau_note})")
        sw = []
        if self.options.get("disable_rule"):
            sw.append("disable_rule=" + ",".join(self.options["disable_rule"]))
        if self.options.get("naive_from"):
            sw.append(f"naive_from={self.options['naive_from']}")
        sw.append(f"merge_policy={self.options.get('merge_policy', 'bbox')}")
        lines.append("switches: " + ", ".join(sw))
        return "\n".join(lines)

    # -- EXPLAIN ---------------------------------------------------------------------------------
    def explain_stmt(self, st: A.Explain, text: str, params=None) -> list[tuple[str, str]]:
        from .planner import explain as E

        sections: list = []
        if st.format == "sql":
            return E.render([self._delta_sql_section(call, text, k, len(st.inner.calls))
                             for k, call in enumerate(st.inner.calls)])
        for k, call in enumerate(st.inner.calls):
            bq = bind_call(call, text, self.options)
            r = self.resolve(bq)
            passes = self.passes(r)
            prefix = "" if len(st.inner.calls) == 1 else f"call {k + 1}: "
            disabled = set(self._disabled_ops())
            if st.verbose:
                prev = None
                for i, (name, val) in enumerate(passes, 1):
                    pt = f"{prefix}pass {i}: {name}"
                    if name == "bind" or name == "choose_batch":
                        sec = E.Section(pt, [val])
                    elif name == "lower":
                        sec = self._physical(r, pt)
                    elif bq.mode == "naive" and name != "plan_deltas":
                        sec = E.Section(pt, ["mode naive: no delta plan is maintained"])
                    else:
                        sec = E.delta_section(val, True, disabled, pt)
                    body = sec.text().split("\n", 1)[-1] if name in ("apply_tau",
                                                                     "force_naive_from") else None
                    if prev is not None and body is not None and body == prev:
                        sec = E.same_as_above(pt)
                    elif name in ("plan_deltas", "apply_tau", "force_naive_from"):
                        prev = sec.text().split("\n", 1)[-1]
                    sections.append(sec)
            sections += self._plan_sections(r, prefix, st.verbose, disabled)
            if st.analyze:
                sections += self._analyze(r, st, text, params, prefix)
        return E.render(sections, st.format)

    def _delta_sql_section(self, call, text: str, k: int, calls: int):
        """EXPLAIN (FORMAT SQL): the call's delta queries over the materialized views."""
        from .planner import explain as E
        from .planner.delta_sql import compile_delta_sql

        bq = bind_call(call, text, self.options)
        r = self.resolve(bq)
        if bq.mode != "exact":
            raise bq.error(f"EXPLAIN (FORMAT SQL) shows the delta queries of exact mode; "
                           f"mode is {bq.mode!r}", "mode")
        if self.options.get("naive_from"):
            raise bq.error("EXPLAIN (FORMAT SQL) does not render SET naive_from (a rewrite of "
                           "the numba plan); RESET naive_from first")
        dsql = compile_delta_sql(r.graph, bq.patch, frozenset(self.options.get("disable_rule", ())))
        prefix = "" if calls == 1 else f"call {k + 1}: "
        return E.Section(f"{prefix}delta queries (SQL)", dsql.script().rstrip("\n").split("\n"))

    def _disabled_ops(self):
        from .graph import Op

        return [Op(v) for v in self.options.get("disable_rule", ())]

    def _physical(self, r: Resolved, plan_type: str):
        from .planner import explain as E

        return E.physical_section(r.plan, r.bq.mode, r.batch, r.per_query, r.positions,
                                  r.bq.device, plan_type=plan_type)

    def _plan_sections(self, r: Resolved, prefix: str, verbose: bool, disabled) -> list:
        from .planner import explain as E
        from .sqlviews import graph_to_sql

        bq = r.bq
        try:
            views = graph_to_sql(r.graph)
        except KryptonError as exc:
            views = [f"-- no relational form: {exc}"]
        logical = E.logical_section(views, [bq.describe()],
                                    bool(self.options.get("explain_full_views", False)),
                                    int(self.options.get("explain_views", 3)))
        logical.plan_type = prefix + logical.plan_type
        out = [logical]
        if bq.mode != "naive":
            out.append(E.delta_section(r.plan, verbose, disabled, prefix + "delta_plan"))
        out.append(self._physical(r, prefix + "physical_plan"))
        n: float = r.positions
        note = ""
        if bq.drilldown is not None:
            from .approx import DEFAULT_SPEEDUP

            sp = bq.drilldown.get("speedup", DEFAULT_SPEEDUP)
            n = round(r.positions / sp, 1)
            note = f" (drill-down target {sp:g}x fewer than {r.positions})"
        est = E.estimate_section(r.plan, bq.mode, n, load_cost_model(), note, r.batch)
        est.plan_type = prefix + est.plan_type
        out.append(est)
        return out

    def _analyze(self, r: Resolved, st: A.Explain, text: str, params, prefix: str) -> list:
        from .planner import explain as E

        from .occlusion import occlude as _occ

        bq = r.bq
        # JIT apart: compile the executor's and the incremental kernels on one position first
        t0 = time.perf_counter()
        img = self.catalog.get_image(bq.image)
        with self.catalog.suspended():
            _occ(r.model, img, patch=bq.patch, positions=[[0, 0]],
                 mode="naive" if bq.mode == "naive" else "exact", score=bq.score,
                 hooks=self._hooks())
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        hm, hooks = self._occlude(r, profile=True)
        wall = time.perf_counter() - t0
        step_secs = dict(hooks.step_secs)
        # the measured run's own JIT (normally ~0 after the warm-up) is inside its wall time
        t = dict(wall_s=wall, jit_s=float(hm.stats.get("jit_s", 0.0)), warmup_s=warm,
                 materialize_s=hooks.materialize_s)
        sample = None
        if bq.mode != "naive":
            sample, naive_pq, full_secs = self._naive_sample(r, hm)
            t.update(naive_per_query_s=naive_pq, naive_sample=len(sample),
                     inc_per_query_s=float(hm.stats["run_s"]) / max(r.positions, 1))
        # the rest of the statement, in DuckDB, over the heat map just computed
        if len(st.inner.calls) == 1:
            ts = time.perf_counter()
            res = self._run_sql(st.inner, text, params, precomputed=[hm])
            t.update(sql_rows=len(res.fetchall()), sql_s=time.perf_counter() - ts)
        sec = E.analyze_section(r.plan, r.positions, step_secs, t, bq.mode)
        sec.plan_type = prefix + sec.plan_type
        out = [sec]
        if st.ablation:
            out.append(self._ablation_section(r, step_secs, full_secs if sample is not None
                                              else None, len(sample) if sample is not None else 0,
                                              prefix))
        return out

    def _naive_sample(self, r: Resolved, hm):
        """Full re-inference on up to 8 positions of the grid, profiled per step: (positions,
        seconds per query, {step: seconds per query})."""
        from .occlusion import occlude as _occ

        bq = r.bq
        flat = np.asarray(hm.positions).reshape(-1, 2)
        k = min(len(flat), 8)
        idx = np.linspace(0, len(flat) - 1, k).round().astype(int)
        sample = flat[idx]
        img = self.catalog.get_image(bq.image)
        hooks = OcclusionHooks(profile=True)
        with self.catalog.suspended():
            nv = _occ(r.model, img, patch=bq.patch, positions=sample, color=bq.color,
                      target=hm.target, mode="naive", batch_size=k, score=bq.score, hooks=hooks)
        full = {name: secs / k for name, secs in hooks.step_secs.items()}
        return sample, float(nv.stats["run_s"]) / k, full

    def _ablation_section(self, r: Resolved, step_secs: dict, full: dict | None, k: int,
                          prefix: str):
        from .planner import explain as E

        rows = []
        n = max(r.positions, 1)
        for ds in r.plan.steps:
            inc_ms = 1e3 * step_secs.get(ds.node.name, 0.0) / n
            full_ms = 1e3 * (full or {}).get(ds.node.name, 0.0)
            rows.append(dict(step=ds.node.name, op=E.step_op(ds), rule=E.rule_name(ds),
                             macs_full=ds.macs_full, macs_inc=ds.macs_inc,
                             theory=ds.macs_full / ds.macs_inc if ds.macs_inc else None,
                             full_ms=full_ms, inc_ms=inc_ms,
                             measured=full_ms / inc_ms if inc_ms > 0 and full_ms > 0 else None))
        sec = E.ablation_section(rows, r.positions, k)
        sec.plan_type = prefix + sec.plan_type
        return sec

    # -- running occlusion queries ---------------------------------------------------------------
    def _occlude_kwargs(self, r: Resolved) -> dict:
        """The occlusion driver's arguments for a resolved call (the tau is the resolved one:
        nothing is read from the catalog while the run computes)."""
        bq = r.bq
        kw = dict(patch=bq.patch, stride=bq.stride, color=bq.color, target=bq.target,
                  mode=bq.mode, region=bq.region,
                  positions=np.asarray(bq.positions, np.int64) if bq.positions else None,
                  all_classes=bq.all_classes, memory_budget=bq.memory_budget, score=bq.score,
                  batch_size=bq.batch_size, device="gpu" if bq.device != "cpu" else "cpu",
                  engine=bq.engine)
        if bq.mode == "approximate":
            kw["tau"] = r.tau
        return kw

    def _hooks(self, profile: bool = False, on_batch=None) -> OcclusionHooks:
        """This session's research switches and observers for one run."""
        return OcclusionHooks(plan_rewrite=self._plan_rewrite(), profile=profile,
                              on_batch=on_batch,
                              disabled_rules=frozenset(self.options.get("disable_rule", ())))

    def _plan_rewrite(self):
        return naive_from_rewrite(self.options.get("naive_from"))

    def _occlude(self, r: Resolved, profile: bool = False):
        """Compute one occlusion call with the catalog file detached (a long computation
        holds no lock): (heat map, the run's :class:`OcclusionHooks` holding per-step seconds
        when ``profile``, materialization seconds). Records nothing."""
        from . import api

        bq = r.bq
        img = r.image = self.catalog.get_image(bq.image)
        progress = Progress(f"occlusion({bq.model}, {bq.image})") \
            if self.options.get("progress") else None
        hooks = self._hooks(profile, progress.update if progress is not None else None)
        kw = self._occlude_kwargs(r)
        try:
            with self.catalog.suspended():
                hm = api.run_checked(r.model, img, kw, hooks, bq.drilldown,
                                     tau_source=r.tau_note or None)
        except KryptonError as exc:
            raise bq.error(str(exc)) from None
        finally:
            if progress is not None:
                progress.close()
        return hm, hooks

    def heatmap_table(self, r: Resolved, hm) -> pa.Table:
        """The heat-map relation (model, image, run_id, y, x, class, label, prob)."""
        bq = r.bq
        pos = np.asarray(hm.positions).reshape(-1, 2).astype(np.int32)
        n = pos.shape[0]
        labels = r.model.labels
        run_id = hm.stats.get("run_id")
        if hm.all_probs is not None:
            k = hm.all_probs.shape[-1]
            probs = np.asarray(hm.all_probs, np.float32).reshape(n, k)
            ys, xs = np.repeat(pos[:, 0], k), np.repeat(pos[:, 1], k)
            cls = np.tile(np.arange(k, dtype=np.int32), n)
            vals = probs.reshape(-1)
        else:
            ys, xs = pos[:, 0], pos[:, 1]
            cls = np.full(n, hm.target, np.int32)
            vals = np.asarray(hm.probs, np.float32).reshape(-1)
        lab = np.asarray(labels, dtype=object)[cls] if len(labels) else cls.astype(str)
        m = len(vals)
        return pa.table([pa.array([bq.model] * m, pa.string()),
                         pa.array([bq.image] * m, pa.string()),
                         pa.array([run_id] * m, pa.int64()), pa.array(ys, pa.int32()),
                         pa.array(xs, pa.int32()), pa.array(cls, pa.int32()),
                         pa.array(lab.tolist(), pa.string()), pa.array(vals, pa.float32())],
                        schema=HEATMAP_SCHEMA)

    def _rewrite(self, st: A.SqlStatement, text: str, names: list[str]) -> str:
        """The statement's SQL with each ``occlusion(...)`` call replaced by ``names[i]``."""
        from .sqlviews import ident

        pieces, pos = [], st.start
        for call, name in zip(st.calls, names):
            pieces += [text[pos : call.start], ident(name)]
            pos = call.end
        pieces.append(text[pos : st.end])
        return f"SELECT * FROM {ident(names[0])}" if st.bare_call else "".join(pieces)

    def _sql_error(self, exc: Exception, st: A.SqlStatement, text: str, names: list[str]):
        """A DuckDB error in the SQL around the calls, with the internal relation names put
        back as the calls they stand for, positioned at the statement."""
        msg = " ".join(str(exc).split())
        for k, name in enumerate(names):
            call = "occlusion(...)" if len(names) == 1 else f"occlusion(...) #{k + 1}"
            msg = re.sub(rf'"?{re.escape(name)}"?', call, msg)
        return DslBindError(f"in the SQL around occlusion(...): {msg}", text, st.start)

    def _prebind(self, st: A.SqlStatement, text: str, params) -> None:
        """Bind the SQL around the calls (tables, columns, functions) against empty heat-map
        relations before any occlusion runs: a typo fails in milliseconds, not after the run.
        Errors DuckDB only finds while executing (casts, constraints) still come at the end."""
        self._seq += 1
        names = [f"__krypton_check_{self._seq}_{k}" for k in range(len(st.calls))]
        empty = HEATMAP_SCHEMA.empty_table()
        for name in names:
            self.con.register(name, empty)
        try:
            sql = "EXPLAIN " + self._rewrite(st, text, names)
            self.con.execute(sql) if params is None else self.con.execute(sql, params)
        except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException) as exc:
            raise self._sql_error(exc, st, text, names) from None
        except duckdb.Error:
            pass  # not plannable empty (e.g. a statement EXPLAIN does not take): checked at run
        finally:
            for name in names:
                self.con.unregister(name)

    def _run_sql(self, st: A.SqlStatement, text: str, params=None, precomputed=None):
        """Bind everything, compute each occlusion(...) call (catalog detached), then in one
        transaction record the runs and run the statement's SQL over their heat maps: a
        statement that fails records nothing."""
        from . import api

        bound = [bind_call(c, text, self.options) for c in st.calls]
        resolved = [self.resolve(bq) for bq in bound]
        self._prebind(st, text, params)
        hms = [precomputed[i] if precomputed else self._occlude(r)[0]
               for i, r in enumerate(resolved)]
        self._seq += 1
        names = [f"__krypton_occl_{self._seq}_{k}" for k in range(len(st.calls))]
        record = self.options.get("record_runs", True) and not self.catalog.read_only
        try:
            with (self.catalog.transaction() if record else contextlib.nullcontext()):
                for r, hm in zip(resolved, hms):
                    if record and r.bq.positions is None:
                        img = r.image if r.image is not None else self.catalog.get_image(r.bq.image)
                        api.record_run(self.catalog, r.model, img,
                                       hm, image_name=r.bq.image, color=r.bq.color,
                                       region=r.bq.region, domain=r.bq.domain)
                for name, r, hm in zip(names, resolved, hms):
                    self.con.register(name, self.heatmap_table(r, hm))
                sql = self._rewrite(st, text, names)
                try:
                    rel = self.con.sql(sql) if params is None else self.con.sql(sql, params=params)
                    result = Result(rel)
                except duckdb.Error as exc:
                    raise self._sql_error(exc, st, text, names) from None
        finally:
            for n in names:
                self.con.unregister(n)
        return result


def fmt_bytes_(n) -> str:
    from .planner.explain import fmt_bytes

    return fmt_bytes(n)


def _ident_hint(name: str) -> str:
    import re

    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else "'" + name.replace(
        "'", "''") + "'"


__all__ = ["DslError", "Engine", "HEATMAP_SCHEMA", "Progress", "ablation",
           "calibrate", "cost_model_path", "force_naive_from", "load_cost_model",
           ]
