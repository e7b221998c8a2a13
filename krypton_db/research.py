"""Research switches: take the IVM apart to measure what each piece buys.

- ``disable_rule`` -- the delta rules of some layer types off in one plan
  (``SET disable_rule = 'conv'``; ``plan_occlusion(..., disabled={"conv"})``, or
  ``occlude(..., hooks=OcclusionHooks(disabled_rules={"conv"}))``): those layers recompute in
  full. It belongs to the plan, so concurrent runs in other threads are not affected;
- :func:`force_naive_from` -- a delta-plan rewrite: from a layer on every step recomputes in
  full (``SET naive_from = 'conv3'``; pass it to ``occlude`` as
  ``hooks=OcclusionHooks(plan_rewrite=lambda p: force_naive_from(p, "conv3"))``);
- :func:`ablation` -- per-layer theory vs measurement (``EXPLAIN ANALYZE ABLATION``).

The names stay importable from :mod:`krypton_db.query`.
"""

from __future__ import annotations

from dataclasses import replace


class _NaiveFromRule:
    """Marker rule of ``naive_from``: the step recomputes its full output."""

    kind = "global"
    forced = True
    doc = "naive_from: full recompute from this layer on"
    origin = "krypton_db/research.py (naive_from)"

    def __init__(self, op):
        self.op = op

    def out_size(self, node, in_sizes, in_shapes):
        return None


def force_naive_from(plan, layer: str | None):
    """Delta plan rewrite: from step ``layer`` on (execution order) every step recomputes in
    full (its rule becomes full recompute, output patch None, MACs incremental = full)."""
    if not layer:
        return plan
    names = [s.node.name for s in plan.steps]
    alias = {s.out_name: s.node.name for s in plan.steps}
    first = names.index(alias.get(layer, layer))
    steps = list(plan.steps[:first])
    for ds in plan.steps[first:]:
        steps.append(replace(ds, rule=_NaiveFromRule(ds.node.op), out_size=None, read_in=None,
                             cap=None, crop=None, macs_inc=ds.macs_full))
    # in_sizes of later steps as the executor will see them (full tensors)
    sizes = {plan.graph.input.name: plan.patch}
    for i, ds in enumerate(steps):
        steps[i] = replace(ds, in_sizes=[sizes.get(n) for n in ds.node.inputs])
        sizes[ds.out_name] = ds.out_size
        sizes[ds.node.name] = ds.out_size
    return replace(plan, steps=steps)


def naive_from_rewrite(layer: str | None):
    """The ``plan_rewrite`` hook of ``naive_from = layer`` (None when unset)."""
    return (lambda plan: force_naive_from(plan, layer)) if layer else None


def ablation(session, text: str) -> list[tuple[str, str]]:
    """Per-layer theory vs measurement of an occlusion query (``EXPLAIN ANALYZE ABLATION``):
    ``ablation(kdb.connect(), "SELECT * FROM occlusion('m', 'i', patch => 16)")``."""
    t = text.strip().rstrip(";")
    if not t.upper().startswith("EXPLAIN"):
        t = "EXPLAIN ANALYZE ABLATION " + t
    return session.explain(t)


__all__ = ["ablation", "force_naive_from", "naive_from_rewrite"]
