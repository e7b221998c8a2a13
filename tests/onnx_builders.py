"""Tiny ONNX models built with onnx.helper for layer tests (run by ONNX Runtime as the
independent oracle, and by our importer + executors)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Net:
    """Incremental builder: ``t = net.conv(t, ...)``; ``net.model()`` at the end."""

    def __init__(self, shape, seed=0, name="net", opset=17):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape = list(shape)  # full input shape, batch first (symbolic)
        self.name, self.opset, self.k = name, opset, 0

    def _n(self, prefix):
        self.k += 1
        return f"{prefix}{self.k}"

    def const(self, arr, prefix="c"):
        name = self._n(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type, inputs, n_out=1, **attrs):
        outs = [self._n(op_type.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._n(op_type + "."), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=(3, 3), stride=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1),
             group=1, bias=True):
        w = self.rng.normal(0, np.sqrt(2.0 / (cin // group * k[0] * k[1])),
                            (cout, cin // group) + tuple(k)).astype(np.float32)
        ins = [x, self.const(w, "W")]
        if bias:
            ins.append(self.const(self.rng.normal(0, 0.1, cout).astype(np.float32), "B"))
        return self.op("Conv", ins, kernel_shape=list(k), strides=list(stride), pads=list(pads),
                       dilations=list(dil), group=group)

    def bn(self, x, c):
        r = self.rng
        args = [r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 2, c)]
        return self.op("BatchNormalization", [x] + [self.const(a.astype(np.float32)) for a in args],
                       epsilon=1e-3)

    def gemm(self, x, kin, kout, trans_b=1):
        w = self.rng.normal(0, np.sqrt(1.0 / kin), (kout, kin) if trans_b else (kin, kout))
        b = self.rng.normal(0, 0.1, kout)
        return self.op("Gemm", [x, self.const(w.astype(np.float32)), self.const(b.astype(np.float32))],
                       transB=trans_b)

    def model(self, out, out_rank=2):
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N"] + self.shape[1:])
        outp = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N"] + ["?"] * (out_rank - 1))
        g = helper.make_graph(self.nodes, self.name, [inp], [outp], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def ort_run(model: onnx.ModelProto, x: np.ndarray, outputs=None) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, {sess.get_inputs()[0].name: x})


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the given intermediate tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(onnx.ValueInfoProto(name=n))
    return m


def logits_tensor(model: onnx.ModelProto) -> str:
    """Name of the tensor feeding the final Softmax."""
    out = model.graph.output[0].name
    for n in model.graph.node:
        if out in n.output and n.op_type == "Softmax":
            return n.input[0]
    for n in model.graph.node:  # Identity between softmax and output (paddle exports)
        if out in n.output and n.op_type == "Identity":
            src = n.input[0]
            for m in model.graph.node:
                if src in m.output and m.op_type == "Softmax":
                    return m.input[0]
    raise ValueError("model does not end in Softmax")
