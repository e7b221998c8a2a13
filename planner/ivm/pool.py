"""delta pool(X) = pool(read-in context of X with the patch applied) on the output window
reached by the input patch (avg-pool: linear; max-pool: recomputed inside the region)."""

from krypton_db.graph import Op

from .registry import DeltaRule, register, window_axis


class _PoolRule(DeltaRule):
    kind = "window"

    def out_size(self, node, in_sizes, in_shapes):
        if in_sizes[0] is None:
            return None
        kh, kw = node.params["kernel"]
        sh, sw = node.params["stride"]
        return (window_axis(in_sizes[0][0], kh, sh, 1, node.shape[1]),
                window_axis(in_sizes[0][1], kw, sw, 1, node.shape[2]))


@register(Op.MAXPOOL)
class MaxPoolRule(_PoolRule):
    """delta maxpool = maxpool recomputed over the read-in context (non-linear)"""


@register(Op.AVGPOOL)
class AvgPoolRule(_PoolRule):
    """delta avgpool = avgpool over the read-in context (linear)"""
