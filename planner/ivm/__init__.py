"""Delta rules, one file per layer type; importing this package registers them all."""

from . import conv, global_, merge, pointwise, pool  # noqa: F401  (registration side effects)
from .registry import DELTA_RULES, FALLBACK, DeltaRule, register, rule_for, window_axis

__all__ = ["DELTA_RULES", "FALLBACK", "DeltaRule", "register", "rule_for", "window_axis"]
