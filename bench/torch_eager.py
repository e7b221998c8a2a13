"""PyTorch eager baseline: runs a krypton_db Graph with torch.nn.functional ops (the kernels are
PyTorch's own; the per-layer Python dispatch is what an eager nn.Module does too)."""

from __future__ import annotations

import numpy as np


def torch_forward(graph, batch_nchw: np.ndarray, threads: int = 2) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from krypton_db.graph import Op

    torch.set_num_threads(threads)
    cache = getattr(graph, "_torch_w", None)
    if cache is None:
        cache = graph._torch_w = {n.name: {k: torch.from_numpy(np.ascontiguousarray(v, np.float32))
                                           for k, v in n.weights.items()} for n in graph.nodes}
    vals = {}
    with torch.inference_mode():
        for n in graph.nodes:
            p, w = n.params, cache[n.name]
            ins = [vals[i] for i in n.inputs]
            x = ins[0] if ins else None
            op = n.op
            if op is Op.INPUT:
                y = torch.from_numpy(batch_nchw)
            elif op is Op.CONV:
                t, l, b, r = p["pads"]
                if (t, l) != (b, r):
                    x, pad = F.pad(x, (l, r, t, b)), 0
                else:
                    pad = (t, l)
                y = F.conv2d(x, w["W"], w["B"], p["stride"], pad, p["dilation"], p["groups"])
            elif op in (Op.MAXPOOL, Op.AVGPOOL):
                t, l, b, r = p["pads"]
                if op is Op.MAXPOOL:
                    y = F.max_pool2d(x, p["kernel"], p["stride"], (t, l), ceil_mode=p["ceil_mode"])
                else:
                    y = F.avg_pool2d(x, p["kernel"], p["stride"], (t, l), ceil_mode=p["ceil_mode"],
                                     count_include_pad=p["count_include_pad"])
            elif op is Op.GLOBAL_AVGPOOL:
                y = x.mean(dim=(2, 3), keepdim=p.get("keepdims", True))
            elif op is Op.RELU:
                y = F.relu(x)
            elif op is Op.CLIP:
                y = x.clamp(p["lo"], p["hi"])
            elif op is Op.LEAKY_RELU:
                y = F.leaky_relu(x, p["alpha"])
            elif op is Op.SIGMOID:
                y = torch.sigmoid(x)
            elif op is Op.HARD_SIGMOID:
                y = (p["alpha"] * x + p["beta"]).clamp(0, 1)
            elif op is Op.HARD_SWISH:
                y = F.hardswish(x)
            elif op is Op.AFFINE:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                y = x * w["scale"].reshape(shape) + w["shift"].reshape(shape)
            elif op is Op.ADD:
                y = sum(ins[1:], ins[0])
            elif op is Op.MUL:
                y = ins[0] * ins[1]
            elif op is Op.CONCAT:
                y = torch.cat(ins, 1)
            elif op is Op.RESHAPE:
                y = x.reshape((x.shape[0],) + tuple(n.shape))
            elif op is Op.TRANSPOSE:
                y = x.permute((0,) + tuple(a + 1 for a in p["perm"]))
            elif op is Op.GEMM:
                y = F.linear(x, w["W"], w["B"])
            elif op is Op.SOFTMAX:
                y = F.softmax(x, -1)
            elif op is Op.LRN:
                y = F.local_response_norm(x, p["size"], p["alpha"], p["beta"], p["bias"])
            else:
                raise NotImplementedError(op)
            vals[n.name] = y
    return vals[graph.output].numpy()
