"""delta g(X) = g(materialized X with the patch stitched in) for global-context layers: the
whole output changes (global average pooling, fully connected, reshape, transpose, softmax,
pad). Stated explicitly so EXPLAIN names the rule rather than the fallback."""

from krypton_db.graph import ops_with_rule

from .registry import DeltaRule, register


class GlobalRule(DeltaRule):
    """global context: stitch the patch into the materialized tensor, run the layer fully"""

    kind = "global"


for _op in ops_with_rule("global"):  # graph.OPS
    register(_op)(type(f"{_op.name.title()}Rule", (GlobalRule,), {"__doc__": GlobalRule.__doc__}))
