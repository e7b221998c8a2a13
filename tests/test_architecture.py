"""The import structure: layers point down only and no module imports itself back.

The graph is read from the source with ``ast`` (module-level and function-level imports of
the project's own modules). Layers, bottom up: core (graph IR, relations, SQL text, images,
errors), planner (logical delta plan, delta SQL, algorithm choice, physical plan, batching,
cost model, EXPLAIN rendering), exec (runtime < kernels < executors), app (API, occlusion
driver, approximate modes, calibration, catalog, language, CLI)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"krypton_db": ROOT / "krypton_db", "krypton_db.planner": ROOT / "planner",
            "krypton_db.sql": ROOT / "sql"}

CORE = {"errors", "graph", "graph_passes", "relation", "sqltext", "sqlviews", "heap", "torch_import",
        "interrupt", "checks", "images", "onnx_import", "zoo", "quality"}
EXEC_RUNTIME = {"runtime"}
EXEC_EXECUTORS = {"cpu", "incremental", "gpu", "gpu_incremental", "duckdb_ivm"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if pkg == "krypton_db" and parts[0] in ("planner", "sql"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg] + parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        pkg_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("krypton_db"):
                    deps.add(t)
        graph[name] = deps
    return graph


def layer(mod: str) -> tuple[int, int]:
    """(layer, sub-layer) of a module: core 0, planner 1, exec 2, app 3."""
    parts = mod.split(".")
    if len(parts) >= 2 and parts[1] == "planner":
        return (1, 0)
    if len(parts) >= 2 and parts[1] == "exec":
        leaf = parts[-1] if len(parts) > 2 else ""
        return (2, 0 if leaf in EXEC_RUNTIME else 2 if leaf in EXEC_EXECUTORS else 1)
    if len(parts) == 2 and parts[1] in CORE:
        return (0, 0)
    return (3, 0)


def test_the_graph_sees_the_whole_project():
    g = import_graph()
    assert {"krypton_db.api", "krypton_db.planner.delta_plan", "krypton_db.exec.cpu",
            "krypton_db.sql.dsl.parser", "krypton_db.exec.runtime"} <= set(g)
    assert "krypton_db.planner.physical" in g["krypton_db.exec.cpu"]
    assert "krypton_db.exec.runtime" in g["krypton_db.exec.gemm_cpu"]


def test_imports_point_down_only():
    g = import_graph()
    upward = sorted(f"{a} -> {b}" for a, deps in g.items() for b in deps
                    if layer(b) > layer(a) and not (layer(a)[0] == layer(b)[0] == 3))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = import_graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("bad", [("krypton_db.planner.delta_plan", "krypton_db.exec.cpu"),
                                 ("krypton_db.exec.gemm_cpu", "krypton_db.exec.cpu"),
                                 ("krypton_db.graph", "krypton_db.planner.physical")])
def test_the_layer_rule_would_catch_an_upward_import(bad):
    assert layer(bad[1]) > layer(bad[0])


def test_the_op_table_drives_rules_activations_and_names():
    """graph.OPS is the one row per op: every op's registered delta rule has the table's
    kind, activation codes are distinct and fusable exactly where the table gives one, and
    EXPLAIN names ops by the table."""
    from krypton_db.graph import ACT_NONE, ACTIVATION_CODES, OPS, Op
    from krypton_db.planner.ivm import rule_for
    from krypton_db.planner.physical import FUSABLE_ACTIVATIONS, op_name

    for op, info in OPS.items():
        if op is not Op.INPUT:
            assert rule_for(op).kind == info.rule, op
        assert op_name(op) == info.display
    codes = list(ACTIVATION_CODES.values())
    assert len(set(codes)) == len(codes) and ACT_NONE not in codes
    assert FUSABLE_ACTIVATIONS == set(ACTIVATION_CODES)


def test_an_activation_is_imported_and_viewed_from_its_row(tmp_path):
    """An activation's ONNX importer and its SQL view come from its graph.OPS row: every
    activation has a view (its row's expression) whose params are its kernel params, and every
    row's ONNX operator is importable (defaults as the row gives them)."""
    import onnx
    from onnx import helper

    from krypton_db.graph import ACTIVATIONS, OPS, Op
    from krypton_db.onnx_import import SUPPORTED_OPS, import_onnx
    from krypton_db.sqlviews import template, template_names

    for op in ACTIVATIONS:
        info = OPS[op]
        assert info.sql is not None and op.value in template_names(), op
        assert template(op.value).params == info.act_params, op
        if info.onnx is None:
            continue
        assert info.onnx in SUPPORTED_OPS
        node = helper.make_node(info.onnx, ["x"], ["y"])
        g = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                             [1, 3, 1, 1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                             [1, 3, 1, 1])])
        path = tmp_path / f"{op.value}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)]), path)
        graph = import_onnx(path)[0]
        (n,) = [n for n in graph.nodes if n.op in ACTIVATIONS]
        assert n.op is op and n.params == dict(zip(info.act_params, info.defaults)), op


def test_private_names_stay_in_their_module():
    """No module imports another project module's private name (``from m import _x``) or
    reads it through the module (``m._x``): what a module shares, it names publicly."""
    mods = modules()
    hits = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg[:len(pkg) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                if not base.startswith("krypton_db"):
                    continue
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
                    elif a.name.startswith("_"):
                        hits.append(f"{name}: from {base} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                hits.append(f"{name}: {node.value.id}.{node.attr}")
    assert not hits, "private names used across modules:\n" + "\n".join(sorted(set(hits)))


def test_only_the_cli_reaches_the_web_viewer():
    """krypton_db.web needs the [web] extra: the rest of the package never imports it."""
    g = import_graph()
    users = sorted(a for a, deps in g.items() if not a.startswith("krypton_db.web")
                   and any(d.startswith("krypton_db.web") for d in deps))
    assert users == ["krypton_db.cli"]
    assert any(m.startswith("krypton_db.web.") for m in g)  # the viewer is in the graph
