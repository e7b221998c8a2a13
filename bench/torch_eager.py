"""PyTorch eager baseline: runs a krypton_db Graph with torch.nn.functional ops on any device
(the kernels are PyTorch's own; the per-layer Python dispatch is what an eager nn.Module does
too). Used by bench/full.py (CPU) and bench/gpu.py (CUDA)."""

from __future__ import annotations

import numpy as np

from krypton_db.graph import Op


class TorchGraph:
    """Runs a krypton_db Graph with torch.nn.functional on ``device`` (weights uploaded once)."""

    def __init__(self, graph, device: str):
        import torch

        self.torch = torch
        self.graph = graph
        self.device = device
        self.w = {n.name: {k: torch.tensor(np.asarray(v, np.float32), device=device)
                           for k, v in n.weights.items()} for n in graph.nodes}

    def __call__(self, x):
        torch = self.torch
        import torch.nn.functional as F

        vals = {}
        with torch.inference_mode():
            for n in self.graph.nodes:
                p, w = n.params, self.w[n.name]
                ins = [vals[i] for i in n.inputs]
                x0 = ins[0] if ins else None
                op = n.op
                if op is Op.INPUT:
                    y = x
                elif op is Op.CONV:
                    t, l, b, r = p["pads"]
                    if (t, l) != (b, r):
                        x0, pad = F.pad(x0, (l, r, t, b)), 0
                    else:
                        pad = (t, l)
                    y = F.conv2d(x0, w["W"], w["B"], p["stride"], pad, p["dilation"], p["groups"])
                elif op in (Op.MAXPOOL, Op.AVGPOOL):
                    t, l, b, r = p["pads"]
                    if (t, l) != (b, r):
                        raise NotImplementedError("asymmetric pooling padding")
                    if op is Op.MAXPOOL:
                        y = F.max_pool2d(x0, p["kernel"], p["stride"], (t, l), ceil_mode=p["ceil_mode"])
                    else:
                        y = F.avg_pool2d(x0, p["kernel"], p["stride"], (t, l), ceil_mode=p["ceil_mode"],
                                         count_include_pad=p["count_include_pad"])
                elif op is Op.GLOBAL_AVGPOOL:
                    y = x0.mean(dim=(2, 3), keepdim=p.get("keepdims", True))
                elif op is Op.RELU:
                    y = F.relu(x0)
                elif op is Op.CLIP:
                    y = x0.clamp(p["lo"], p["hi"])
                elif op is Op.LEAKY_RELU:
                    y = F.leaky_relu(x0, p["alpha"])
                elif op is Op.SIGMOID:
                    y = torch.sigmoid(x0)
                elif op is Op.HARD_SIGMOID:
                    y = (p["alpha"] * x0 + p["beta"]).clamp(0, 1)
                elif op is Op.HARD_SWISH:
                    y = F.hardswish(x0)
                elif op is Op.AFFINE:
                    shape = (1, -1) + (1,) * (x0.dim() - 2)
                    y = x0 * w["scale"].reshape(shape) + w["shift"].reshape(shape)
                elif op is Op.ADD:
                    y = sum(ins[1:], ins[0])
                elif op is Op.MUL:
                    y = ins[0]
                    for v in ins[1:]:
                        y = y * v
                elif op is Op.CONCAT:
                    y = torch.cat(ins, 1)
                elif op is Op.PAD:
                    t, l, b, r = p["pads"]
                    y = F.pad(x0, (l, r, t, b), value=p["value"])
                elif op is Op.RESHAPE:
                    y = x0.reshape((x0.shape[0],) + tuple(n.shape))
                elif op is Op.TRANSPOSE:
                    y = x0.permute((0,) + tuple(a + 1 for a in p["perm"]))
                elif op is Op.GEMM:
                    y = F.linear(x0, w["W"], w["B"])
                elif op is Op.SOFTMAX:
                    y = F.softmax(x0, -1)
                elif op is Op.LRN:
                    y = F.local_response_norm(x0, p["size"], p["alpha"], p["beta"], p["bias"])
                else:
                    raise NotImplementedError(op)
                vals[n.name] = y
        return vals[self.graph.output]




def torch_forward(graph, batch_nchw: np.ndarray, threads: int = 2) -> np.ndarray:
    """CPU forward pass of ``graph`` on an NCHW batch (weights uploaded once per graph)."""
    import torch

    torch.set_num_threads(threads)
    tg = getattr(graph, "_torch_cpu", None)
    if tg is None:
        tg = graph._torch_cpu = TorchGraph(graph, "cpu")
    return tg(torch.from_numpy(np.ascontiguousarray(batch_nchw))).numpy()
