"""Graph simplification passes, pure functions Graph -> Graph, run after ONNX import: an NHWC
input transpose folded into the input, affine layers folded into the conv before them,
explicit pads folded into the next window, identities dropped (``simplify`` runs them all).
"""

from __future__ import annotations

from dataclasses import replace as dc_replace

import numpy as np

from .errors import ModelError
from .graph import Graph, Op


def fold_input_transpose(g: Graph) -> tuple[Graph, str]:
    """NHWC models: INPUT -> TRANSPOSE(2,0,1) becomes an NCHW INPUT; returns the layout."""
    cons = g.consumers()[g.input.name]
    t = g[cons[0]] if len(cons) == 1 else None
    if t is None or t.op is not Op.TRANSPOSE or t.params["perm"] != (2, 0, 1):
        if len(g.input.shape) == 3 and g.input.shape[0] not in (1, 3) and g.input.shape[2] in (1, 3):
            raise ModelError(
                f"input shape {g.input.shape} looks channels-last but is not transposed to "
                "channels-first before the first layer; unsupported layout"
            )
        return g, "NCHW"
    new_in = dc_replace(g.input, shape=t.shape)
    nodes = [new_in]
    for n in g.nodes[1:]:
        if n is t:
            continue
        ins = tuple(new_in.name if i == t.name else i for i in n.inputs)
        nodes.append(dc_replace(n, inputs=ins))
    return g.replace(nodes, g.output if g.output != t.name else new_in.name), "NHWC"


def fold_affine(g: Graph) -> Graph:
    """AFFINE right after a CONV/GEMM that feeds nothing else is folded into its weights."""
    cons = g.consumers()
    by = {n.name: n for n in g.nodes}
    rename: dict[str, str] = {}
    drop: set[str] = set()
    for n in g.nodes:
        if n.op is not Op.AFFINE:
            continue
        p = by[n.inputs[0]]
        if p.op not in (Op.CONV, Op.GEMM) or len(cons[p.name]) != 1 or p.name == g.output:
            continue
        s = n.weights["scale"].astype(np.float64)
        t = n.weights["shift"].astype(np.float64)
        w = p.weights["W"].astype(np.float64)
        w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        b = p.weights["B"].astype(np.float64) * s + t
        by[p.name] = dc_replace(p, weights={"W": w.astype(np.float32), "B": b.astype(np.float32)})
        drop.add(n.name)
        rename[n.name] = p.name
    return _rebuild(g, by, drop, rename)


def fold_pad(g: Graph) -> Graph:
    """Zero PAD feeding only a CONV becomes that conv's padding."""
    cons = g.consumers()
    by = {n.name: n for n in g.nodes}
    drop, rename = set(), {}
    for n in g.nodes:
        if n.op is not Op.PAD or n.params["value"] != 0.0 or len(cons[n.name]) != 1:
            continue
        c = by[cons[n.name][0]]
        if c.op is not Op.CONV or n.name == g.output:
            continue
        pads = tuple(a + b for a, b in zip(c.params["pads"], n.params["pads"]))
        by[c.name] = dc_replace(c, params={**c.params, "pads": pads})
        drop.add(n.name)
        rename[n.name] = n.inputs[0]
    return _rebuild(g, by, drop, rename)


def drop_identities(g: Graph) -> Graph:
    """Remove AFFINE(1, 0) and RESHAPE to the same shape."""
    by = {n.name: n for n in g.nodes}
    drop, rename = set(), {}
    for n in g.nodes:
        ident = (
            n.op is Op.AFFINE
            and np.all(n.weights["scale"] == 1.0)
            and np.all(n.weights["shift"] == 0.0)
        ) or (n.op is Op.RESHAPE and n.shape == by[n.inputs[0]].shape)
        if ident and n.name != g.output:
            drop.add(n.name)
            rename[n.name] = n.inputs[0]
    return _rebuild(g, by, drop, rename)


def _rebuild(g: Graph, by: dict, drop: set, rename: dict) -> Graph:
    def res(name):
        while name in rename:
            name = rename[name]
        return name

    nodes = [
        dc_replace(by[n.name], inputs=tuple(res(i) for i in by[n.name].inputs))
        for n in g.nodes
        if n.name not in drop
    ]
    return g.replace(nodes, res(g.output)).truncated(res(g.output))


def simplify(g: Graph) -> tuple[Graph, str]:
    g, layout = fold_input_transpose(g)
    g = drop_identities(fold_pad(fold_affine(g)))
    return g, layout
