"""delta pool(X) = pool(read-in context of X with the patch applied) on the output window
reached by the input patch (avg-pool: linear; max-pool: recomputed inside the region)."""

from krypton_db.graph import Op

from .registry import DeltaRule, register, window_out_size


class _PoolRule(DeltaRule):
    kind = "window"

    def out_size(self, node, in_sizes, in_shapes):
        return window_out_size(node, in_sizes[0])


@register(Op.MAXPOOL)
class MaxPoolRule(_PoolRule):
    """delta maxpool = maxpool recomputed over the read-in context (non-linear)"""


@register(Op.AVGPOOL)
class AvgPoolRule(_PoolRule):
    """delta avgpool = avgpool over the read-in context (linear)"""
