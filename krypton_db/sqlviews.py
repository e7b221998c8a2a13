"""CNN layers as SQL join-aggregate views over tensor relations, executed by DuckDB.

Invariant: every view is one rendered template from ``sql/views/<layer>.sql`` (installed as
``krypton_db.sql``), and the renderer only ever splices in (a) identifiers matching
``^[A-Za-z_][A-Za-z0-9_]*$``, always double-quoted, for relations we name ourselves, and (b)
numeric literals formatted from Python numbers. User-facing strings never reach SQL text; they
travel as prepared-statement parameters (see ``catalog.py``). A template's placeholders are
exactly the inputs and params of its metadata header, so a missing or stray value is an error,
not a silently different query.

A graph compiles to one view per node (``l007_conv1`` for node 7 ``conv1``; helper views for
N-ary merges and vector outputs carry a ``__p<k>`` suffix) over an input table ``x_input`` and
per-layer weight tables ``<view>__w`` / ``__b`` / ``__s`` loaded through Arrow. Feature maps
are ``(n, c, y, x, v)`` relations, vectors ``(n, k, v)`` (see ``relation.py``).
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from dataclasses import dataclass, field

import numpy as np

from . import relation
from .errors import KryptonError
from .graph import ACTIVATIONS, OPS, Graph, Node, Op
from .sqltext import IDENT_RE, SqlIdentifierError, ident, literal

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
INPUT_TABLE = "x_input"


class SqlUnsupportedError(KryptonError, NotImplementedError):
    """A layer configuration has no relational view (yet)."""


# -- templates ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    name: str
    inputs: tuple[str, ...]   # relation placeholders, e.g. ("X", "W", "B")
    params: tuple[str, ...]   # numeric placeholders
    output: str
    header: dict[str, str]
    body: str

    def render(self, rels: dict[str, str], params: dict | None = None) -> str:
        """Fill the placeholders: relations by validated quoted identifiers, params by literals."""
        params = params or {}
        if set(rels) != set(self.inputs):
            raise ValueError(f"template {self.name} takes relations {self.inputs}, "
                             f"got {sorted(rels)}")
        if set(params) != set(self.params):
            missing = set(self.params) - set(params)
            extra = set(params) - set(self.params)
            raise ValueError(f"template {self.name}: missing params {sorted(missing)}, "
                             f"unknown params {sorted(extra)}")
        values = {k: ident(v) for k, v in rels.items()}
        values.update({k: literal(v) for k, v in params.items()})
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.body)


def _parse(name: str, text: str, folder: str = "views") -> Template:
    header: dict[str, str] = {}
    body_lines = []
    in_header = True
    for line in text.splitlines():
        m = re.match(r"^--\s*(name|inputs|params|output):\s*(.*)$", line)
        if in_header and m:
            header[m.group(1)] = m.group(2).strip()
            continue
        if in_header and line.startswith("--"):
            continue  # prose comments of the header
        in_header = False
        body_lines.append(line)
    if header.get("name") != name:
        raise ValueError(f"sql/{folder}/{name}.sql: header '-- name:' must be {name!r}")
    inputs = tuple(m.group(1) for m in re.finditer(r"([A-Za-z_]\w*)\(", header.get("inputs", "")))
    params = tuple(p.strip() for p in header.get("params", "").split(",") if p.strip())
    body = "\n".join(body_lines).strip()
    used = set(_PLACEHOLDER.findall(body))
    if used != set(inputs) | set(params):
        raise ValueError(f"sql/{folder}/{name}.sql: placeholders {sorted(used)} differ from the "
                         f"header's inputs {inputs} and params {params}")
    return Template(name, inputs, params, header.get("output", ""), header, body)


TEMPLATE_FOLDERS = ("views", "deltas")  # layer views; the IVM rules' delta queries


# An activation's view is its graph.OPS row's value expression (over v as DOUBLE), so the op's
# row is the one place that knows it; every other view is a file in sql/views/.
_ACTIVATION_SQL = {op.value: info for op, info in OPS.items() if info.sql is not None}


def _activation_template(name: str) -> Template:
    info = _ACTIVATION_SQL[name]
    text = (f"-- name: {name}\n-- inputs: X(*,v)\n-- params: {', '.join(info.act_params)}\n"
            f"-- output: (*,v)\n-- {info.display}, from graph.OPS (computed in DOUBLE)\n"
            f"SELECT * REPLACE (CAST({info.sql} AS FLOAT) AS v)\n"
            "FROM (SELECT * REPLACE (CAST(v AS DOUBLE) AS v) FROM {X})")
    return _parse(name, text, "views")


@functools.cache
def template(name: str, folder: str = "views") -> Template:
    """The parsed template ``sql/<folder>/<name>.sql`` (folder ``views`` or ``deltas``), or an
    activation's view from its ``graph.OPS`` row."""
    if not IDENT_RE.fullmatch(name) or folder not in TEMPLATE_FOLDERS:
        raise ValueError(f"bad template {folder}/{name!r}")
    if folder == "views" and name in _ACTIVATION_SQL:
        return _activation_template(name)
    res = importlib.resources.files("krypton_db.sql").joinpath(folder, f"{name}.sql")
    if not res.is_file():
        raise SqlUnsupportedError(f"no template sql/{folder}/{name}.sql")
    return _parse(name, res.read_text(encoding="utf-8"), folder)


def template_names(folder: str = "views") -> list[str]:
    d = importlib.resources.files("krypton_db.sql").joinpath(folder)
    names = {p.name[:-4] for p in d.iterdir() if p.name.endswith(".sql")}
    return sorted(names | set(_ACTIVATION_SQL) if folder == "views" else names)


def render(name: str, rels: dict[str, str], params: dict | None = None,
           folder: str = "views") -> str:
    """Render template ``sql/<folder>/<name>.sql`` (see :meth:`Template.render`)."""
    return template(name, folder).render(rels, params)


# -- graph -> views -------------------------------------------------------------------------

def sanitize(name: str, limit: int = 40) -> str:
    """A node name as an identifier fragment: lower case, runs of other characters -> '_'.

    >>> sanitize("conv1/7x7_s2:0")
    'conv1_7x7_s2_0'
    """
    s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:limit].strip("_")
    return s or "node"


@dataclass
class ViewDef:
    name: str        # view (or table) name, a validated identifier
    node: str        # graph node it belongs to
    sql: str         # the SELECT body
    template: str = ""   # the sql/views template it renders ...
    rels: dict = field(default_factory=dict)    # ... with these relations
    params: dict = field(default_factory=dict)  # ... and numbers (the delta compiler reuses them)


@dataclass
class SqlPlan:
    """The relational form of a graph: views in dependency order plus weight tables."""

    graph: Graph
    input_table: str
    views: list[ViewDef] = field(default_factory=list)
    view_of: dict[str, str] = field(default_factory=dict)
    # table name -> (tensor, relation column names), or a ready Arrow table
    weights: dict[str, object] = field(default_factory=dict)
    probs_view: str = ""

    def statements(self, materialize: bool = False) -> list[str]:
        """``CREATE VIEW`` (or ``CREATE TABLE ... AS``) statements, one per view, in order."""
        kind = "TABLE" if materialize else "VIEW"
        return [f"CREATE OR REPLACE {kind} {ident(v.name)} AS\n{v.sql}" for v in self.views]

    def load_weights(self, con) -> None:
        for tname, w in self.weights.items():
            if isinstance(w, tuple):
                relation.store(con, tname, *w)
            else:
                relation.store_arrow(con, tname, w)

    def load_input(self, con, batch: np.ndarray) -> None:
        relation.store(con, self.input_table, np.asarray(batch, np.float32))

    def install(self, con, batch: np.ndarray, materialize: bool = False) -> None:
        """Load weights and the input batch, then create every view (or table)."""
        self.load_weights(con)
        self.load_input(con, batch)
        for stmt in self.statements(materialize):
            con.execute(stmt)

    def fetch(self, con, node: str, batch_size: int) -> np.ndarray:
        """Read one node's relation back as a float32 batch."""
        return relation.load(con, self.view_of[node], (batch_size,) + tuple(self.graph[node].shape))


class _Compiler:
    def __init__(self, graph: Graph, input_table: str, prefix: str):
        ident(input_table)
        self.plan = SqlPlan(graph, input_table)
        self.prefix = prefix

    def view(self, node: Node, name: str, tmpl: str, rels: dict, params: dict | None = None):
        self.plan.views.append(ViewDef(name, node.name, render(tmpl, rels, params), tmpl,
                                       dict(rels), dict(params or {})))
        return name

    def weight(self, name: str, arr, names: tuple[str, ...]) -> str:
        self.plan.weights[name] = (np.asarray(arr), names)
        return name

    def compile(self) -> SqlPlan:
        g = self.plan.graph
        for i, node in enumerate(g.nodes):
            vname = f"{self.prefix}l{i:03d}_{sanitize(node.name)}"
            ident(vname)
            if len(node.shape) not in (1, 3):
                raise SqlUnsupportedError(
                    f"{node.name}: per-sample shape {node.shape} has no relation schema "
                    f"(feature maps (C,H,W) and vectors (K,) only)")
            self.node(node, vname)
            self.plan.view_of[node.name] = vname
        out = g[g.output]
        if out.op is Op.SOFTMAX:
            self.plan.probs_view = self.plan.view_of[out.name]
        elif len(out.shape) == 1:
            self.plan.probs_view = self.view(out, f"{self.prefix}probs", "softmax",
                                             {"X": self.plan.view_of[out.name]})
        return self.plan

    def node(self, node: Node, v: str) -> None:  # noqa: C901 - one branch per op, flat
        g, op, p = self.plan.graph, node.op, node.params
        ins = [self.plan.view_of[i] for i in node.inputs]
        in_shapes = [g[i].shape for i in node.inputs]
        if op is Op.INPUT:
            self.view(node, v, "identity", {"X": self.plan.input_table})
        elif op is Op.CONV:
            w, b = node.weights["W"], node.weights["B"]
            o, cg = w.shape[:2]
            groups = p["groups"]
            self.view(node, v, "conv2d", {
                "X": ins[0], "W": self.weight(f"{v}__w", w, relation.SCHEMAS["conv_w"]),
                "B": self.weight(f"{v}__b", b, relation.SCHEMAS["bias"]),
            }, {
                "stride_h": p["stride"][0], "stride_w": p["stride"][1],
                "pad_t": p["pads"][0], "pad_l": p["pads"][1],
                "dil_h": p["dilation"][0], "dil_w": p["dilation"][1],
                "c_in_group": cg, "c_out_group": o // groups,
                "H_out": node.shape[1], "W_out": node.shape[2],
            })
        elif op in (Op.MAXPOOL, Op.AVGPOOL):
            t, l, bo, r = p["pads"]
            params = {"kernel_h": p["kernel"][0], "kernel_w": p["kernel"][1],
                      "stride_h": p["stride"][0], "stride_w": p["stride"][1],
                      "pad_t": t, "pad_l": l, "H_out": node.shape[1], "W_out": node.shape[2]}
            if op is Op.AVGPOOL:
                params.update(pad_b=bo, pad_r=r, H_in=in_shapes[0][1], W_in=in_shapes[0][2],
                              include_pad=int(bool(p["count_include_pad"])))
            self.view(node, v, "maxpool2d" if op is Op.MAXPOOL else "avgpool2d",
                      {"X": ins[0]}, params)
        elif op is Op.GLOBAL_AVGPOOL:
            if len(node.shape) == 3:
                self.view(node, v, "global_avgpool", {"X": ins[0]})
            else:  # keepdims=False: the (C, 1, 1) map flattened to (n, k, v)
                mid = self.view(node, f"{v}__p0", "global_avgpool", {"X": ins[0]})
                self.view(node, v, "flatten", {"X": mid}, {"H": 1, "W": 1})
        elif op in ACTIVATIONS:  # views/<op>.sql; its params are the node's params of that name
            self.view(node, v, op.value, {"X": ins[0]},
                      {k: float(p[k]) for k in template(op.value).params})
        elif op is Op.AFFINE:
            self._affine(node, v, ins[0])
        elif op in (Op.ADD, Op.MUL):
            self._merge(node, v, ins, in_shapes)
        elif op is Op.CONCAT:
            vec = len(node.shape) == 1
            if any(len(s) != len(node.shape) for s in in_shapes):
                raise SqlUnsupportedError(f"{node.name}: concat of maps and vectors has no view")
            cur, off = ins[0], in_shapes[0][0]
            for j, (rhs, shp) in enumerate(zip(ins[1:], in_shapes[1:]), start=1):
                name = v if j == len(ins) - 1 else f"{v}__p{j}"
                cur = self.view(node, name, "concat_vec" if vec else "concat", {"A": cur, "B": rhs},
                                {"k_offset" if vec else "c_offset": off})
                off += shp[0]
            if len(ins) == 1:
                self.view(node, v, "identity", {"X": ins[0]})
        elif op is Op.LRN:
            size = int(p["size"])
            self.view(node, v, "lrn", {"X": ins[0]}, {
                "size": size, "alpha": float(p["alpha"]), "beta": float(p["beta"]),
                "bias": float(p["bias"]), "lo": (size - 1) // 2, "hi": size // 2})
        elif op is Op.PAD:
            c, ho, wo = node.shape
            self.view(node, v, "pad", {"X": ins[0]}, {
                "pad_t": p["pads"][0], "pad_l": p["pads"][1], "C": c, "H_out": ho, "W_out": wo,
                "value": float(p["value"])})
        elif op is Op.RESHAPE:
            self._reshape(node, v, ins[0], in_shapes[0])
        elif op is Op.TRANSPOSE:
            perm = tuple(p["perm"])
            if len(perm) == 1:
                self.view(node, v, "identity", {"X": ins[0]})
            else:
                self.view(node, v, "transpose", {"X": ins[0]},
                          {"p0": perm[0], "p1": perm[1], "p2": perm[2]})
        elif op is Op.GEMM:
            self.view(node, v, "gemm", {
                "X": ins[0],
                "W": self.weight(f"{v}__w", node.weights["W"], relation.SCHEMAS["gemm_w"]),
                "B": self.weight(f"{v}__b", node.weights["B"], relation.SCHEMAS["bias"])})
        elif op is Op.SOFTMAX:
            self.view(node, v, "softmax", {"X": ins[0]})
        else:
            raise SqlUnsupportedError(f"{node.name}: no view template for {op.name}")

    def _affine(self, node: Node, v: str, x: str) -> None:
        if len(node.shape) not in (1, 3):
            raise SqlUnsupportedError(f"{node.name}: affine takes (C,H,W) maps or vectors")
        import pyarrow as pa  # the (c, scale, shift) table has two value columns

        s = np.asarray(node.weights["scale"], np.float64)
        t = np.asarray(node.weights["shift"], np.float64)
        tbl = pa.table({"c": pa.array(np.arange(s.size, dtype=np.int32)),
                        "scale": pa.array(s), "shift": pa.array(t)})
        self.plan.weights[f"{v}__s"] = tbl
        if len(node.shape) == 1:
            self.view(node, v, "affine_vec", {"X": x, "S": f"{v}__s"},
                      {"join_k": int(s.size != 1)})
        else:
            self.view(node, v, "affine", {"X": x, "S": f"{v}__s"})

    def _merge(self, node: Node, v: str, ins: list[str], shapes: list[tuple]) -> None:
        if len(ins) == 1:
            self.view(node, v, "identity", {"X": ins[0]})
            return
        rank = {len(s) for s in shapes}
        if rank not in ({3}, {1}):
            raise SqlUnsupportedError(f"{node.name}: {node.op.name} views take (C,H,W) maps or "
                                      f"vectors, not a mix: {shapes}")
        vec = rank == {1}
        cur, cur_shape = ins[0], shapes[0]
        for j, (rhs, shp) in enumerate(zip(ins[1:], shapes[1:]), start=1):
            name = v if j == len(ins) - 1 else f"{v}__p{j}"
            # join on an axis only where both operands span it (extent 1 = broadcast)
            axes = "k" if vec else "cyx"
            join = {f"join_{ax}": int(a == b and a != 1) for ax, a, b in zip(axes, cur_shape, shp)}
            tmpl = node.op.value + ("_vec" if vec else "")
            cur = self.view(node, name, tmpl, {"A": cur, "B": rhs}, join)
            cur_shape = tuple(int(d) for d in np.broadcast_shapes(cur_shape, shp))

    def _reshape(self, node: Node, v: str, x: str, src: tuple) -> None:
        dst = node.shape
        if len(src) == 1 and len(dst) == 1:
            self.view(node, v, "identity", {"X": x})
        elif len(src) == 3 and len(dst) == 1:
            self.view(node, v, "flatten", {"X": x}, {"H": src[1], "W": src[2]})
        elif len(src) == 1 and len(dst) == 3:
            self.view(node, v, "unflatten", {"X": x}, {"H": dst[1], "W": dst[2]})
        else:
            self.view(node, v, "reshape", {"X": x}, {"H_in": src[1], "W_in": src[2],
                                                     "H_out": dst[1], "W_out": dst[2]})


def compile_graph(graph: Graph, input_table: str = INPUT_TABLE, prefix: str = "") -> SqlPlan:
    """Compile ``graph`` into its relational plan (views + weight tables)."""
    return _Compiler(graph, input_table, prefix).compile()


def graph_to_sql(graph: Graph, input_table: str = INPUT_TABLE) -> list[str]:
    """The ``CREATE VIEW`` statements of ``graph``, one per layer (plus helpers), in order."""
    return compile_graph(graph, input_table).statements()


def run_sql(graph: Graph, batch_nchw: np.ndarray, con=None, outputs: list[str] | None = None,
            materialize: bool = False) -> dict[str, np.ndarray]:
    """The relational reference executor: run ``graph`` as DuckDB views on an NCHW batch.

    Returns float32 arrays per requested node (default: the graph output). With
    ``materialize`` every layer becomes a table (each layer computed once, useful when many
    outputs are read); otherwise layers are views and DuckDB plans each query whole.
    """
    import duckdb

    batch = np.ascontiguousarray(batch_nchw, np.float32)
    if batch.shape[1:] != tuple(graph.input_shape):
        raise ValueError(f"batch {batch.shape} does not match graph input {graph.input_shape}")
    own = con is None
    con = duckdb.connect() if own else con
    try:
        plan = compile_graph(graph)
        plan.install(con, batch, materialize=materialize)
        want = outputs or [graph.output]
        return {name: plan.fetch(con, name, batch.shape[0]) for name in want}
    finally:
        if own:
            con.close()


__all__ = [
    "INPUT_TABLE", "SqlIdentifierError", "SqlPlan", "SqlUnsupportedError", "Template",
    "compile_graph", "graph_to_sql", "ident", "literal", "render", "run_sql", "sanitize",
    "template", "template_names",
]
