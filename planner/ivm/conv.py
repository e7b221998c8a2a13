"""delta conv(X) = conv(read-in context of X with the patch applied, padding 0), on the output
window reached by the input patch (linear in the input delta)."""

from krypton_db.graph import Op

from .registry import DeltaRule, register, window_axis


@register(Op.CONV)
class ConvRule(DeltaRule):
    """delta conv = conv over the read-in context, output window reached by the input patch"""

    kind = "window"

    def out_size(self, node, in_sizes, in_shapes):
        if in_sizes[0] is None:
            return None
        kh, kw = node.params["kernel"]
        sh, sw = node.params["stride"]
        dh, dw = node.params["dilation"]
        return (window_axis(in_sizes[0][0], kh, sh, dh, node.shape[1]),
                window_axis(in_sizes[0][1], kw, sw, dw, node.shape[2]))
