"""EXPLAIN [VERBOSE | ANALYZE [ABLATION]] [FORMAT TEXT | JSON | SQL] of occlusion queries: a
part of :class:`krypton_db.query.Engine`."""

from __future__ import annotations

import time

import numpy as np

from .approx import DEFAULT_SPEEDUP
from .errors import KryptonError
from .exec import view_cache
from .graph import Op
from .hooks import OcclusionHooks
from .occlusion import occlude as _occ
from .planner import explain
from .planner.cost import load_cost_model
from .planner.delta_sql import compile_delta_sql
from .query_resolve import Resolved
from .sql.dsl import ast as dsl_ast
from .sql.dsl import bind_call
from .sqlviews import graph_to_sql


class ExplainStatements:
    """EXPLAIN sections of a statement's occlusion calls."""

    # -- EXPLAIN ---------------------------------------------------------------------------------
    def explain_stmt(self, st: dsl_ast.Explain, text: str, params=None) -> list[tuple[str, str]]:
        sections: list = []
        if st.format == "sql":
            return explain.render([self._delta_sql_section(call, text, k, len(st.inner.calls))
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
                        sec = explain.Section(pt, [val])
                    elif name == "lower":
                        sec = self._physical(r, pt)
                    elif bq.mode == "naive" and name != "plan_deltas":
                        sec = explain.Section(pt, ["mode naive: no delta plan is maintained"])
                    else:
                        sec = explain.delta_section(val, True, disabled, pt)
                    body = sec.text().split("\n", 1)[-1] if name in ("apply_tau",
                                                                     "force_naive_from") else None
                    if prev is not None and body is not None and body == prev:
                        sec = explain.same_as_above(pt)
                    elif name in ("plan_deltas", "apply_tau", "force_naive_from"):
                        prev = sec.text().split("\n", 1)[-1]
                    sections.append(sec)
            sections += self._plan_sections(r, prefix, st.verbose, disabled)
            if st.analyze:
                sections += self._analyze(r, st, text, params, prefix)
        return explain.render(sections, st.format)

    def _delta_sql_section(self, call, text: str, k: int, calls: int):
        """EXPLAIN (FORMAT SQL): the call's delta queries over the materialized views."""

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
        return explain.Section(f"{prefix}delta queries (SQL)", dsql.script().rstrip("\n").split("\n"))

    def _disabled_ops(self):
        return [Op(v) for v in self.options.get("disable_rule", ())]

    def _physical(self, r: Resolved, plan_type: str):
        return explain.physical_section(r.plan, r.bq.mode, r.batch, r.per_query, r.positions,
                                  r.bq.device, plan_type=plan_type)

    def _plan_sections(self, r: Resolved, prefix: str, verbose: bool, disabled) -> list:
        bq = r.bq
        try:
            views = graph_to_sql(r.graph)
        except KryptonError as exc:
            views = [f"-- no relational form: {exc}"]
        logical = explain.logical_section(views, [bq.describe()],
                                    bool(self.options.get("explain_full_views", False)),
                                    int(self.options.get("explain_views", 3)))
        logical.plan_type = prefix + logical.plan_type
        out = [logical]
        if bq.mode != "naive":
            out.append(explain.delta_section(r.plan, verbose, disabled, prefix + "delta_plan"))
        out.append(self._physical(r, prefix + "physical_plan"))
        n: float = r.positions
        note = ""
        if bq.drilldown is not None:

            sp = bq.drilldown.get("speedup", DEFAULT_SPEEDUP)
            n = round(r.positions / sp, 1)
            note = f" (drill-down target {sp:g}x fewer than {r.positions})"
        est = explain.estimate_section(r.plan, bq.mode, n, load_cost_model(), note, r.batch)
        est.plan_type = prefix + est.plan_type
        out.append(est)
        if r.images is not None:
            out.append(self._dataset_section(r, est.data["predicted_s"], prefix))
        return out

    def _dataset_section(self, r: Resolved, per_image_s: float, prefix: str):
        """A dataset query: how many images, where the results go, the estimated total."""
        bq = r.bq
        n = len(r.images)
        out = bq.out or self._default_out(bq)
        lines = [f"images {n} ({bq.images}); each runs the plan above",
                 f"results: Parquet parts under {out} (resumable), one dataset_runs row "
                 f"per image in the catalog",
                 f"estimated total {n * per_image_s:.1f} s on this machine "
                 f"({per_image_s:.3f} s per image, decoding overlapped)"]
        if bq.backend == "ray":
            lines.append("backend ray: about that total times this machine's CPUs over the "
                         "cluster's, plus the actors' start (model load, JIT) once each"
                         + (f"; {bq.workers} workers" if bq.workers else ""))
        return explain.Section(prefix + "dataset", lines, data=dict(
            images=n, per_image_s=per_image_s, predicted_total_s=n * per_image_s,
            backend=bq.backend, out=out))

    def _analyze(self, r: Resolved, st: dsl_ast.Explain, text: str, params, prefix: str) -> list:
        bq = r.bq
        if r.images is not None:
            raise bq.error("EXPLAIN ANALYZE measures one image's run; for images => ... use "
                           "EXPLAIN (the estimate) or run it (the result's timings land in "
                           "the catalog's dataset_runs)", "images")
        # JIT apart: compile the executor's and the incremental kernels on one position first
        t0 = time.perf_counter()
        img = self.catalog.get_image(bq.image)
        # (the warm-up keeps no views: the measured run materializes them unless an earlier
        # query of this image left them in the model's view cache)
        with self.catalog.suspended(), view_cache.paused():
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
                 materialize_s=hooks.materialize_s, views=hm.stats.get("views"))
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
        sec = explain.analyze_section(r.plan, r.positions, step_secs, t, bq.mode)
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

        rows = []
        n = max(r.positions, 1)
        for ds in r.plan.steps:
            inc_ms = 1e3 * step_secs.get(ds.node.name, 0.0) / n
            full_ms = 1e3 * (full or {}).get(ds.node.name, 0.0)
            rows.append(dict(step=ds.node.name, op=explain.step_op(ds), rule=explain.rule_name(ds),
                             macs_full=ds.macs_full, macs_inc=ds.macs_inc,
                             theory=ds.macs_full / ds.macs_inc if ds.macs_inc else None,
                             full_ms=full_ms, inc_ms=inc_ms,
                             measured=full_ms / inc_ms if inc_ms > 0 and full_ms > 0 else None))
        sec = explain.ablation_section(rows, r.positions, k)
        sec.plan_type = prefix + sec.plan_type
        return sec
