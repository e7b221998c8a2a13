"""EXPLAIN / EXPLAIN VERBOSE / EXPLAIN ANALYZE rendering, deterministic and golden-testable.

Invariant: every section is built from ordered ``params`` (key, value) pairs of the plan nodes
(``step_params``) into a ``Section`` (title lines, column names, typed rows, footer lines);
one renderer prints text, one prints JSON, from the same Section. No object ids, no
timestamps, fixed float formatting; the only run-dependent numbers are ANALYZE's timings.

Physical operator names (CamelCase, one per kernel the incremental executor launches):

- ``GatherReadIn``          gather each query's read-in context from the materialized input
                            view with its patch applied (one launch for the whole batch)
- ``CentreCrop``            projective-field threshold: keep the centre of the input patch
- ``BatchedPatchConv2d`` / ``BatchedPatchMaxPool2d`` / ``BatchedPatchAvgPool2d``
                            the layer on every query's context at once, padding 0
- ``Patch<Op>``             a pointwise layer on the patch values only
- ``GatherUnionBox`` + ``PatchAdd|PatchMul|PatchConcat``   merges over the union box
- ``StitchFull``            the patch stitched into the materialized view (full tensor)
- ``Full<Op>``              the layer over the full tensor (after a global-context layer,
                            a disabled rule or ``naive_from``)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from krypton_db.graph import Op

from . import algorithms
from .cost import FEATURES, predict
from .physical import PhysicalPlan, executed_macs, full_operator, physical_steps

# -- formatting ------------------------------------------------------------------------------


def fmt_int(v: int) -> str:
    return f"{int(v):,}"


def fmt_bytes(n: float) -> str:
    """Binary units, fixed precision: ``fmt_bytes(3 * 2**20) == '3.00 MiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def fmt_size(s) -> str:
    return f"{s[0]}x{s[1]}" if s else "full"


def _cell(v, spec: str | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return fmt_int(v)
    if isinstance(v, float):
        return format(v, spec or ".3f") if math.isfinite(v) else str(v)
    return str(v)


def _json_value(v):
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return v


@dataclass
class Section:
    """One EXPLAIN row: ``plan_type`` and its content (text lines and/or a table)."""

    plan_type: str
    title: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    footer: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # column -> float format spec
    align_left: tuple[str, ...] = ("step", "op", "rule", "kind", "kernels", "origin", "layer")
    data: dict = field(default_factory=dict)  # extra structured values for FORMAT JSON

    def text(self) -> str:
        lines = list(self.title)
        if self.columns:
            cells = [[_cell(v, self.formats.get(c)) for c, v in zip(self.columns, r)]
                     for r in self.rows]
            widths = [max([len(c)] + [len(r[i]) for r in cells])
                      for i, c in enumerate(self.columns)]
            left = [c in self.align_left for c in self.columns]

            def line(vals):
                return "  ".join((v.ljust(w) if lf else v.rjust(w))
                                 for v, w, lf in zip(vals, widths, left)).rstrip()

            lines.append(line(self.columns))
            lines.extend(line(r) for r in cells)
        lines.extend(self.footer)
        return "\n".join(lines)

    def json(self) -> dict:
        out: dict = {"plan_type": self.plan_type}
        if self.title:
            out["title"] = self.title
        if self.columns:
            out["rows"] = [dict(zip(self.columns, (_json_value(v) for v in r))) for r in self.rows]
        if self.footer:
            out["notes"] = self.footer
        if self.data:
            out.update(_json_value(self.data))
        return out


def render(sections: list[Section], fmt: str = "text") -> list[tuple[str, str]]:
    """(plan_type, plan) rows; ``fmt="json"``: plan is a JSON document per section."""
    if fmt == "json":
        return [(s.plan_type, json.dumps(s.json(), indent=2)) for s in sections]
    return [(s.plan_type, s.text()) for s in sections]


def same_as_above(plan_type: str) -> Section:
    return Section(plan_type, ["same as above"])


# -- node names --------------------------------------------------------------------------------

def step_op(ds) -> str:
    return ds.node.op.name + ("+" + ds.fused.op.name if ds.fused is not None else "")


def rule_name(ds, disabled=frozenset()) -> str:
    r = ds.rule
    if getattr(r, "forced", False):
        return "NaiveFrom"
    if type(r).__name__ == "DeltaRule":  # the fallback (missing or disabled rule)
        return "FullRecompute(disabled)" if ds.node.op in disabled else "FullRecompute"
    return type(r).__name__


# -- sections ----------------------------------------------------------------------------------


def logical_section(statements: list[str], header: list[str], full: bool, keep: int) -> Section:
    """The layers as SQL views (``sqlviews.graph_to_sql``), abbreviated unless ``full``."""
    n = len(statements)
    if full or n <= 2 * keep:
        shown = statements
        body = [s.rstrip() + ";" for s in shown]
    else:
        body = [s.rstrip() + ";" for s in statements[:keep]]
        body.append(f"-- ... {n - 2 * keep} more views (SET explain_full_views = true shows all)")
        body += [s.rstrip() + ";" for s in statements[-keep:]]
    return Section("logical_plan", header + [f"-- {n} views over relation x_input(n, c, y, x, v)"]
                   + body)


def step_params(ds, verbose: bool = False, disabled=frozenset()) -> list[tuple[str, object]]:
    """Ordered params of one delta step (what EXPLAIN prints for it)."""
    p = [("step", ds.node.name), ("op", step_op(ds)), ("rule", rule_name(ds, disabled)),
         ("kind", ds.kind), ("out patch", fmt_size(ds.out_size)),
         ("read-in", fmt_size(ds.read_in) if ds.read_in else "-"),
         ("MACs full", ds.macs_full), ("MACs incr", ds.macs_inc),
         ("tau cap", f"{fmt_size(ds.cap)} crop {fmt_size(ds.crop)}" if ds.cap else "-")]
    if verbose:
        p.append(("origin", getattr(ds.rule, "origin", "") or "-"))
    return p


def delta_section(plan, verbose: bool = False, disabled=frozenset(),
                  plan_type: str = "delta_plan") -> Section:
    ph, pw = plan.patch
    regions = plan.regions_run
    rows, cols = [], []
    for ds in plan.steps:
        params = step_params(ds, verbose, disabled)
        cols = [k for k, _ in params]
        rows.append([v for _, v in params])
    return Section(
        plan_type,
        [f"DeltaPlan {plan.graph.name}: patch {ph}x{pw}, tau {plan.tau:g}, "
         f"{len(plan.steps)} steps, regions {regions}"],
        cols, rows,
        [f"total MACs full {fmt_int(plan.macs_full)}  incremental {fmt_int(plan.macs_inc)}  "
         f"theoretical speedup {plan.theoretical_speedup:.2f}x"]
        + (["regions position: each batch runs its windowed steps at its queries' exact boxes "
            "(clipped at borders), no larger than the out patch sizes above"]
           if regions == "position" else []),
        data=dict(theoretical_speedup=plan.theoretical_speedup, macs_full=plan.macs_full,
                  macs_incremental=plan.macs_inc, tau=plan.tau, regions=regions))


def conv_algorithms_line(graph) -> str:
    """How many convs run each CPU algorithm at full size (``algorithms.conv_algorithm``; the
    model's precision choice caps them, README "Precision")."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op is Op.CONV:
            a = algorithms.conv_algorithm(n)
            counts[a] = counts.get(a, 0) + 1
    order = ("winograd4", "winograd2", "winograd1d", "direct")
    return "conv algorithms " + (", ".join(f"{a} {counts[a]}" for a in order if a in counts)
                                 or "none")


def channels_last_line(graph, mode: str) -> str | None:
    """The dense CPU executor's channels-last steps (``physical.channels_last_steps``) for the
    full inferences a plan runs (every batch in naive mode; otherwise the materialized views,
    which ask for every value, so no 1x1 + depthwise pair runs fused there, and the Full<Op>
    steps, which run in the dense plan's layout); None when the whole network runs CNHW."""
    dense = PhysicalPlan.lower(graph)
    if not dense.channels_last:
        return None
    pairs = len(dense.pointwise_depthwise) if mode == "naive" else 0
    where = "full inference" if mode == "naive" else "MaterializeViews and Full steps"
    return (f"{where}: {len(dense.channels_last)} of {len(dense.steps)} steps channels-last (NHWC)"
            + (f", fused 1x1 + depthwise pairs {pairs}" if pairs else ""))


def physical_section(plan, mode: str, batch: int, per_query: int, positions: int, device: str,
                     threads: int | None = None, plan_type: str = "physical_plan") -> Section:
    nb = -(-positions // max(batch, 1))
    if mode == "naive":
        title = [f"BatchedFullInference on {device}: batch {batch}, {nb} batches for "
                 f"{positions} positions, buffers {fmt_bytes(per_query * batch)} "
                 f"({fmt_bytes(per_query)} per query)", "OccludeCopy -> full network per batch"]
        rows = [[ds.node.name, step_op(ds), full_operator(ds).kernels[0]] for ds in plan.steps]
    else:
        title = [f"BatchedIncrementalInference on {device}: batch {batch}, {nb} batches for "
                 f"{positions} positions, buffers {fmt_bytes(per_query * batch)} "
                 f"({fmt_bytes(per_query)} per query)",
                 "MaterializeViews (one full inference of the unoccluded image) -> per batch:"]
        steps = physical_steps(plan, "gpu" if device in ("gpu", "cuda") else "cpu")
        rows = [[op.delta.node.name, step_op(op.delta), " -> ".join(op.kernels)] for op in steps]
    foot = []
    if device == "cpu":
        foot.append(conv_algorithms_line(plan.graph))
        layout = channels_last_line(plan.graph, mode)
        if layout is not None:
            foot.append(layout)
    if mode != "naive":
        executed = sum(executed_macs(op) for op in steps)
        gap = [op.delta.node.name for op in steps
               if op.delta.out_size is not None
               and tuple(op.delta.out_size) != tuple(op.delta.node.shape[1:]) and not op.out_patch]
        foot.append(f"executed MACs per query {fmt_int(executed)} (delta plan "
                    f"{fmt_int(plan.macs_inc)}, full {fmt_int(plan.macs_full)})")
        if gap:
            foot.append(f"note: {len(gap)} steps the delta plan maintains as patches run in "
                        f"full (an input arrives as a full tensor), first {gap[0]}")
    return Section(plan_type, title, ["step", "op", "kernels"], rows, foot,
                   data=dict(batch_size=batch, batches=nb, bytes_per_query=per_query,
                             buffer_bytes=per_query * batch, device=device, mode=mode))


def estimate_section(plan, mode: str, positions: float, cost: dict, note: str = "",
                     batch: int = 128) -> Section:
    """Theoretical speedup and the predicted runtime of ``planner.cost`` (per-step costs summed
    over the batches, plus materializing the views)."""

    pr = predict(plan, mode, positions, batch, cost)
    coef = cost["coef"]
    nb = -(-int(math.ceil(positions)) // max(batch, 1))
    lines = [f"positions {positions:g}{note}",
             f"MACs per query: full {fmt_int(plan.macs_full)}, incremental "
             f"{fmt_int(plan.macs_inc)}",
             f"theoretical speedup {plan.theoretical_speedup:.2f}x",
             "cost model: per step and batch of B queries, seconds = B * ("
             + " + ".join(f"{coef[k]:.3e} * {k}" for k in FEATURES[:-1])
             + f") + {coef['step']:.3e}  [{cost.get('source', 'defaults')}]",
             f"predicted runtime {pr['predicted_s']:.3f} s ({mode}"
             + (f": materialize {pr['materialize_s']:.3f} s + {nb} batches of <= {batch}"
                if mode != "naive" else "") + f"); naive re-inference {pr['naive_s']:.3f} s"]
    return Section("estimate", lines, data=dict(
        positions=positions, theoretical_speedup=plan.theoretical_speedup,
        predicted_s=pr["predicted_s"], predicted_naive_s=pr["naive_s"],
        cost_model={k: f"{v:.4e}" for k, v in coef.items()}))


def analyze_section(plan, positions: int, step_secs: dict, t: dict,
                    mode: str = "exact") -> Section:
    """Measured time per step (sum of batches), share, achieved GFLOP/s (2 FLOPs per MAC)."""
    total_layers = sum(step_secs.get(ds.node.name, 0.0) for ds in plan.steps)
    rows = []
    steps = physical_steps(plan) if mode != "naive" else [full_operator(ds) for ds in plan.steps]
    for op in steps:
        ds, ks = op.delta, op.kernels
        s = step_secs.get(ds.node.name, 0.0)
        flops = 2.0 * executed_macs(op) * positions
        rows.append([ds.node.name, step_op(ds), " -> ".join(ks), s,
                     100.0 * s / total_layers if total_layers else 0.0,
                     flops / s / 1e9 if flops and s > 0 else None])
    wall = t["wall_s"]
    run = wall - t["jit_s"]  # the measured run's own JIT share (0 after the warm-up)
    covered = total_layers + t["materialize_s"]
    foot = [f"JIT / warm-up            {t.get('warmup_s', 0.0) + t['jit_s']:.4f} s (apart: "
            "compile + one position, before the measured run)",
            f"materialize views        {t['materialize_s']:.4f} s"
            + (" (reused from the view cache)" if t.get("views") == "cached" else ""),
            f"layers (sum of steps)    {total_layers:.4f} s",
            f"other (batching, softmax, catalog) {max(run - covered, 0.0):.4f} s",
            f"query wall time          {wall:.4f} s; without JIT {run:.4f} s; "
            f"materialize + layers cover {100.0 * covered / max(run, 1e-12):.1f}%"]
    if t.get("naive_per_query_s"):
        meas = t["naive_per_query_s"] / max(t["inc_per_query_s"], 1e-12)
        foot.append(f"measured speedup {meas:.2f}x over naive re-inference (sampled on "
                    f"{t['naive_sample']} positions) vs theoretical "
                    f"{plan.theoretical_speedup:.2f}x")
    if t.get("sql_rows") is not None:
        foot.append(f"SQL over the heat map: {t['sql_rows']} rows in {t['sql_s']:.4f} s")
    return Section("analyze", [f"EXPLAIN ANALYZE: {positions} positions"],
                   ["step", "op", "kernels", "time s", "% layers", "GFLOP/s"], rows, foot,
                   formats={"time s": ".4f", "% layers": ".1f", "GFLOP/s": ".2f"},
                   data=dict(t, layers_s=total_layers))


def ablation_section(rows: list[dict], positions: int, sample: int) -> Section:
    """Per layer: theoretical speedup (MACs) vs measured (full vs incremental time per query)."""
    cols = ["step", "op", "rule", "MACs full", "MACs incr", "theory x", "full ms/q",
            "incr ms/q", "measured x"]
    table = [[r["step"], r["op"], r["rule"], r["macs_full"], r["macs_inc"], r["theory"],
              r["full_ms"], r["inc_ms"], r["measured"]] for r in rows]
    tf = sum(r["full_ms"] for r in rows)
    ti = sum(r["inc_ms"] for r in rows)
    return Section("ablation", [f"per-layer ablation: incremental over {positions} positions, "
                                f"full recompute over {sample} occluded images"],
                   cols, table,
                   [f"total full {tf:.3f} ms/query, incremental {ti:.3f} ms/query, measured "
                    f"{tf / max(ti, 1e-12):.2f}x"],
                   formats={"theory x": ".2f", "full ms/q": ".3f", "incr ms/q": ".3f",
                            "measured x": ".2f"})
