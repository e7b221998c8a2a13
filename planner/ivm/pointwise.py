"""delta f(X) = f(patch of X) for pointwise f: the changed region passes through unchanged
(ReLU, clip, sigmoid, hard-swish, affine/batch-norm, LRN across channels only)."""

from krypton_db.graph import ops_with_rule

from .registry import DeltaRule, register


class PointwiseRule(DeltaRule):
    """pointwise: the patch passes through"""

    kind = "pointwise"

    def out_size(self, node, in_sizes, in_shapes):
        return in_sizes[0]


for _op in ops_with_rule("pointwise"):  # graph.OPS
    register(_op)(type(f"{_op.name.title()}Rule", (PointwiseRule,), {"__doc__": PointwiseRule.__doc__}))
