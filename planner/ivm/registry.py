"""DELTA_RULES: the registry of per-layer-type delta rules (one small file per layer type).

A rule answers, for its layer, *which output region changes* given the changed regions of
its inputs (pure index math, used by EXPLAIN and the theoretical-speedup analysis) and *how
that region is computed* (its ``kind``, which the lowering maps to a physical operator):

- ``window``    conv / pooling: read-in context gathered from the materialized input view
                with the input patch applied, layer run with padding 0 (delta conv is linear;
                max-pool is recomputed inside the region)
- ``pointwise`` the patch passes through (the op runs on the patch only)
- ``merge``     add / mul / concat: bounding box of the input patches; each branch's cells
                outside its own patch come from its materialized view
- ``global``    the patch is stitched into the materialized tensor and the layer runs fully
                (fully connected, global pooling, reshape, softmax, ...)

Researchers register their own rules with ``@register(Op.X)`` from their own module; a layer
type without a rule falls back to full recompute (``global``), visibly in EXPLAIN.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

from krypton_db.graph import Node, Op

Size = tuple[int, int]


@dataclass
class DeltaRule:
    """Base rule. ``out_size`` returns the output patch (h, w), or None when the whole output
    changes (global)."""

    op: Op
    kind: str = "global"
    doc: str = ""
    origin: str = ""

    def out_size(self, node: Node, in_sizes: list[Size | None], in_shapes: list[tuple]) -> Size | None:
        return None


DELTA_RULES: dict[Op, DeltaRule] = {}


def register(op: Op):
    """Class decorator: ``@register(Op.CONV) class ConvRule(DeltaRule): ...``."""

    def deco(cls):
        # the caller's frame alone: inspect.stack() resolves every frame's module by scanning
        # sys.modules and reads its source lines (seconds of start-up over the built-in rules
        # once numba / pandas are loaded)
        frame = inspect.currentframe().f_back
        rule = cls(op=op, kind=cls.kind, doc=(cls.__doc__ or "").strip().splitlines()[0],
                   origin=f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}")
        DELTA_RULES[op] = rule
        return cls

    return deco


def _short(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-3:]) if "planner" in parts else parts[-1]


FALLBACK = DeltaRule(op=Op.INPUT, kind="global", doc="no delta rule: full recompute",
                     origin="planner/ivm/registry.py")


def rule_for(op: Op, disabled: frozenset = frozenset()) -> DeltaRule:
    """The active rule for ``op`` (the full-recompute fallback when missing, or disabled for
    this plan: ``disabled`` holds ``Op`` members or their values, e.g. ``"conv"``)."""
    if op in disabled or op.value in disabled or op not in DELTA_RULES:
        return FALLBACK
    return DELTA_RULES[op]


def window_axis(w_in: int, k: int, s: int, d: int, w_out: int) -> int:
    """Published output-patch width for a changed input run of ``w_in`` cells:
    min(ceil((w_in + k_eff - 1) / s), W_out), k_eff = d (k - 1) + 1.

    >>> window_axis(16, 3, 1, 1, 224)
    18
    >>> window_axis(20, 2, 2, 1, 112)
    11
    """
    keff = d * (k - 1) + 1
    return min(math.ceil((w_in + keff - 1) / s), w_out)


def window_out_size(node: Node, in_size: Size | None) -> Size | None:
    """Output patch (h, w) of a windowed layer (conv / pooling; dilation 1 when absent) for a
    changed input patch ``in_size``; None when the whole input changed."""
    if in_size is None:
        return None
    kh, kw = node.params["kernel"]
    sh, sw = node.params["stride"]
    dh, dw = node.params.get("dilation", (1, 1))
    return (window_axis(in_size[0], kh, sh, dh, node.shape[1]),
            window_axis(in_size[1], kw, sw, dw, node.shape[2]))
