"""Lowering: the delta plan's device-neutral steps -> the physical plan the executors run.

``PhysicalPlan.lower`` fuses activations into the conv / add before them and elides concats
(``concat_slots``); ``kernels`` / ``physical_steps`` name the physical operators each delta
step runs (patch vs full path, per device); the CPU algorithm of each conv is chosen by
:mod:`.algorithms`. Batching, the cost model, EXPLAIN and the executors read these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from krypton_db.graph import Graph, Node, Op

from . import algorithms

# pointwise activations a conv / add runs in its epilogue (kernel codes: exec/kernels_*.py)
FUSABLE_ACTIVATIONS = frozenset({Op.RELU, Op.CLIP, Op.LEAKY_RELU, Op.SIGMOID, Op.HARD_SIGMOID,
                                 Op.HARD_SWISH})


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


# -- physical operators of the delta steps -----------------------------------------------

_OP_NAMES = {Op.CONV: "Conv2d", Op.MAXPOOL: "MaxPool2d", Op.AVGPOOL: "AvgPool2d",
             Op.GLOBAL_AVGPOOL: "GlobalAvgPool", Op.GEMM: "Gemm", Op.LRN: "Lrn",
             Op.LEAKY_RELU: "LeakyRelu", Op.HARD_SIGMOID: "HardSigmoid",
             Op.HARD_SWISH: "HardSwish"}


def op_name(op: Op) -> str:
    return _OP_NAMES.get(op, op.name.title().replace("_", ""))


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


def kernels(ds, in_patch: list[bool], device: str = "cpu") -> tuple[list[str], bool]:
    """The physical operators of one delta step, given which inputs arrive as patches (vs full
    tensors), and whether its output is a patch. Mirrors ``IncrementalExecutor._step`` (and
    the GPU executor's): a step takes its patch path only when *every* input is a patch; a
    window whose output patch is the whole map runs as ``whole_map_runs_dense`` says."""
    node = ds.node
    kind = ds.rule.kind
    patches = all(in_patch)
    act = f"+{op_name(ds.fused.op)}" if ds.fused is not None else ""
    whole = ds.out_size is not None and tuple(ds.out_size) == tuple(node.shape[1:])
    if kind == "window" and patches and not (whole and whole_map_runs_dense(node, device)):
        main = {Op.CONV: "BatchedPatchConv2d", Op.MAXPOOL: "BatchedPatchMaxPool2d",
                Op.AVGPOOL: "BatchedPatchAvgPool2d"}.get(node.op, f"BatchedPatch{op_name(node.op)}")
        return (["CentreCrop"] if ds.crop else []) + ["GatherReadIn", main + act], True
    if kind == "pointwise" and patches:
        return [f"Patch{op_name(node.op)}"], True
    if kind == "merge" and patches and len(node.shape) == 3:
        return ["GatherUnionBox", f"Patch{op_name(node.op)}{act}"], True
    out = ["StitchFull"] if any(in_patch) else []
    return out + [f"Full{op_name(node.op)}{act}"], False


def executed_macs(ds, ks: list[str]) -> int:
    """MACs one query executes at this step (patch kernels: incremental, else full)."""
    return ds.macs_inc if ks[-1].startswith(("Batched", "Patch")) else ds.macs_full


def physical_steps(plan, device: str = "cpu") -> list[tuple[object, list[str]]]:
    """(delta step, kernels) in execution order, tracking patch-vs-full like the executor."""
    state = {plan.graph.input.name: True}
    out = []
    for ds in plan.steps:
        ks, is_patch = kernels(ds, [state.get(i, False) for i in ds.node.inputs], device)
        state[ds.out_name] = state[ds.node.name] = is_patch
        out.append((ds, ks))
    return out
