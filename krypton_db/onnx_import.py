"""ONNX -> :class:`~krypton_db.graph.Graph`.

Invariant: the importer either returns a graph whose every node has a static per-sample
shape and canonical weights, or raises one :class:`ModelError` that lists *every* offending
node (op type and node name) at once, so a user fixes a model in one round trip.

Pipeline (each a named step below):
1. ``_read``: parse the file (truncated/corrupt files -> clear error).
2. ``_Importer.run``: walk the ONNX nodes in order. Tensors are either *constants* (numpy
   arrays: initializers, ``Constant`` nodes, and anything computed only from constants and
   from ``Shape`` of an activation, i.e. the shape subgraphs that exporters emit) or
   *activations* (a graph node). Constant subgraphs are folded by a small numpy evaluator;
   activation ops become graph nodes.
3. ``simplify``: fold the input transpose of NHWC models into the input layout, fold
   affine/batch-norm nodes into the preceding conv or fully connected layer, fold zero
   ``Pad`` into the next conv, drop identities and dead nodes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import ModelError
from .graph import OPS, Graph, Node, Op, infer_shape
from .graph_passes import simplify

# A batch size used only while folding shape subgraphs (``Shape`` of an activation). A prime
# nobody uses as a real dimension, so the folded Reshape target can tell "batch" apart.
_BATCH = 9973


def _read(source) -> tuple["onnx.ModelProto", tuple[Path, ...]]:  # noqa: F821
    """The parsed model with its external data loaded, and the files that hold it: the ONNX
    file, then each external-data file once, in first-use order (their bytes define the model
    as much as the ONNX file's do: ``digests.files_digest`` hashes all of them)."""
    import onnx

    path = Path(source)
    if not path.is_file():
        raise ModelError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"cannot parse ONNX file {path} (truncated or not an ONNX model): {exc}")
    if not model.graph.node:
        raise ModelError(f"ONNX file {path} has an empty graph (truncated or not a model)")
    data_files = _external_data_files(model.graph, path.parent)
    folder = path.parent.resolve()
    for f in data_files:
        if not f.resolve().is_relative_to(folder):  # onnx's rule too; checked before any read
            raise ModelError(f"ONNX file {path} names external data {f} outside its folder "
                             "(external data must lie in the model's folder, at a relative location)")
        if not f.is_file():
            raise ModelError(f"ONNX file {path} keeps weights in {f}, which does not exist (external "
                             "data files must stay beside the model, at the location it names)")
    if data_files:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # a short file, an offset past its end, a location outside the folder
            raise ModelError(f"cannot read the external data of ONNX file {path}: {exc}") from None
    return model, (path, *data_files)


def _external_data_files(graph, base: Path) -> tuple[Path, ...]:
    """The external-data files the tensors of ``graph`` (initializers, constant attributes,
    subgraphs) name, once each, in first-use order. Written here over the public proto fields:
    onnx's own walker (``external_data_helper._get_all_tensors``) is private."""
    from onnx import AttributeProto, TensorProto
    from onnx.external_data_helper import ExternalDataInfo

    found: dict[Path, None] = {}

    def tensor(t):
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
            found.setdefault(base / ExternalDataInfo(t).location, None)

    def walk(g):
        for t in g.initializer:
            tensor(t)
        for node in g.node:
            for a in node.attribute:
                if a.type == AttributeProto.TENSOR:
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.type == AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(graph)
    return tuple(found)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


class _Synthetic:
    """A node the importer adds that the ONNX graph does not have (named after ``name``; its
    value becomes ``output``)."""

    def __init__(self, name: str, output: str):
        self.name, self.output = name, [output]


class _Act:
    """An activation tensor: produced by graph node ``node`` with per-sample ``shape``."""

    __slots__ = ("node", "shape")

    def __init__(self, node: str, shape: tuple[int, ...]):
        self.node, self.shape = node, tuple(int(v) for v in shape)


class _Importer:
    def __init__(self, model, name: str):
        from onnx import numpy_helper

        self.model = model
        self.name = name
        self.nodes: list[Node] = []
        self.env: dict[str, object] = {}
        self.problems: list[str] = []
        self.names: set[str] = set()
        g = model.graph
        for init in g.initializer:
            self.env[init.name] = numpy_helper.to_array(init)
        real_inputs = [i for i in g.input if i.name not in self.env]
        if len(real_inputs) != 1:
            raise ModelError(
                f"expected exactly one image input, found {len(real_inputs)}: "
                f"{[i.name for i in real_inputs]}"
            )
        self._add_input(real_inputs[0])

    # -- helpers ---------------------------------------------------------------------------
    def _add_input(self, vi) -> None:
        tt = vi.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        if len(dims) != 4:
            raise ModelError(
                f"input {vi.name!r} has rank {len(dims)} (shape {dims}); an image classifier "
                "needs a rank-4 input [N, C, H, W] or [N, H, W, C]"
            )
        dynamic = [i for i, d in enumerate(dims[1:], 1) if not isinstance(d, int) or d <= 0]
        if dynamic:
            raise ModelError(
                f"input {vi.name!r} has dynamic non-batch dimensions {dims}: axes "
                f"{dynamic} must be fixed sizes (only the batch axis may be symbolic); "
                "re-export the model with a fixed input size"
            )
        from onnx import TensorProto

        if tt.elem_type not in (TensorProto.FLOAT, 0):
            raise ModelError(f"input {vi.name!r} must be float32, not ONNX type {tt.elem_type}")
        self.input_name = vi.name
        # a model exported with a fixed batch size bakes it into its Reshape targets
        self.static_batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        self.input_dims = tuple(int(d) for d in dims[1:])
        node = Node(_uniq(self.names, vi.name), Op.INPUT, (), {}, {}, self.input_dims)
        self.nodes.append(node)
        self.env[vi.name] = _Act(node.name, node.shape)

    def add(self, onnx_node, op: Op, inputs: list[_Act], params=None, weights=None, out=0):
        params = params or {}
        weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (weights or {}).items()}
        name = _uniq(self.names, onnx_node.name or onnx_node.output[0])
        shape = infer_shape(op, params, [a.shape for a in inputs], weights)
        node = Node(name, op, tuple(a.node for a in inputs), params, weights, shape)
        self.nodes.append(node)
        self.env[onnx_node.output[out]] = _Act(name, shape)
        return node

    def const(self, name: str):
        v = self.env.get(name)
        return None if isinstance(v, _Act) else v

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> Graph:
        for n in self.model.graph.node:
            handler = getattr(self, "op_" + n.op_type, None)
            if n.domain not in ("", "ai.onnx") or handler is None:
                self.problems.append(f"unsupported op {n.op_type!r} (node {n.name!r})")
                for o in n.output:  # keep walking to report every offending node
                    self.env[o] = _Poison()
                continue
            ins = [self.env.get(i) if i else None for i in n.input]
            if any(isinstance(v, _Poison) for v in ins):
                for o in n.output:
                    self.env[o] = _Poison()
                continue
            missing = [i for i, v in zip(n.input, ins) if i and v is None]
            if missing:
                raise ModelError(f"node {n.name!r} ({n.op_type}) reads undefined tensors {missing}")
            try:
                handler(n, ins, _attrs(n))
            except ModelError as exc:
                self.problems.append(f"{exc} (node {n.name!r}, op {n.op_type})")
                for o in n.output:
                    self.env[o] = _Poison()
            except ValueError as exc:
                self.problems.append(f"{n.op_type} node {n.name!r}: {exc}")
                for o in n.output:
                    self.env[o] = _Poison()
        if self.problems:
            raise ModelError(
                f"model {self.name!r} cannot be imported; {len(self.problems)} problem(s):\n  - "
                + "\n  - ".join(self.problems)
                + "\nsupported ONNX ops: " + ", ".join(SUPPORTED_OPS)
            )
        outs = [o.name for o in self.model.graph.output]
        if not outs or not isinstance(self.env.get(outs[0]), _Act):
            raise ModelError(f"graph output {outs[:1]} is not computed from the image input")
        out = self.env[outs[0]]
        if len(out.shape) > 1 and all(d == 1 for d in out.shape[1:]):
            # [N, K, 1, 1] (a conv classifier head, e.g. SqueezeNet, DenseNet): read as [N, K]
            out = self.add(_Synthetic(f"{outs[0]}_classes", outs[0]), Op.RESHAPE, [out],
                           {"shape": (out.shape[0],)})
            out = self.env[outs[0]]
        if len(out.shape) != 1:
            raise ModelError(
                f"graph output {outs[0]!r} has per-sample shape {out.shape}; a classifier "
                "must output [N, classes] (or [N, classes, 1, 1])"
            )
        return Graph(self.nodes, out.node, self.name)

    # -- constant folding ------------------------------------------------------------------
    def _fold(self, n, ins, fn) -> bool:
        """Evaluate ``fn`` if every input is constant; returns True when folded."""
        if any(isinstance(v, _Act) for v in ins if v is not None):
            return False
        res = fn(*ins)
        if not isinstance(res, tuple):
            res = (res,)
        for name, val in zip(n.output, res):
            self.env[name] = np.asarray(val)
        return True

    def op_Constant(self, n, ins, a):
        from onnx import numpy_helper

        if "value" in a:
            v = numpy_helper.to_array(a["value"])
        elif "value_float" in a:
            v = np.array(a["value_float"], np.float32)
        elif "value_floats" in a:
            v = np.array(a["value_floats"], np.float32)
        elif "value_int" in a:
            v = np.array(a["value_int"], np.int64)
        elif "value_ints" in a:
            v = np.array(a["value_ints"], np.int64)
        else:
            raise ModelError(f"Constant with attributes {sorted(a)} is not supported")
        self.env[n.output[0]] = v

    def op_Shape(self, n, ins, a):
        x = ins[0]
        full = (_BATCH,) + x.shape if isinstance(x, _Act) else np.shape(x)
        start, end = a.get("start", 0), a.get("end", None)
        self.env[n.output[0]] = np.array(full[start:end], np.int64)

    def op_Gather(self, n, ins, a):
        if not self._fold(n, ins, lambda d, i: np.take(d, i, axis=a.get("axis", 0))):
            raise ModelError("Gather on an activation tensor is not supported")

    def op_Unsqueeze(self, n, ins, a):
        axes = a.get("axes") if "axes" in a else (ins[1].tolist() if len(ins) > 1 else None)
        if self._fold(n, ins[:1], lambda d: np.expand_dims(d, tuple(axes))):
            return
        x = ins[0]
        nd = len(x.shape) + 1 + len(axes)
        shape = list((_BATCH,) + x.shape)
        for ax in sorted(v % nd for v in axes):
            shape.insert(ax, 1)
        if shape[0] != _BATCH:
            raise ModelError("Unsqueeze before the batch axis is not supported")
        self.add(n, Op.RESHAPE, [x], {"shape": tuple(shape[1:])})

    def op_Squeeze(self, n, ins, a):
        axes = a.get("axes") if "axes" in a else (ins[1].tolist() if len(ins) > 1 else None)
        if self._fold(n, ins[:1], lambda d: np.squeeze(d, tuple(axes) if axes else None)):
            return
        x = ins[0]
        full = (_BATCH,) + x.shape
        axes = [v % len(full) for v in axes] if axes else [i for i, d in enumerate(full) if d == 1]
        if 0 in axes:
            raise ModelError("Squeeze of the batch axis is not supported")
        shape = tuple(d for i, d in enumerate(x.shape, 1) if i not in axes)
        self.add(n, Op.RESHAPE, [x], {"shape": shape})

    def op_Cast(self, n, ins, a):
        from onnx import TensorProto, helper

        to = helper.tensor_dtype_to_np_dtype(a["to"])
        if self._fold(n, ins, lambda d: d.astype(to)):
            return
        if a["to"] not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            raise ModelError(f"Cast of an activation to {to} is not supported")
        self.env[n.output[0]] = ins[0]

    def op_Slice(self, n, ins, a):
        if isinstance(ins[0], _Act):
            raise ModelError("Slice of an activation tensor is not supported")

        def f(d, starts, ends, axes=None, steps=None):
            axes = list(range(len(starts))) if axes is None else axes
            steps = [1] * len(starts) if steps is None else steps
            sl = [slice(None)] * d.ndim
            for s, e, ax, st in zip(starts, ends, axes, steps):
                sl[int(ax)] = slice(int(s), int(e), int(st))
            return d[tuple(sl)]

        if "starts" in a:  # opset < 10
            self.env[n.output[0]] = f(ins[0], a["starts"], a["ends"], a.get("axes"))
        else:
            self._fold(n, ins, f)

    def op_ConstantOfShape(self, n, ins, a):
        from onnx import numpy_helper

        val = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        self._fold(n, ins, lambda s: np.full(tuple(int(v) for v in s), val.ravel()[0], val.dtype))

    def op_Identity(self, n, ins, a):
        self.env[n.output[0]] = ins[0]

    def op_Dropout(self, n, ins, a):
        self.env[n.output[0]] = ins[0]  # inference: identity (the mask output is unused)

    # -- layers ----------------------------------------------------------------------------
    def _pads(self, a, in_hw, kernel, stride, dilation):
        auto = _s(a.get("auto_pad", "NOTSET"))
        if auto in ("NOTSET", ""):
            p = list(a.get("pads", [0, 0, 0, 0]))
            if len(p) != 4:
                raise ModelError(f"only 2-D windows are supported (pads {p})")
            return (p[0], p[1], p[2], p[3])
        if auto == "VALID":
            return (0, 0, 0, 0)
        pads = []
        for size, k, s, d in zip(in_hw, kernel, stride, dilation):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
        return (pads[0][0], pads[1][0], pads[0][1], pads[1][1])

    def op_Conv(self, n, ins, a):
        x, w = ins[0], ins[1]
        if not isinstance(x, _Act) or isinstance(w, _Act) or w is None:
            raise ModelError("Conv needs an activation input and constant weights")
        if w.ndim != 4:
            raise ModelError(f"only 2-D convolution is supported (weight rank {w.ndim})")
        b = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros(w.shape[0], np.float32)
        if isinstance(b, _Act):
            raise ModelError("Conv bias must be constant")
        k = tuple(a.get("kernel_shape", w.shape[2:]))
        s = tuple(a.get("strides", (1, 1)))
        d = tuple(a.get("dilations", (1, 1)))
        params = {
            "kernel": k, "stride": s, "pads": self._pads(a, x.shape[1:], k, s, d),
            "dilation": d, "groups": int(a.get("group", 1)),
        }
        self.add(n, Op.CONV, [x], params, {"W": w, "B": b})

    def op_BatchNormalization(self, n, ins, a):
        x, gamma, beta, mean, var = ins[:5]
        if any(isinstance(v, _Act) for v in (gamma, beta, mean, var)):
            raise ModelError("BatchNormalization parameters must be constant")
        scale = gamma / np.sqrt(var.astype(np.float64) + a.get("epsilon", 1e-5))
        shift = beta - mean * scale
        self._affine(n, x, scale, shift)

    def _affine(self, n, x, scale, shift):
        c = x.shape[0]
        scale = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (c,)).copy()
        shift = np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (c,)).copy()
        self.add(n, Op.AFFINE, [x], {}, {"scale": scale, "shift": shift})

    def _pointwise(op, **defaults):
        def handler(self, n, ins, a):
            if not isinstance(ins[0], _Act):
                raise ModelError(f"{n.op_type} on constants only is not supported")
            params = {k: float(a.get(k, v)) for k, v in defaults.items()}
            self.add(n, op, [ins[0]], params)

        return handler


    def op_Clip(self, n, ins, a):
        lo = a.get("min", -np.inf)
        hi = a.get("max", np.inf)
        if len(ins) > 1 and ins[1] is not None:
            lo = float(np.asarray(ins[1]))
        if len(ins) > 2 and ins[2] is not None:
            hi = float(np.asarray(ins[2]))
        self.add(n, Op.CLIP, [ins[0]], {"lo": float(lo), "hi": float(hi)})

    def _pool(self, n, ins, a, op):
        x = ins[0]
        if len(x.shape) != 3:
            raise ModelError(f"pooling expects a feature map, got per-sample shape {x.shape}")
        k = tuple(a["kernel_shape"])
        s = tuple(a.get("strides", (1, 1)))
        d = tuple(a.get("dilations", (1, 1)))
        if len(k) != 2:
            raise ModelError(f"only 2-D pooling is supported (kernel {k})")
        if d != (1, 1):
            raise ModelError(f"dilated pooling (dilations {d}) is not supported")
        params = {"kernel": k, "stride": s, "pads": self._pads(a, x.shape[1:], k, s, d),
                  "ceil_mode": bool(a.get("ceil_mode", 0))}
        if op is Op.AVGPOOL:
            params["count_include_pad"] = bool(a.get("count_include_pad", 0))
        self.add(n, op, [x], params)

    def op_MaxPool(self, n, ins, a):
        if len(n.output) > 1 and n.output[1]:
            raise ModelError("MaxPool with an Indices output is not supported")
        self._pool(n, ins, a, Op.MAXPOOL)

    def op_AveragePool(self, n, ins, a):
        self._pool(n, ins, a, Op.AVGPOOL)

    def op_GlobalAveragePool(self, n, ins, a):
        self.add(n, Op.GLOBAL_AVGPOOL, [ins[0]], {"keepdims": True})

    def op_ReduceMean(self, n, ins, a):
        x = ins[0]
        axes = a.get("axes") if "axes" in a else (ins[1].tolist() if len(ins) > 1 else None)
        if not isinstance(x, _Act):
            self._fold(n, ins[:1], lambda d: d.mean(axis=tuple(axes), keepdims=bool(a.get("keepdims", 1))))
            return
        if axes is None or sorted(v % 4 for v in axes) != [2, 3] or len(x.shape) != 3:
            raise ModelError(f"ReduceMean is supported over the spatial axes [2, 3] only (axes {axes})")
        self.add(n, Op.GLOBAL_AVGPOOL, [x], {"keepdims": bool(a.get("keepdims", 1))})

    def _binary(self, n, ins, kind):
        fns = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
        if self._fold(n, ins, fns[kind]):
            return
        acts = [v for v in ins if isinstance(v, _Act)]
        if len(acts) == 2:
            if kind in ("Add", "Mul"):
                self.add(n, Op.ADD if kind == "Add" else Op.MUL, acts)
                return
            raise ModelError(f"{kind} of two activations is not supported")
        x = acts[0]
        const = ins[1] if isinstance(ins[0], _Act) else ins[0]
        const_first = not isinstance(ins[0], _Act)
        c = self._per_channel(x, np.asarray(const, np.float64))
        if kind == "Add":
            self._affine(n, x, 1.0, c)
        elif kind == "Mul":
            self._affine(n, x, c, 0.0)
        elif kind == "Sub":
            self._affine(n, x, -1.0, c) if const_first else self._affine(n, x, 1.0, -c)
        elif const_first:
            raise ModelError("division of a constant by an activation is not supported")
        else:
            self._affine(n, x, 1.0 / c, 0.0)

    def _per_channel(self, x: _Act, c: np.ndarray) -> np.ndarray:
        """Reduce a broadcast constant to one value per channel (axis 1 of the full tensor)."""
        full_rank = len(x.shape) + 1
        if c.ndim > full_rank:
            raise ModelError(f"constant of shape {c.shape} does not broadcast to {x.shape}")
        c = c.reshape((1,) * (full_rank - c.ndim) + c.shape)
        if c.shape[0] != 1 or any(d != 1 for d in c.shape[2:]) or c.shape[1] not in (1, x.shape[0]):
            raise ModelError(
                f"elementwise constant of shape {c.shape} is not per-channel for an activation "
                f"of per-sample shape {x.shape}; only per-channel or scalar constants are supported"
            )
        return c.reshape(-1)

    def op_Add(self, n, ins, a):
        self._binary(n, ins, "Add")

    def op_Sub(self, n, ins, a):
        self._binary(n, ins, "Sub")

    def op_Mul(self, n, ins, a):
        self._binary(n, ins, "Mul")

    def op_Div(self, n, ins, a):
        self._binary(n, ins, "Div")

    def op_Sum(self, n, ins, a):
        if self._fold(n, ins, lambda *xs: sum(xs)):
            return
        if not all(isinstance(v, _Act) for v in ins):
            raise ModelError("Sum of activations and constants is not supported")
        if len(ins) == 1:
            self.env[n.output[0]] = ins[0]
        else:
            self.add(n, Op.ADD, ins)

    def op_Concat(self, n, ins, a):
        axis = a["axis"]
        if self._fold(n, ins, lambda *xs: np.concatenate(xs, axis=axis)):
            return
        if not all(isinstance(v, _Act) for v in ins):
            raise ModelError("Concat of activations with constants is not supported")
        rank = len(ins[0].shape) + 1
        if axis % rank != 1:
            raise ModelError(f"Concat is supported along the channel axis only (axis {axis})")
        self.add(n, Op.CONCAT, ins)

    def op_LRN(self, n, ins, a):
        params = {"size": int(a["size"]), "alpha": float(a.get("alpha", 1e-4)),
                  "beta": float(a.get("beta", 0.75)), "bias": float(a.get("bias", 1.0))}
        self.add(n, Op.LRN, [ins[0]], params)

    def op_Flatten(self, n, ins, a):
        axis = a.get("axis", 1)
        if self._fold(n, ins, lambda d: d.reshape(int(np.prod(d.shape[:axis])), -1)):
            return
        if axis != 1:
            raise ModelError(f"Flatten is supported with axis=1 only (axis {axis})")
        self.add(n, Op.RESHAPE, [ins[0]], {"shape": (math.prod(ins[0].shape),)})

    def op_Reshape(self, n, ins, a):
        x, target = ins[0], ins[1]
        if isinstance(target, _Act):
            raise ModelError("Reshape target shape depends on activation values")
        if self._fold(n, ins, lambda d, s: d.reshape(_resolve(d.shape, s, a.get("allowzero", 0)))):
            return
        target = [int(v) for v in np.asarray(target).ravel()]
        if not target or target[0] not in (_BATCH, -1, 0, 1, self.static_batch):
            raise ModelError(f"Reshape to {target} mixes the batch axis with others")
        rest = target[1:]
        if target[0] == -1 and -1 not in rest:
            pass  # [-1, K...]: the batch stays the batch as long as K covers one sample
        per = _resolve((1,) + x.shape, [1] + rest, 0)[1:]
        if math.prod(per) != math.prod(x.shape):
            raise ModelError(f"Reshape to {target} changes the per-sample size {x.shape}")
        self.add(n, Op.RESHAPE, [x], {"shape": tuple(int(v) for v in per)})

    def op_Transpose(self, n, ins, a):
        perm = a.get("perm")
        if self._fold(n, ins, lambda d: np.transpose(d, perm)):
            return
        x = ins[0]
        perm = list(perm) if perm is not None else list(range(len(x.shape), -1, -1))
        if perm[0] != 0:
            raise ModelError(f"Transpose moving the batch axis is not supported (perm {perm})")
        self.add(n, Op.TRANSPOSE, [x], {"perm": tuple(p - 1 for p in perm[1:])})

    def op_Gemm(self, n, ins, a):
        x, w = ins[0], ins[1]
        if not isinstance(x, _Act) or isinstance(w, _Act):
            raise ModelError("Gemm needs an activation A and constant B")
        if a.get("transA", 0):
            raise ModelError("Gemm with transA=1 is not supported")
        w = w if a.get("transB", 0) else w.T
        c = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros(w.shape[0], np.float32)
        if isinstance(c, _Act):
            raise ModelError("Gemm bias must be constant")
        alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
        bias = np.broadcast_to(np.asarray(c, np.float32).reshape(-1), (w.shape[0],)) * beta
        self.add(n, Op.GEMM, [x], {}, {"W": w * alpha if alpha != 1.0 else w, "B": bias})

    def op_MatMul(self, n, ins, a):
        if self._fold(n, ins, np.matmul):
            return
        x, w = ins[0], ins[1]
        if not isinstance(x, _Act) or isinstance(w, _Act) or w.ndim != 2:
            raise ModelError("MatMul is supported as activation [N, K] @ constant [K, M] only")
        self.add(n, Op.GEMM, [x], {}, {"W": w.T, "B": np.zeros(w.shape[1], np.float32)})

    def op_Softmax(self, n, ins, a):
        x = ins[0]
        nd = len(x.shape) + 1
        axis = a.get("axis", -1 if self.model.opset_import[0].version >= 13 else 1)
        # axis 1 with only 1s after it: the class axis, whether the opset flattens from the
        # axis on (< 13) or normalizes along it alone (>= 13)
        if axis % nd != 1 or any(d != 1 for d in x.shape[1:]):
            raise ModelError(f"Softmax is supported over the class axis of [N, K] or "
                             f"[N, K, 1, 1] only (axis {axis} of per-sample shape {x.shape})")
        if len(x.shape) > 1:  # [N, K, 1, 1] -> [N, K]: the same softmax, one class axis
            x = self.add(_Synthetic(f"{n.name or n.output[0]}_classes", n.output[0]), Op.RESHAPE,
                         [x], {"shape": (x.shape[0],)})
            x = self.env[n.output[0]]
        self.add(n, Op.SOFTMAX, [x])

    def op_Pad(self, n, ins, a):
        x = ins[0]
        mode = _s(a.get("mode", "constant"))
        if mode != "constant":
            raise ModelError(f"Pad mode {mode!r} is not supported (constant only)")
        pads = list(a["pads"]) if "pads" in a else [int(v) for v in ins[1]]
        value = float(a.get("value", 0.0))
        if len(ins) > 2 and ins[2] is not None:
            value = float(np.asarray(ins[2]).ravel()[0])
        if len(ins) > 3 and ins[3] is not None:
            raise ModelError("Pad with explicit axes is not supported")
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
            raise ModelError(f"Pad is supported on the spatial axes only, non-negative (pads {pads})")
        self.add(n, Op.PAD, [x], {"pads": (pads[2], pads[3], pads[6], pads[7]), "value": value})


# activations importable by name: the graph.OPS rows with an ONNX operator
for _op, _info in OPS.items():
    if _info.onnx is not None:
        setattr(_Importer, f"op_{_info.onnx}",
                _Importer._pointwise(_op, **dict(zip(_info.act_params, _info.defaults))))

SUPPORTED_OPS = sorted(name[3:] for name in vars(_Importer) if name.startswith("op_"))


class _Poison:
    """Marks outputs of a node that could not be imported (keeps the walk going)."""


def _resolve(shape, target, allowzero) -> tuple:
    target = [int(v) for v in np.asarray(target).ravel()]
    out = [shape[i] if (v == 0 and not allowzero) else v for i, v in enumerate(target)]
    if -1 in out:
        known = math.prod(v for v in out if v != -1)
        out[out.index(-1)] = math.prod(shape) // max(known, 1)
    return tuple(out)


def _uniq(names: set[str], base: str) -> str:
    name, i = base, 1
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def import_onnx(source, name: str | None = None) -> tuple[Graph, str, "onnx.ModelProto"]:  # noqa: F821
    """Load an ONNX classifier; returns (graph, input layout 'NCHW'|'NHWC', the ONNX model)."""
    return import_onnx_files(source, name)[:3]


def import_onnx_files(source, name: str | None = None) -> tuple[Graph, str, "onnx.ModelProto", tuple[Path, ...]]:  # noqa: F821
    """``import_onnx``, and the files that define the model: the ONNX file, then its
    external-data files (what its content address covers)."""
    model, data_files = _read(source)
    imp = _Importer(model, name or Path(source).stem)
    g = imp.run()
    g, layout = simplify(g)
    if len(g.input.shape) != 3:
        raise ModelError(f"input per-sample shape {g.input.shape} is not an image")
    return g, layout, model, data_files
