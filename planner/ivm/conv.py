"""delta conv(X) = conv(read-in context of X with the patch applied, padding 0), on the output
window reached by the input patch (linear in the input delta)."""

from krypton_db.graph import Op

from .registry import DeltaRule, register, window_out_size


@register(Op.CONV)
class ConvRule(DeltaRule):
    """delta conv = conv over the read-in context, output window reached by the input patch"""

    kind = "window"

    def out_size(self, node, in_sizes, in_shapes):
        return window_out_size(node, in_sizes[0])
