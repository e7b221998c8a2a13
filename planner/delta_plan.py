"""IVM rewrite: an occlusion query over a model graph -> a delta plan.

Invariant: every step of the CPU plan (fused conv+activation counts as one step) gets the
rule that maintains it, its output-patch size (identical for every query in a batch: the
published position-independent sizes, a patch near a border is shifted back inside) or
``None`` when its whole output changes, its read-in context size, and its multiply-adds in
full and incremental form. The theoretical speedup is FLOPs(full) / FLOPs(incremental)
over conv and fully connected layers for a patch (FC counted fully in both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from krypton_db.errors import InputError
from krypton_db.graph import Graph, Node, Op

from . import regions as position_regions
from .delta_sql import DeltaSql, compile_delta_sql
from .ivm import rule_for
from .physical import PhysicalPlan
from .ivm.registry import DeltaRule, Size


@dataclass
class DeltaStep:
    node: Node
    fused: Node | None
    rule: DeltaRule
    in_sizes: list[Size | None]
    out_size: Size | None
    read_in: Size | None
    macs_full: int
    macs_inc: int
    cap: Size | None = None  # projective-field threshold round(tau * output size), if it binds
    crop: Size | None = None  # centre-cropped input patch the capped output needs

    @property
    def out_name(self) -> str:
        return self.fused.name if self.fused is not None else self.node.name

    @property
    def kind(self) -> str:
        return self.rule.kind if self.out_size is not None or self.rule.kind == "global" else "global"


@dataclass
class DeltaPlan:
    graph: Graph
    cpu_plan: PhysicalPlan
    patch: Size
    steps: list[DeltaStep] = field(default_factory=list)
    tau: float = 1.0
    disabled: frozenset = frozenset()  # layer types whose rule is off in this plan
    # "position": each batch runs its windowed steps at its queries' exact boxes
    # (planner.regions); "published": the position-independent sizes of ``steps``
    regions: str = "published"

    @property
    def regions_run(self) -> str:
        """The regions this plan runs: "position" only for an exact plan that asks for them
        (tau caps are defined on the published sizes)."""
        return "position" if self.regions == "position" and self.tau >= 1.0 else "published"

    def batch_windows(self, positions):
        """Per windowed step (output name) the batch's output-box locations [B, 2] and size
        under per-position regions (``planner.regions.batch_windows``); None when the plan
        runs the published sizes (``regions="published"`` or tau caps)."""
        if self.regions_run != "position":
            return None
        return position_regions.batch_windows(self, positions)

    def position_speedup(self, positions, batch: int | None = None) -> float:
        """Theoretical speedup over ``positions`` [N, 2] with per-position regions: full
        multiply-adds / incremental ones at each query's exact boxes, or (``batch``) at the
        batches' sizes in ``batch_order``, as a run in batches of ``batch`` executes them.
        A plan that runs the published sizes (``regions="published"``, tau caps) returns its
        ``theoretical_speedup``."""
        if self.regions_run != "position":
            return self.theoretical_speedup
        pos = np.asarray(positions, np.int64).reshape(-1, 2)
        return self.macs_full * len(pos) / max(position_regions.position_macs(self, pos, batch), 1)

    def batch_order(self, positions):
        """The order in which to batch ``positions`` (a permutation; identity under the
        published sizes, where a batch's sizes do not depend on its queries)."""
        if self.regions_run != "position":
            return np.arange(len(positions))
        return position_regions.batch_order(self, positions)

    @property
    def macs_full(self) -> int:
        return sum(s.macs_full for s in self.steps)

    @property
    def macs_inc(self) -> int:
        return sum(s.macs_inc for s in self.steps)

    @property
    def theoretical_speedup(self) -> float:
        return self.macs_full / max(self.macs_inc, 1)

    def window_size(self, ds: DeltaStep, in_size: Size) -> tuple[Size, Size | None]:
        """Runtime sizing of a windowed step for an actual input patch size: (output patch,
        centre-crop of the input patch or None). Same rule + tau cap as planning."""
        graph_in = self.graph[ds.node.inputs[0]].shape
        out = ds.rule.out_size(ds.node, [in_size], [graph_in])
        out, _, crop = tau_cap(ds.node, out, in_size, self.tau)
        return out, crop

    def delta_sql(self) -> DeltaSql:
        """This plan's IVM rewrite rendered as SQL delta queries over the materialized views
        (:class:`~krypton_db.planner.delta_sql.DeltaSql`; ``str()`` of it is the script).
        Exact plans only: projective-field caps (tau < 1) have no relational form."""
        if self.tau < 1.0:
            raise InputError(f"delta SQL renders exact plans; this plan has tau {self.tau:g} "
                             f"(projective-field caps run on the numba executors only)")
        return compile_delta_sql(self.graph, self.patch, self.disabled)

    def sizes(self) -> dict[str, Size | None]:
        out = {self.graph.input.name: self.patch}
        for s in self.steps:
            out[s.out_name] = s.out_size
        return out

    def explain(self) -> str:
        """Deterministic text: per step rule, patch and read-in sizes, MACs full vs incremental."""
        ph, pw = self.patch
        lines = [
            f"DeltaPlan {self.graph.name}: patch {ph}x{pw}, tau {self.tau:g}, {len(self.steps)} steps",
            f"{'step':<34} {'op':<16} {'rule':<10} {'out patch':>10} {'read-in':>9} "
            f"{'MACs full':>12} {'MACs incr':>12}",
        ]
        for s in self.steps:
            op = s.node.op.name + ("+" + s.fused.op.name if s.fused is not None else "")
            outp = f"{s.out_size[0]}x{s.out_size[1]}" if s.out_size else "full"
            rin = f"{s.read_in[0]}x{s.read_in[1]}" if s.read_in else "-"
            cap = f"  tau-cap {s.cap[0]}x{s.cap[1]}, input crop {s.crop[0]}x{s.crop[1]}" if s.cap else ""
            lines.append(f"{s.node.name[-34:]:<34} {op:<16} {s.kind:<10} {outp:>10} {rin:>9} "
                         f"{s.macs_full:>12,} {s.macs_inc:>12,}{cap}")
        lines.append(f"total MACs full {self.macs_full:,}  incremental {self.macs_inc:,}  "
                     f"theoretical speedup {self.theoretical_speedup:.2f}x")
        return "\n".join(lines)


def _macs_for(node: Node, out: Size | None) -> int:
    if node.op is Op.CONV:
        if out is None:
            return node.macs
        return node.macs // (node.shape[1] * node.shape[2]) * out[0] * out[1]
    return node.macs


def round_half_away(x: float) -> int:
    """Round half away from zero (the published tau rule), for x >= 0.

    >>> round_half_away(2.5), round_half_away(11.2)
    (3, 11)
    """
    return int(math.floor(x + 0.5))


def tau_cap(node: Node, out: Size, in_size: Size, tau: float) -> tuple[Size, Size | None, Size | None]:
    """Projective-field thresholding of one windowed layer: cap each axis of the output patch
    at round(tau * output size); the input patch is centre-cropped to the w_O * s - k + 1 cells
    the capped output needs. Returns (output size, cap or None, crop or None)."""
    if tau >= 1.0:
        return out, None, None
    kh, kw = node.params["kernel"]
    sh, sw = node.params["stride"]
    dh, dw = node.params.get("dilation", (1, 1))
    cap = (max(1, round_half_away(tau * node.shape[1])), max(1, round_half_away(tau * node.shape[2])))
    if out[0] <= cap[0] and out[1] <= cap[1]:
        return out, None, None
    new = (min(out[0], cap[0]), min(out[1], cap[1]))
    crop = (max(1, min(in_size[0], new[0] * sh - (dh * (kh - 1) + 1) + 1)),
            max(1, min(in_size[1], new[1] * sw - (dw * (kw - 1) + 1) + 1)))
    return new, cap, crop


def plan_occlusion(graph: Graph, patch: Size, cpu_plan: PhysicalPlan | None = None,
                   tau: float = 1.0, disabled: frozenset = frozenset(),
                   regions: str = "published") -> DeltaPlan:
    """Propagate the patch size through the graph with each layer's delta rule; with tau < 1
    every windowed layer's output patch is capped (projective-field thresholding).
    ``disabled``: layer types (``Op`` values such as ``"conv"``) whose rule is off in this
    plan: those layers recompute in full (a research switch of one plan, never the process).
    ``regions``: "published" (the sizes above for every query) or "position" (each batch at
    its queries' exact boxes, ``planner.regions``; exact plans only, tau < 1 keeps the
    published sizes its caps are defined on)."""
    if not (0.0 < tau <= 1.0):
        raise InputError(f"tau must lie in (0, 1], got {tau}")
    if regions not in ("published", "position"):
        raise InputError(f"regions must be 'position' or 'published', got {regions!r}")
    cpu_plan = cpu_plan or PhysicalPlan.lower(graph)
    sizes: dict[str, Size | None] = {graph.input.name: tuple(patch)}
    plan = DeltaPlan(graph, cpu_plan, tuple(patch), tau=float(tau), disabled=frozenset(disabled),
                     regions=regions)
    for st in cpu_plan.steps:
        node = st.node
        rule = rule_for(node.op, disabled)
        in_sizes = [sizes[i] for i in node.inputs]
        in_shapes = [graph[i].shape for i in node.inputs]
        out = rule.out_size(node, in_sizes, in_shapes)
        if out is not None and tuple(out) == tuple(node.shape[1:]) and rule.kind == "merge":
            out = tuple(out)
        read_in = cap = crop = None
        if rule.kind == "window" and out is not None:
            out, cap, crop = tau_cap(node, out, in_sizes[0], tau)
            kh, kw = node.params["kernel"]
            sh, sw = node.params["stride"]
            dh, dw = node.params.get("dilation", (1, 1))
            read_in = (dh * (kh - 1) + 1 + (out[0] - 1) * sh, dw * (kw - 1) + 1 + (out[1] - 1) * sw)
        sizes[node.name] = out
        if st.fused is not None:
            sizes[st.fused.name] = out
        macs_inc = _macs_for(node, out)
        plan.steps.append(DeltaStep(node, st.fused, rule, in_sizes, out, read_in, node.macs,
                                    macs_inc, cap, crop))
    return plan
