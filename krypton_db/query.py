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

One ``Engine`` runs every statement kind; its parts live by kind: catalog and session
statements in ``query_statements.py``, binding and planning in ``query_resolve.py``, EXPLAIN
in ``query_explain.py``; this module runs scripts, occlusion calls and the SQL around them.
"""

from __future__ import annotations

import contextlib
import re

import duckdb
import numpy as np
import pyarrow as pa

from . import api
from .calibration import calibrate
from .exec.view_cache import DEFAULT_BUDGET as VIEW_CACHE_BUDGET
from .errors import InputError, KryptonError, SqlError
from .hooks import OcclusionHooks
from .planner.cost import FEATURES, cost_model_path, load_cost_model  # noqa: F401 (re-export)
from .progress import Progress
from .query_dataset import DatasetStatements
from .query_explain import ExplainStatements
from .query_resolve import Resolution, Resolved
from .query_statements import CatalogStatements
from .research import ablation, force_naive_from, naive_from_rewrite
from .result import Result
from .sql.dsl import DslBindError, DslError, bind_call, parse
from .sql.dsl import ast as dsl_ast
from .sql.dsl.binder import SESSION_OPTIONS
from .sqlviews import ident

HEATMAP_SCHEMA = pa.schema([("model", pa.string()), ("image", pa.string()),
                            ("run_id", pa.int64()), ("y", pa.int32()), ("x", pa.int32()),
                            ("class", pa.int32()), ("label", pa.string()),
                            ("prob", pa.float32())])


class Engine(CatalogStatements, Resolution, ExplainStatements, DatasetStatements):
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
        if isinstance(st, dsl_ast.Explain):
            rows = self.explain_stmt(st, text, params)
            return self._rows(["plan_type", "plan"], rows)
        if isinstance(st, dsl_ast.SqlStatement):
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
                  engine=bq.engine, precision=bq.precision, regions=bq.regions)
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

        bq = r.bq
        img = r.image = self.catalog.get_image(bq.image)
        progress = Progress(f"occlusion({bq.model}, {bq.image})") \
            if self.options.get("progress") else None
        hooks = self._hooks(profile, progress.update if progress is not None else None)
        kw = self._occlude_kwargs(r)
        r.model.executor.view_cache.set_budget(self.options.get("view_cache", VIEW_CACHE_BUDGET))
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

    def _rewrite(self, st: dsl_ast.SqlStatement, text: str, names: list[str]) -> str:
        """The statement's SQL with each ``occlusion(...)`` call replaced by ``names[i]``."""

        pieces, pos = [], st.start
        for call, name in zip(st.calls, names):
            pieces += [text[pos : call.start], ident(name)]
            pos = call.end
        pieces.append(text[pos : st.end])
        return f"SELECT * FROM {ident(names[0])}" if st.bare_call else "".join(pieces)

    def _sql_error(self, exc: Exception, st: dsl_ast.SqlStatement, text: str, names: list[str]):
        """A DuckDB error in the SQL around the calls, with the internal relation names put
        back as the calls they stand for, positioned at the statement."""
        msg = " ".join(str(exc).split())
        for k, name in enumerate(names):
            call = "occlusion(...)" if len(names) == 1 else f"occlusion(...) #{k + 1}"
            msg = re.sub(rf'"?{re.escape(name)}"?', call, msg)
        return DslBindError(f"in the SQL around occlusion(...): {msg}", text, st.start)

    def _prebind(self, st: dsl_ast.SqlStatement, text: str, params) -> None:
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

    def _run_sql(self, st: dsl_ast.SqlStatement, text: str, params=None, precomputed=None):
        """Bind everything, compute each occlusion(...) call (catalog detached), then in one
        transaction record the runs and run the statement's SQL over their heat maps: a
        statement that fails records nothing."""

        bound = [bind_call(c, text, self.options) for c in st.calls]
        resolved = [self.resolve(bq) for bq in bound]
        self._prebind(st, text, params)
        # a dataset call (images => ...) writes its Parquet results and catalog rows as it
        # goes (resumable); one-image calls are recorded below, all or nothing
        hms = [self._explain_images(r, HEATMAP_SCHEMA)[0] if r.images is not None
               else precomputed[i] if precomputed else self._occlude(r)[0]
               for i, r in enumerate(resolved)]
        self._seq += 1
        names = [f"__krypton_occl_{self._seq}_{k}" for k in range(len(st.calls))]
        record = self.options.get("record_runs", True) and not self.catalog.read_only
        try:
            with (self.catalog.transaction() if record else contextlib.nullcontext()):
                for r, hm in zip(resolved, hms):
                    if record and r.images is None:  # grid and listed positions alike
                        img = r.image if r.image is not None else self.catalog.get_image(r.bq.image)
                        api.record_run(self.catalog, r.model, img,
                                       hm, image_name=r.bq.image, color=r.bq.color,
                                       region=r.bq.region, domain=r.bq.domain)
                for name, r, hm in zip(names, resolved, hms):
                    self.con.register(name, hm if r.images is not None
                                      else self.heatmap_table(r, hm))
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


__all__ = ["DslError", "Engine", "HEATMAP_SCHEMA", "Progress", "ablation",
           "calibrate", "cost_model_path", "force_naive_from", "load_cost_model",
           ]
