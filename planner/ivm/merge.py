"""delta merge(X1..Xn) = merge over the bounding box of the input patches; each branch's cells
outside its own patch are read from its materialized view (add: linear; mul: bilinear,
recomputed in the box; concat: per-branch copy). A branch that changed everywhere (global,
e.g. a squeeze-excitation gate) makes the merge global."""

from krypton_db.graph import ops_with_rule

from .registry import DeltaRule, register


class MergeRule(DeltaRule):
    """merge: bounding box of the input patches"""

    kind = "merge"

    def out_size(self, node, in_sizes, in_shapes):
        # a branch that changed everywhere (e.g. a squeeze-excitation gate computed after a
        # global pooling) makes the merge global, as the executor runs it
        if any(s is None for s in in_sizes) or len(node.shape) != 3:
            return None
        spatial = [s for s, shp in zip(in_sizes, in_shapes) if len(shp) == 3 and shp[1:] != (1, 1)]
        h = max(s[0] for s in spatial if s)
        w = max(s[1] for s in spatial if s)
        # the boxes of branches can be offset from each other; the executor places the union box
        # per query and the planner budgets its size as the union of centred boxes (<= full)
        return (min(h, node.shape[1]), min(w, node.shape[2]))


for _op in ops_with_rule("merge"):  # graph.OPS
    register(_op)(type(f"{_op.name.title()}Rule", (MergeRule,), {"__doc__": MergeRule.__doc__}))
