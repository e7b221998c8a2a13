"""The model graph: a DAG of typed layer nodes with static per-sample shapes and FLOP counts.

Invariant: every node's ``shape`` is its *per-sample* output shape (the batch dimension is
never stored): ``(C, H, W)`` for feature maps, ``(K,)`` for vectors. Nodes are kept in
topological order, so executors run ``graph.nodes`` front to back. Weights live on the node
(``node.weights``), already in the canonical layout of the op (documented per op below), so
executors never look at ONNX again.

Canonical semantics (the numpy reference executor in ``exec/reference.py`` is the definition):

- ``CONV``: weights ``W[O, C/groups, kh, kw]``, ``B[O]``; params kernel, stride, pads
  ``(top, left, bottom, right)``, dilation, groups. Zero padding.
- ``MAXPOOL`` / ``AVGPOOL``: kernel, stride, pads, ceil_mode, count_include_pad (avg only).
  Max-pool padding is ``-inf``; windows that start in the bottom/right padding are dropped
  (ONNX/PyTorch ceil-mode rule).
- ``GLOBAL_AVGPOOL``: mean over H, W; output ``(C, 1, 1)`` (``keepdims``) or ``(C,)``.
- pointwise: ``RELU``, ``CLIP(lo, hi)``, ``LEAKY_RELU(alpha)``, ``SIGMOID``,
  ``HARD_SIGMOID(alpha, beta)``, ``HARD_SWISH``, ``ELU(alpha)`` (x >= 0 ? x : alpha (e^x - 1)); ``AFFINE`` with per-channel ``scale``/``shift``
  (batch-norm that could not be folded, Keras ``Mul``/``Add`` by constants).
- ``ADD`` / ``MUL``: two or more activations, numpy broadcasting over per-sample shapes
  (residual adds, squeeze-excitation gates ``(C,H,W) * (C,1,1)``).
- ``CONCAT``: along channels (per-sample axis 0).
- ``LRN``: size, alpha, beta, bias (ONNX definition).
- ``PAD``: constant padding of H, W (``pads`` as in conv, ``value``).
- ``RESHAPE``: per-sample reshape of the C-order data (flatten before the classifier).
- ``TRANSPOSE``: per-sample axis permutation (``perm`` over the per-sample axes).
- ``GEMM``: ``W[K_out, K_in]``, ``B[K_out]``: ``y = x @ W.T + B``.
- ``SOFTMAX``: over the last per-sample axis.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np


class Op(enum.Enum):
    INPUT = "input"
    CONV = "conv"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    GLOBAL_AVGPOOL = "global_avgpool"
    RELU = "relu"
    CLIP = "clip"
    LEAKY_RELU = "leaky_relu"
    SIGMOID = "sigmoid"
    HARD_SIGMOID = "hard_sigmoid"
    HARD_SWISH = "hard_swish"
    ELU = "elu"
    AFFINE = "affine"
    ADD = "add"
    MUL = "mul"
    CONCAT = "concat"
    LRN = "lrn"
    PAD = "pad"
    RESHAPE = "reshape"
    TRANSPOSE = "transpose"
    GEMM = "gemm"
    SOFTMAX = "softmax"


# Activation codes of the fused epilogues and the pointwise kernels (CPU and GPU).
ACT_NONE, ACT_RELU, ACT_CLIP, ACT_LEAKY, ACT_SIGMOID, ACT_HSIGMOID, ACT_HSWISH, ACT_ELU = range(8)


@dataclass(frozen=True)
class OpInfo:
    """What the planner and the executors know of a layer type beyond its semantics."""

    rule: str  # IVM rule kind (planner/ivm): input | window | pointwise | merge | global
    display: str  # its name in EXPLAIN's physical operators
    activation: int | None = None  # kernel code, when a conv / add may fuse it
    act_params: tuple[str, ...] = ()  # node params passed to the kernel as (a0, a1)
    # An activation's ONNX operator (attribute defaults = its params' defaults) and its SQL
    # value expression over the DOUBLE column v (placeholders {param}, rendered as literals):
    # onnx_import and sqlviews derive its importer and its view from these two fields.
    onnx: str | None = None
    defaults: tuple[float, ...] = ()  # the act_params' ONNX defaults, in order
    sql: str | None = None


# One row per op: the activation sets and codes, the rule registrations and EXPLAIN's names
# are derived from here (adding an op: the checklist in README.md, "Adding a layer type").
OPS: dict[Op, OpInfo] = {
    Op.INPUT: OpInfo("input", "Input"),
    Op.CONV: OpInfo("window", "Conv2d"),
    Op.MAXPOOL: OpInfo("window", "MaxPool2d"),
    Op.AVGPOOL: OpInfo("window", "AvgPool2d"),
    Op.GLOBAL_AVGPOOL: OpInfo("global", "GlobalAvgPool"),
    Op.RELU: OpInfo("pointwise", "Relu", ACT_RELU, onnx="Relu",
                    sql="CASE WHEN v > 0 THEN v ELSE 0.0 END"),
    # Clip's bounds are inputs in opset >= 11, attributes before: onnx_import.op_Clip
    Op.CLIP: OpInfo("pointwise", "Clip", ACT_CLIP, ("lo", "hi"),
                    sql="least(greatest(v, {lo}), {hi})"),
    Op.LEAKY_RELU: OpInfo("pointwise", "LeakyRelu", ACT_LEAKY, ("alpha",), "LeakyRelu", (0.01,),
                          "CASE WHEN v >= 0 THEN v ELSE v * {alpha} END"),
    Op.SIGMOID: OpInfo("pointwise", "Sigmoid", ACT_SIGMOID, onnx="Sigmoid",
                       sql="1.0 / (1.0 + exp(-v))"),
    Op.HARD_SIGMOID: OpInfo("pointwise", "HardSigmoid", ACT_HSIGMOID, ("alpha", "beta"),
                            "HardSigmoid", (0.2, 0.5),
                            "least(greatest({alpha} * v + {beta}, 0.0), 1.0)"),
    Op.HARD_SWISH: OpInfo("pointwise", "HardSwish", ACT_HSWISH, onnx="HardSwish",
                          sql="v * least(greatest(v / 6.0 + 0.5, 0.0), 1.0)"),
    Op.ELU: OpInfo("pointwise", "Elu", ACT_ELU, ("alpha",), "Elu", (1.0,),
                   "CASE WHEN v >= 0 THEN v ELSE {alpha} * (exp(v) - 1) END"),
    Op.AFFINE: OpInfo("pointwise", "Affine"),
    Op.ADD: OpInfo("merge", "Add"),
    Op.MUL: OpInfo("merge", "Mul"),
    Op.CONCAT: OpInfo("merge", "Concat"),
    Op.LRN: OpInfo("pointwise", "Lrn"),  # across channels only: a position's column
    Op.PAD: OpInfo("global", "Pad"),
    Op.RESHAPE: OpInfo("global", "Reshape"),
    Op.TRANSPOSE: OpInfo("global", "Transpose"),
    Op.GEMM: OpInfo("global", "Gemm"),
    Op.SOFTMAX: OpInfo("global", "Softmax"),
}
assert set(OPS) == set(Op), "every Op needs its row in OPS"
assert all(len(i.defaults) in (0, len(i.act_params)) for i in OPS.values()), "one default per param"


def ops_with_rule(kind: str) -> tuple[Op, ...]:
    """The ops whose IVM rule is of ``kind``, in declaration order."""
    return tuple(op for op, info in OPS.items() if info.rule == kind)


ACTIVATIONS = frozenset(op for op, info in OPS.items() if info.activation is not None)
ACTIVATION_CODES = {op: OPS[op].activation for op in ACTIVATIONS}
POINTWISE = frozenset(ops_with_rule("pointwise"))  # the output has the input's shape
WINDOWED = frozenset(ops_with_rule("window"))
MERGES = frozenset(ops_with_rule("merge"))


@dataclass
class Node:
    """One layer. ``inputs`` are names of producer nodes; ``shape`` is per-sample."""

    name: str
    op: Op
    inputs: tuple[str, ...]
    params: dict = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    shape: tuple[int, ...] = ()

    @property
    def macs(self) -> int:
        """Multiply-adds of one sample (conv and fully connected layers; 0 elsewhere)."""
        if self.op is Op.CONV:
            o, cg, kh, kw = self.weights["W"].shape
            return int(cg * kh * kw * o * self.shape[1] * self.shape[2])
        if self.op is Op.GEMM:
            return int(self.weights["W"].size)
        return 0

    def describe(self) -> str:
        """Short, deterministic one-line description (used by plan printers)."""
        keys = [k for k in self.params if k not in ("keepdims",)]
        ps = ", ".join(f"{k}={_fmt(self.params[k])}" for k in keys)
        return f"{self.op.name}({ps}) -> {'x'.join(map(str, self.shape))}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return str(v)


@dataclass
class Preprocess:
    """How a user's image becomes one model input.

    ``layout`` is the model's own input layout (``NCHW`` or ``NHWC``); pixels are read as RGB
    (or grayscale when ``channels == 1``), resized to ``size`` (H, W) with bilinear filtering,
    multiplied by ``scale`` and normalised per channel: ``(x * scale - mean) / std``.
    """

    size: tuple[int, int]
    layout: str = "NCHW"
    channels: int = 3
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    window: bool = False  # DICOM images: apply the file's window centre / width

    def to_dict(self) -> dict:
        d = {
            "size": list(self.size),
            "layout": self.layout,
            "channels": self.channels,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.window:  # only when set: older stored specs stay byte-identical
            d["window"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(
            size=tuple(int(v) for v in d["size"]),
            layout=d.get("layout", "NCHW"),
            channels=int(d.get("channels", 3)),
            scale=float(d.get("scale", 1.0 / 255.0)),
            mean=tuple(float(v) for v in d.get("mean", (0.0, 0.0, 0.0))),
            std=tuple(float(v) for v in d.get("std", (1.0, 1.0, 1.0))),
            window=bool(d.get("window", False)),
        )


class Graph:
    """Topologically ordered layer DAG with one input and one output node."""

    def __init__(self, nodes: list[Node], output: str, name: str = "model"):
        self.name = name
        self.nodes: list[Node] = list(nodes)
        self.output = output
        self._by_name = {n.name: n for n in self.nodes}
        self.validate()

    # -- structure -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Node:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def num_classes(self) -> int:
        return int(self[self.output].shape[-1])

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.name)
        return out

    def validate(self) -> None:
        if not self.nodes or self.nodes[0].op is not Op.INPUT:
            raise ValueError("graph must start with its INPUT node")
        seen: set[str] = set()
        for n in self.nodes:
            if n.name in seen:
                raise ValueError(f"duplicate node name {n.name!r}")
            for i in n.inputs:
                if i not in seen:
                    raise ValueError(f"node {n.name!r} reads {i!r} before it is defined")
            seen.add(n.name)
        if self.output not in seen:
            raise ValueError(f"output node {self.output!r} not in graph")

    def replace(self, nodes: list[Node], output: str | None = None) -> "Graph":
        return Graph(nodes, output or self.output, self.name)

    def logits_node(self) -> str:
        """The node whose output is the pre-softmax score vector (the output itself if the
        model does not end in a softmax)."""
        out = self[self.output]
        return out.inputs[0] if out.op is Op.SOFTMAX else out.name

    def truncated(self, output: str) -> "Graph":
        """The sub-graph computing ``output`` (dead nodes dropped)."""
        need = {output}
        for n in reversed(self.nodes):
            if n.name in need:
                need.update(n.inputs)
        return Graph([n for n in self.nodes if n.name in need], output, self.name)

    # -- cost ------------------------------------------------------------------------------
    @property
    def macs(self) -> int:
        """Multiply-adds of one full inference (conv + fully connected)."""
        return sum(n.macs for n in self.nodes)

    def summary(self) -> str:
        lines = [f"graph {self.name}: {len(self.nodes)} nodes, {self.macs / 1e9:.3f} GMACs"]
        for n in self.nodes:
            src = ",".join(n.inputs)
            lines.append(f"  {n.name:<40} {n.describe()}  <- {src}")
        return "\n".join(lines)


# -- shape helpers shared by the importer, the executors and the planner --------------------


def pool_out_size(size: int, k: int, s: int, p0: int, p1: int, d: int = 1, ceil: bool = False) -> int:
    """Output length of a window op (conv/pool) along one axis, ONNX/PyTorch rules.

    In ceil mode the last window must start inside the input or the leading padding.

    >>> pool_out_size(224, 3, 1, 1, 1)
    224
    >>> pool_out_size(112, 3, 2, 0, 0, ceil=True)
    56
    """
    eff = d * (k - 1) + 1
    span = size + p0 + p1 - eff
    if span < 0:
        raise ValueError(f"window {eff} larger than padded input {size + p0 + p1}")
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + p0:  # last window would start in the trailing padding
        out -= 1
    return out


def infer_shape(op: Op, params: dict, in_shapes: list[tuple[int, ...]], weights: dict) -> tuple:
    """Per-sample output shape of ``op`` given its inputs' per-sample shapes."""
    s0 = in_shapes[0] if in_shapes else ()
    if op is Op.CONV:
        c, h, w = s0
        o, cg, kh, kw = weights["W"].shape
        g = params["groups"]
        if cg * g != c:
            raise ValueError(f"conv expects {cg * g} input channels, got {c}")
        t, l, b, r = params["pads"]
        dh, dw = params["dilation"]
        sh, sw = params["stride"]
        return (o, pool_out_size(h, kh, sh, t, b, dh), pool_out_size(w, kw, sw, l, r, dw))
    if op in (Op.MAXPOOL, Op.AVGPOOL):
        c, h, w = s0
        kh, kw = params["kernel"]
        sh, sw = params["stride"]
        t, l, b, r = params["pads"]
        cm = params.get("ceil_mode", False)
        return (c, pool_out_size(h, kh, sh, t, b, 1, cm), pool_out_size(w, kw, sw, l, r, 1, cm))
    if op is Op.GLOBAL_AVGPOOL:
        return (s0[0], 1, 1) if params.get("keepdims", True) else (s0[0],)
    if op in POINTWISE or op in (Op.LRN, Op.SOFTMAX):
        return s0
    if op in (Op.ADD, Op.MUL):
        return tuple(int(v) for v in np.broadcast_shapes(*in_shapes))
    if op is Op.CONCAT:
        rest = {s[1:] for s in in_shapes}
        if len(rest) != 1:
            raise ValueError(f"concat inputs disagree outside the channel axis: {in_shapes}")
        return (sum(s[0] for s in in_shapes),) + in_shapes[0][1:]
    if op is Op.PAD:
        c, h, w = s0
        t, l, b, r = params["pads"]
        return (c, h + t + b, w + l + r)
    if op is Op.RESHAPE:
        shape = tuple(params["shape"])
        if math.prod(shape) != math.prod(s0):
            raise ValueError(f"reshape {s0} -> {shape} changes the element count")
        return shape
    if op is Op.TRANSPOSE:
        return tuple(s0[i] for i in params["perm"])
    if op is Op.GEMM:
        ko, ki = weights["W"].shape
        if s0 != (ki,):
            raise ValueError(f"fully connected layer expects ({ki},) features, got {s0}")
        return (ko,)
    raise ValueError(f"no shape rule for {op}")
