"""The IVM rewrite as SQL: per layer view, the delta query that computes the layer's changed
cells for every occlusion query from the materialized view tables and its inputs' deltas.

This is the relational reference of the delta rules (``planner/ivm``) and the form an IVM
researcher reads and changes: one template per rule kind in ``sql/deltas/`` (window rules have
one per layer type), rendered over the layer views of :func:`krypton_db.sqlviews.compile_graph`.

Relations, besides the views and weight tables (views materialized as tables for the
unoccluded image, ``n = 0``):

- ``q_positions(n, y, x)``: query ``n``'s patch position; ``q_queries(n)``; ``q_patch(c, v)``:
  the patch colour per channel, in model-input units.
- ``d_<view>``: the delta relation of ``<view>``, same columns, ``n`` the query: per query the
  occluded image's value of every cell in the layer's changed region (every channel of each
  changed position), or of every cell when the rule makes the whole layer change ("full").

Invariant: for every query, a delta relation's cells outside the region it holds equal the
materialized view; so any layer's output for the occluded image is its view with the delta
stitched in, and the output layer's delta (always full) is the query's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from krypton_db.errors import InputError
from krypton_db.graph import Graph, Op, ops_with_rule
from krypton_db.sqlviews import SqlPlan, compile_graph, ident, render

from .ivm import rule_for

POSITIONS_TABLE = "q_positions"
QUERIES_TABLE = "q_queries"
PATCH_TABLE = "q_patch"

# view templates each rule kind can maintain incrementally; any other view of a layer falls
# back to the global rule (stitch the delta into the view, rerun the layer in full)
# (a pointwise or merge op's view template is named after it: views/<op value>.sql)
WINDOW_TEMPLATES = frozenset({"conv2d", "maxpool2d", "avgpool2d"})
POINTWISE_TEMPLATES = frozenset(op.value for op in ops_with_rule("pointwise"))
MERGE_TEMPLATES = frozenset(op.value for op in ops_with_rule("merge"))


@dataclass
class DeltaView:
    name: str        # the delta relation (a table per batch of queries)
    view: str        # the layer view it maintains
    node: str        # graph node
    rule: str        # input | window | pointwise | merge | global (| full: all inputs full)
    template: str    # "deltas/<name>" or "views/<name>"
    full: bool       # every cell of the layer, per query
    sql: str


@dataclass
class DeltaSql:
    """Delta queries of one occlusion query shape (patch size), in dependency order."""

    views: SqlPlan
    patch: tuple[int, int]
    deltas: list[DeltaView] = field(default_factory=list)
    delta_of: dict[str, str] = field(default_factory=dict)  # view -> its delta relation
    output: str = ""  # delta relation of the graph output (full)

    @property
    def graph(self) -> Graph:
        return self.views.graph

    def statements(self) -> list[str]:
        """One ``CREATE OR REPLACE TEMP TABLE`` per delta relation (each computed once per
        batch of queries: a delta read by two layers is not recomputed)."""
        return [f"CREATE OR REPLACE TEMP TABLE {ident(d.name)} AS\n{d.sql}" for d in self.deltas]

    def script(self) -> str:
        """The whole rewrite as one commented SQL script (what ``EXPLAIN (FORMAT SQL)`` shows)."""
        ph, pw = self.patch
        head = [f"-- delta queries of {self.graph.name}: patch {ph}x{pw}, "
                f"{len(self.deltas)} delta relations over {len(self.views.views)} materialized views",
                f"-- inputs per batch: {POSITIONS_TABLE}(n, y, x), {QUERIES_TABLE}(n), "
                f"{PATCH_TABLE}(c, v); answer: {self.output}(n, k, v)"]
        out = ["\n".join(head)]
        for d, stmt in zip(self.deltas, self.statements()):
            extent = "every cell" if d.full else "changed cells"
            out.append(f"-- {d.node} [{d.rule} rule, {d.template}, {extent}]\n{stmt};")
        return "\n\n".join(out) + "\n"

    __str__ = script


class _DeltaCompiler:
    def __init__(self, graph: Graph, patch: tuple[int, int], disabled: frozenset):
        self.views = compile_graph(graph)
        self.out = DeltaSql(self.views, patch)
        self.disabled = disabled
        self.full: dict[str, bool] = {}
        self.view_names = {v.name for v in self.views.views}

    def add(self, view, name: str, rule: str, tmpl: str, folder: str, rels: dict,
            params: dict | None, full: bool) -> str:
        sql = render(tmpl, rels, params, folder)
        self.out.deltas.append(DeltaView(name, view.name, view.node, rule, f"{folder}/{tmpl}",
                                         full, sql))
        self.full[name] = full
        return name

    def compile(self) -> DeltaSql:
        g = self.views.graph
        layer_views = set(self.views.view_of.values())
        for v in self.views.views:
            if v.name not in layer_views and "__" not in v.name:
                continue  # the probabilities view added after the graph: not a layer
            self.view(v, g[v.node])
        out_view = next(v for v in self.views.views if v.name == self.views.view_of[g.output])
        d_out = self.out.delta_of[out_view.name]
        if not self.full[d_out]:  # a graph ending in a local layer: answer with whole tensors
            d_out = self._patched_all(out_view, d_out, out_view.name, len(g[g.output].shape))
        self.out.output = d_out
        return self.out

    def view(self, v, node) -> None:
        d = f"d_{v.name}"
        ops = {k: r for k, r in v.rels.items() if r in self.view_names}
        deltas = {k: self.out.delta_of[r] for k, r in ops.items()}
        if node.op is Op.INPUT:
            self.out.delta_of[v.name] = self.add(
                v, d, "input", "input", "deltas", {"P": POSITIONS_TABLE, "C": PATCH_TABLE},
                {"patch_h": self.out.patch[0], "patch_w": self.out.patch[1]}, False)
            return
        kind = rule_for(node.op, self.disabled).kind
        if all(self.full[dr] for dr in deltas.values()):
            # the whole input changed: the layer's own view over its inputs' deltas
            name = self.add(v, d, kind if kind == "global" else "full", v.template, "views",
                            {**v.rels, **deltas}, v.params, True)
        elif kind == "window" and v.template in WINDOW_TEMPLATES:
            rels = {"D": deltas["X"], "X": v.rels["X"]}
            if v.template == "conv2d":
                rels.update(Y=v.name, W=v.rels["W"])
            name = self.add(v, d, "window", v.template, "deltas", rels, v.params, False)
        elif kind == "pointwise" and v.template in POINTWISE_TEMPLATES:
            name = self.add(v, d, "pointwise", v.template, "views", {**v.rels, **deltas},
                            v.params, False)
        elif kind == "merge" and self._mergeable(v, node):
            pos = self.add(v, f"{d}__pos", "merge", "changed_positions", "deltas",
                           {"A": deltas["A"], "B": deltas["B"]}, None, False)
            rels = dict(v.rels)
            for k in ("A", "B"):
                rels[k] = self.add(v, f"{d}__{k.lower()}", "merge", "patched", "deltas",
                                   {"P": pos, "D": deltas[k], "X": v.rels[k]}, None, False)
            name = self.add(v, d, "merge", v.template, "views", rels, v.params, False)
        else:  # global (also: a rule switched off, a view no local rule covers)
            rels = dict(v.rels)
            for j, (k, r) in enumerate(sorted(ops.items())):
                dr = deltas[k]
                rels[k] = dr if self.full[dr] else self._patched_all(
                    v, dr, r, len(self.views.graph[self._node_of(r)].shape), f"{d}__in{j}")
            name = self.add(v, d, "global", v.template, "views", rels, v.params, True)
        self.out.delta_of[v.name] = name

    def _node_of(self, view_name: str) -> str:
        return next(v.node for v in self.views.views if v.name == view_name)

    def _patched_all(self, v, delta: str, view: str, rank: int, name: str | None = None) -> str:
        tmpl = "patched_all" if rank == 3 else "patched_all_vec"
        return self.add(v, name or f"{delta}__all", "global", tmpl, "deltas",
                        {"Q": QUERIES_TABLE, "D": delta, "X": view}, None, True)

    def _mergeable(self, v, node) -> bool:
        """A merge of two feature maps over the same positions (no broadcast axis): local."""
        if len(node.shape) != 3 or set(v.rels) != {"A", "B"}:
            return False
        if v.template == "concat":
            return True
        return all(v.params.get(f"join_{ax}") == 1 for ax in "yx") and v.params.get("join_c") in (0, 1)


def compile_delta_sql(graph: Graph, patch: tuple[int, int],
                      disabled: frozenset = frozenset()) -> DeltaSql:
    """The delta queries of an exact occlusion query with a ``patch``-sized patch over
    ``graph``; ``disabled`` layer types use the global rule (full recompute), as in
    :func:`~krypton_db.planner.delta_plan.plan_occlusion`."""
    ph, pw = (int(patch[0]), int(patch[1]))
    c, h, w = graph.input_shape
    if not (1 <= ph <= h and 1 <= pw <= w):
        raise InputError(f"patch {ph}x{pw} must fit the model input {h}x{w}")
    return _DeltaCompiler(graph, (ph, pw), frozenset(disabled)).compile()
