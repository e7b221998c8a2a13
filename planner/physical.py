"""Lowering: the delta plan's device-neutral steps -> the physical plan the executors run.

``PhysicalPlan.lower`` fuses activations into the conv / add before them and elides concats
(``concat_slots``); ``physical_steps`` gives each delta step its ``Route`` and the physical
operators it runs (patch vs full path, per device); the CPU algorithm of each conv is chosen by
:mod:`.algorithms`. Batching, the cost model, EXPLAIN and the executors read these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from krypton_db.graph import ACTIVATIONS, OPS, Graph, Node, Op

from . import algorithms

# pointwise activations a conv / add runs in its epilogue (graph.OPS: those with a kernel code)
FUSABLE_ACTIVATIONS = ACTIVATIONS


@dataclass
class PhysicalStep:
    node: Node
    fused: Node | None = None  # activation folded into this step
    secs: float = 0.0  # seconds accumulated by profiled runs


@dataclass
class PhysicalPlan:
    """The lowered graph both executors run: ordered steps with fused activations and the
    concat slots values are written into. Holds no weights (the executors prepare those)."""

    graph: Graph
    steps: list[PhysicalStep] = field(default_factory=list)
    # value -> (the concat it is written into, its first channel there): ``concat_slots``
    slots: dict[str, tuple[str, int]] = field(default_factory=dict)
    # names of the steps the dense CPU executor runs channels-last: ``channels_last_steps``
    channels_last: frozenset = frozenset()
    # channels-last 1x1 conv step -> the depthwise conv step it runs with, fused:
    # ``pointwise_depthwise_pairs``
    pointwise_depthwise: dict[str, str] = field(default_factory=dict)

    @classmethod
    def lower(cls, graph: Graph, fuse: bool = True) -> "PhysicalPlan":
        """One step per node; a CONV or ADD whose only consumer is a fusable activation runs
        it in its epilogue (``fuse``)."""
        cons = graph.consumers()
        steps: list[PhysicalStep] = []
        absorbed: set[str] = set()
        for node in graph.nodes[1:]:
            if node.name in absorbed:
                continue
            fused = None
            nxt = cons[node.name]
            if (
                fuse
                and node.op in (Op.CONV, Op.ADD)
                and len(nxt) == 1
                and node.name != graph.output
                and graph[nxt[0]].op in FUSABLE_ACTIVATIONS
            ):
                fused = graph[nxt[0]]
                absorbed.add(fused.name)
            steps.append(PhysicalStep(node, fused))
        plan = cls(graph, steps)
        plan.slots = concat_slots(plan)
        plan.channels_last = channels_last_steps(plan)
        plan.pointwise_depthwise = pointwise_depthwise_pairs(plan) if fuse else {}
        return plan

    def out_name(self, step: PhysicalStep) -> str:
        return step.fused.name if step.fused is not None else step.node.name


# ops whose CPU operator writes its 4-D output into the buffer it is handed (``alloc``)
WRITES_INTO_ALLOC = frozenset({Op.CONV, Op.MAXPOOL, Op.AVGPOOL, Op.CONCAT, Op.ADD, Op.AFFINE,
                               *FUSABLE_ACTIVATIONS})


def concat_slots(plan: PhysicalPlan) -> dict[str, tuple[str, int]]:
    """Concat elision (as in ML compilers' memory planning): a channel concat of CNHW values
    is a stack of contiguous channel slices, so a value whose only reader is one concat can
    be written by its producer straight into its slice of the concat's buffer, and the
    concat copies nothing. Returns {value: (concat value, first channel)} for every such
    value: one producer step that writes into its ``alloc`` buffer, read once by one 4-D
    concat, not the graph output. Nested concats (Inception3's Mixed_7b / 7c branches) chain:
    the inner concat's buffer is itself a slice of the outer one. Inception3 copied ~1.2 GB
    per explanation in its whole-map concats, single-threaded (~3% of the run)."""
    g = plan.graph
    cons = g.consumers()
    producer = {plan.out_name(s): s for s in plan.steps}
    slots: dict[str, tuple[str, int]] = {}
    for s in plan.steps:
        node = s.node
        if node.op is not Op.CONCAT or len(node.shape) != 3:
            continue
        c0 = 0
        for name in node.inputs:
            src = producer.get(name)
            if (src is not None and src.node.op in WRITES_INTO_ALLOC and name != g.output
                    and cons.get(name, []) == [node.name] and node.inputs.count(name) == 1
                    and len(g[name].shape) == 3):
                slots[name] = (plan.out_name(s), c0)
            c0 += g[name].shape[0]
    return slots


def channels_last_steps(plan: PhysicalPlan) -> frozenset:
    """The steps the dense CPU executor runs in the channels-last layout (``exec/nhwc_cpu``).

    A step can run channels-last if it is a conv with a channels-last kernel (a depthwise conv,
    a 1x1 conv, a one-group conv with few taps such as an RGB stem:
    ``algorithms.channels_last_depthwise`` / ``_pointwise`` / ``_direct``), an elementwise
    op on feature maps (activation, affine, add, mul, broadcasts included) or a global
    average pooling that keeps its dims, and its output is not written into a concat's slice
    (those are CNHW channel ranges). Such steps connected through the values between them
    form groups; a group runs channels-last when it holds a depthwise conv: the depthwise-
    separable bodies (MobileNet-style nets such as PP-LCNet and EfficientNet-Lite0) switch
    layout once at each end, and networks without depthwise convs (VGG, ResNet, Inception)
    keep CNHW everywhere. Every value keeps the layout of the step that wrote it; a reader
    in the other layout gets a transposed copy (the executor makes it once per value)."""
    if not algorithms.CHANNELS_LAST:
        return frozenset()
    g = plan.graph
    producer = {plan.out_name(s): s.node.name for s in plan.steps}

    def maps(names) -> bool:
        return all(len(g[i].shape) == 3 for i in names)

    def capable(s: PhysicalStep) -> bool:
        node = s.node
        if plan.out_name(s) in plan.slots or len(node.shape) != 3:
            return False
        if node.op is Op.CONV:
            return (algorithms.channels_last_depthwise(node) or algorithms.channels_last_pointwise(node)
                    or algorithms.channels_last_direct(node))
        if node.op in FUSABLE_ACTIVATIONS or node.op in (Op.AFFINE, Op.ADD, Op.MUL):
            return maps(node.inputs)
        return node.op is Op.GLOBAL_AVGPOOL and node.params.get("keepdims", True)

    ok = {s.node.name for s in plan.steps if capable(s)}
    parent = {n: n for n in ok}

    def root(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for s in plan.steps:
        if s.node.name in ok:
            for i in s.node.inputs:
                src = producer.get(i)
                if src in ok:
                    parent[root(src)] = root(s.node.name)
    with_depthwise = {root(s.node.name) for s in plan.steps
                      if s.node.name in ok and s.node.op is Op.CONV and algorithms.channels_last_depthwise(s.node)}
    return frozenset(n for n in ok if root(n) in with_depthwise)


def pointwise_depthwise_pairs(plan: PhysicalPlan) -> dict[str, str]:
    """1x1 convs the dense CPU executor runs fused with the depthwise conv reading them (the
    expand + depthwise of an inverted-residual block, a separable block's 1x1 and the next
    block's depthwise): {1x1 step: depthwise step} where both run channels-last, the 1x1's
    output (its activation fused) is read by the depthwise conv only, is not the graph output,
    and is a large map (``algorithms.POINTWISE_DEPTHWISE_MIN_BYTES`` per image: on small
    maps the fused form is slower). The 1x1 output rows then live in an L2-sized ring instead
    of memory (``nhwc_cpu.pointwise_depthwise_nhwc``): at batch 16 it is the largest map of the block
    (EfficientNet-Lite0's first expand conv writes 77 MB), written and read back once each.
    A run that asks for the 1x1's output (``CpuExecutor.run(outputs=...)``: IVM's
    materialized views) runs the pair unfused."""
    g = plan.graph
    cons = g.consumers()
    step_of = {s.node.name: s for s in plan.steps}
    pairs: dict[str, str] = {}
    for s in plan.steps:
        node = s.node
        name = plan.out_name(s)
        if (node.name not in plan.channels_last or node.op is not Op.CONV
                or not algorithms.channels_last_pointwise(node) or name == g.output or len(cons[name]) != 1):
            continue
        dw = step_of.get(cons[name][0])
        big = 4 * node.shape[0] * node.shape[1] * node.shape[2] >= algorithms.POINTWISE_DEPTHWISE_MIN_BYTES
        if (big and dw is not None and dw.node.name in plan.channels_last and dw.node.op is Op.CONV
                and algorithms.channels_last_depthwise(dw.node) and dw.node.inputs == (name,)):
            pairs[node.name] = dw.node.name
    return pairs


# -- physical operators of the delta steps -----------------------------------------------

def op_name(op: Op) -> str:
    """The op's name in physical operators (``graph.OPS``)."""
    return OPS[op].display


def whole_map_runs_dense(node, device: str = "cpu") -> bool:
    """Whether a window step whose output patch is the whole map runs dense (stitch the
    queries' full tensors once, then the full layer) rather than as a batched patch.

    The GPU keeps every window a patch. On the CPU the dense executor is faster for such a
    step (its read-in contexts cover the whole map anyway), except for a Winograd
    convolution (3x3, stride 1): that runs on the CHWB read-in contexts directly, where the
    dense route adds two transposes. Measured (exact, 2-core CPU): VGG16 -5%, ResNet18 -2%,
    Inception3 -2% time; all whole-map windows as patches made Inception3 22% slower."""
    if device != "cpu":
        return False
    if node.op is Op.CONV:
        g = node.params["groups"]
        if algorithms.winograd_f2(node.params, node.weights["W"].shape[1] * g, g, node.shape[1:]):
            return False
    return True


class Route(enum.Enum):
    """How the executors run one delta step for a batch of queries."""

    PATCH_WINDOW = "patch_window"        # gather each query's read-in context, batched patch op
    PATCH_POINTWISE = "patch_pointwise"  # the op on the patch values only
    PATCH_MERGE = "patch_merge"          # gather every input over the union box, op on the box
    FULL = "full"                        # stitch patches into full tensors, the full layer


class DeltaOperator(NamedTuple):
    """One delta step as it runs on a device: its route and the physical operators EXPLAIN
    names for it (the executors dispatch on ``route``; nothing re-derives it)."""

    delta: object            # the planner.delta_plan.DeltaStep
    route: Route
    kernels: tuple[str, ...]
    stitch: bool             # FULL with an input arriving as a patch: stitched first

    @property
    def out_patch(self) -> bool:
        return self.route is not Route.FULL


def route_for(ds, in_patch: list[bool], device: str = "cpu") -> Route:
    """A step takes its patch path only when *every* input is a patch; a window whose
    output patch is the whole map runs as ``whole_map_runs_dense`` says."""
    node = ds.node
    kind = ds.rule.kind
    patches = all(in_patch)
    whole = ds.out_size is not None and tuple(ds.out_size) == tuple(node.shape[1:])
    if kind == "window" and patches and not (whole and whole_map_runs_dense(node, device)):
        return Route.PATCH_WINDOW
    if kind == "pointwise" and patches:
        return Route.PATCH_POINTWISE
    if kind == "merge" and patches and len(node.shape) == 3:
        return Route.PATCH_MERGE
    return Route.FULL


def lower_step(ds, in_patch: list[bool], device: str = "cpu") -> DeltaOperator:
    """The physical form of one delta step, given which inputs arrive as patches."""
    node = ds.node
    route = route_for(ds, in_patch, device)
    act = f"+{op_name(ds.fused.op)}" if ds.fused is not None else ""
    if route is Route.PATCH_WINDOW:
        main = {Op.CONV: "BatchedPatchConv2d", Op.MAXPOOL: "BatchedPatchMaxPool2d",
                Op.AVGPOOL: "BatchedPatchAvgPool2d"}.get(node.op, f"BatchedPatch{op_name(node.op)}")
        ks = (["CentreCrop"] if ds.crop else []) + ["GatherReadIn", main + act]
    elif route is Route.PATCH_POINTWISE:
        ks = [f"Patch{op_name(node.op)}"]
    elif route is Route.PATCH_MERGE:
        ks = ["GatherUnionBox", f"Patch{op_name(node.op)}{act}"]
    else:
        ks = (["StitchFull"] if any(in_patch) else []) + [f"Full{op_name(node.op)}{act}"]
    return DeltaOperator(ds, route, tuple(ks), route is Route.FULL and any(in_patch))


def executed_macs(op: DeltaOperator) -> int:
    """MACs one query executes at this step (patch routes: incremental, else full)."""
    return op.delta.macs_inc if op.out_patch else op.delta.macs_full


def physical_steps(plan, device: str = "cpu") -> list[DeltaOperator]:
    """The delta plan's steps as they run on ``device``, in order (tracking which values are
    patches and which full tensors). The executors, batching, the cost model and EXPLAIN all
    read this list."""
    state = {plan.graph.input.name: True}
    out = []
    for ds in plan.steps:
        op = lower_step(ds, [state.get(i, False) for i in ds.node.inputs], device)
        state[ds.out_name] = state[ds.node.name] = op.out_patch
        out.append(op)
    return out


def full_operator(ds) -> DeltaOperator:
    """A step of naive re-inference (every layer in full)."""
    act = f"+{op_name(ds.fused.op)}" if ds.fused is not None else ""
    return DeltaOperator(ds, Route.FULL, (f"Full{op_name(ds.node.op)}{act}",), False)
