"""Hooks into one occlusion run: ``occlude(model, image, ..., hooks=OcclusionHooks(...))``.

What EXPLAIN ANALYZE, the progress bar and the ``naive_from`` research switch need from a run,
passed in explicitly (nothing global is patched, so concurrent runs do not interfere):

- ``plan_rewrite``: applied to the delta plan before the incremental executor is built
  (exact / approximate modes; e.g. :func:`krypton_db.research.force_naive_from`);
- ``profile``: per-step seconds of the batched runs accumulate into ``step_secs`` (keyed by
  node name): the incremental executors (CPU and GPU) in exact / approximate mode, the CPU
  full-inference executor in naive mode (the GPU one has no per-step timing);
- ``materialize_s``: seconds spent materializing the views (exact / approximate), accumulated;
- ``on_batch(done, total)``: called after each batch (every mode) with the positions done so
  far and the positions of the run;
- ``disabled_rules``: layer types (``Op`` values, e.g. ``"conv"``) whose delta rule is off in
  this run's plan (``SET disable_rule``): those layers recompute in full.

One hooks object may serve several runs: the accumulators add up.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .planner.delta_plan import DeltaPlan


@dataclass
class OcclusionHooks:
    plan_rewrite: Callable[[DeltaPlan], DeltaPlan] | None = None
    profile: bool = False
    on_batch: Callable[[int, int], None] | None = None
    step_secs: dict[str, float] = field(default_factory=dict)
    materialize_s: float = 0.0
    disabled_rules: frozenset = frozenset()

    def batch_done(self, done: int, total: int) -> None:
        if self.on_batch is not None:
            self.on_batch(done, total)

    def stage(self, offset: int, total: int) -> OcclusionHooks:
        """Hooks for one stage of a multi-stage run (drill-down): the same rewrite and
        profiling, step times into the same ``step_secs``, progress reported as
        ``offset + done`` of ``total``. Its ``materialize_s`` starts at 0: the caller adds it
        back to this object's."""
        outer = self.on_batch
        on_batch = None if outer is None else (lambda done, _n: outer(offset + done, total))
        return replace(self, on_batch=on_batch, materialize_s=0.0)
