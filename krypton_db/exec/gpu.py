"""GPU executors on numba.cuda: full batched inference and batched incremental (IVM) inference.

Design
------
*One kernel launch per layer for the whole batch.* The GPU mirrors the CPU executors step by
step (it lowers the graph with the same ``PhysicalPlan``: conv / add + activation fused, so a
delta plan made for the CPU runs here unchanged). Each step is one launch (a few for merges
with more than two inputs) over *all* queries of the batch: the read-in contexts of every
query are gathered, with each query's patch applied, by ONE ``gather_patch_gpu`` launch, and
the layer then runs once on the [C, B, h, w] batch of contexts. The published GPU
prototype's bottleneck was a per-query copy loop issued from the host; here no per-query
work is issued at all. Everything stays on the device between layers: the materialized
views, the patch states, the weights; the host only computes the small [B, 2] patch
locations (pure index math of the plan, done in one pass before the launches and uploaded
as one array) and copies the final [B, classes] back.

*Why CNHW.* Feature maps are ``[C, N, H, W]`` as on the CPU: a convolution over a batch is
one GEMM ``W[O, C*kh*kw] @ cols[C*kh*kw, N*Ho*Wo]`` whose result is already the next layer's
``[O, N, Ho, Wo]`` tensor (no transposes between layers; ``conv_gemm_gpu`` is this GEMM with
the im2col tile computed in shared memory, ``matmul_tiled_gpu`` the plain GEMM of 1x1 convs
and fully connected layers), concatenation along channels is a contiguous copy, and the
per-(c, n) planes are contiguous for pooling. The same layout on both sides means the CPU and
GPU executors share their plans and the tests compare them step for step.

Dense products use cuBLAS through CuPy when CuPy is importable (``cupy_available()``), else
the numba tiled kernel. Without a GPU, ``NUMBA_ENABLE_CUDASIM=1`` runs everything on the
numba CUDA simulator (the CI tests do, on tiny shapes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import KryptonError
from ..graph import ACTIVATIONS, Graph, Node, Op
from ..planner.physical import PhysicalPlan, PhysicalStep
from .cpu import act_spec


class GpuUnavailableError(KryptonError):
    """device='gpu' was asked for but there is no CUDA GPU (or no numba-cuda)."""


_K = None  # kernels_gpu, imported on first use


def gpu_status() -> tuple[bool, str]:
    """(usable, reason): a CUDA GPU or the numba CUDA simulator is usable through numba-cuda."""
    try:
        from numba import cuda
    except Exception as e:  # noqa: BLE001 - numba-cuda missing or broken
        return False, f"numba.cuda cannot be imported ({type(e).__name__}: {e})"
    try:
        if cuda.is_available():
            return True, "simulator" if "simulator" in cuda.to_device.__module__ else "gpu"
    except Exception as e:  # noqa: BLE001
        return False, f"numba.cuda.is_available() failed ({type(e).__name__}: {e})"
    return False, "numba.cuda.is_available() is false (no CUDA driver or device)"


def gpu_available() -> bool:
    return gpu_status()[0]


def require_gpu():
    """The kernels module; raises GpuUnavailableError when neither a GPU nor the simulator is
    present."""
    global _K
    if _K is None:
        ok, why = gpu_status()
        if not ok:
            raise GpuUnavailableError(
                f"device='gpu' needs a CUDA GPU and the numba-cuda package; none found: {why}")
        from . import kernels_gpu

        _K = kernels_gpu
    return _K


def cupy_available() -> bool:
    """True when CuPy imports and sees a device (then dense products use cuBLAS)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - not installed, no driver, ...
        return False


# -- device helpers ---------------------------------------------------------------------------------


def cuda_module():
    from numba import cuda

    return cuda


def device_empty(shape) -> object:
    return cuda_module().device_array(tuple(int(s) for s in shape), np.float32)


def contiguous(a):
    """A C-contiguous device array with a's values (a itself when it already is one; strided
    4-D views, e.g. centre-cropped patches, are copied by a kernel)."""
    if a.is_c_contiguous():
        return a
    if a.ndim != 4:
        raise NotImplementedError(f"strided {a.ndim}-D device arrays are not supported")
    out = device_empty(a.shape)
    launch(require_gpu().copy_offset4_gpu, a.size, a, out, 0, 0)
    return out


def launch(kernel, n, *args):
    K = require_gpu()
    blocks, threads = K.launch1(n)
    kernel[blocks, threads](*args)


def as_4d(a):
    """4-D view of a contiguous device array: CNHW as is, [N, K] vectors as [1, N, 1, K]."""
    if a.ndim == 4:
        return a
    if a.ndim == 2:
        return a.reshape(1, a.shape[0], 1, a.shape[1])
    return a.reshape(*((1,) * (4 - a.ndim) + tuple(a.shape)))


def to_internal_host(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(x.transpose(1, 0, 2, 3)) if x.ndim == 4 else np.ascontiguousarray(x)


def to_external_host(x) -> np.ndarray:
    """Batch-first host copy of an internal-layout device (or host) array."""
    h = x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)
    return np.ascontiguousarray(h.transpose(1, 0, 2, 3)) if h.ndim == 4 else h


# -- full inference --------------------------------------------------------------------------------


@dataclass
class _Prep:
    """Device-resident weights of one step."""

    w4: object = None  # conv W [O, C/g, kh, kw]
    w2: object = None  # conv W as [O, C/g*kh*kw] (GEMM A)
    wt: object = None  # fully connected W.T [K_in, K_out]
    b: object = None
    scale: object = None
    shift: object = None


class GpuExecutor:
    """Full batched inference on the GPU: device-resident weights and activations.

    ``run(batch_nchw, outputs)`` returns host arrays like ``CpuExecutor.run``; ``run_device``
    keeps the requested outputs on the device (internal layout); ``predict`` -> [N, classes].
    """

    def __init__(self, graph: Graph, fuse: bool = True, use_cupy: bool | None = None,
                 conv_algo: str = "auto"):
        self.K = require_gpu()
        if conv_algo not in ("auto", "gemm", "direct"):
            raise ValueError(f"conv_algo must be 'auto', 'gemm' or 'direct', got {conv_algo!r}")
        # auto: the tiled (implicit) GEMM on a GPU; the direct kernel on the simulator, whose
        # syncthreads costs ~1 ms of polling per barrier (both are tested against the oracle)
        self.conv_algo = conv_algo if conv_algo != "auto" else ("direct" if self.K.SIM else "gemm")
        self.graph = graph
        self.plan = PhysicalPlan.lower(graph, fuse)
        self.use_cupy = cupy_available() if use_cupy is None else bool(use_cupy)
        self.jit_seconds: float | None = None
        cuda = cuda_module()
        self.prep: dict[str, _Prep] = {}
        for st in self.plan.steps:
            n = st.node
            p = _Prep()
            if n.op is Op.CONV:
                w = np.ascontiguousarray(n.weights["W"], np.float32)
                p.w4 = cuda.to_device(w)
                p.w2 = p.w4.reshape(w.shape[0], -1)
                p.b = cuda.to_device(np.ascontiguousarray(n.weights["B"], np.float32))
            elif n.op is Op.GEMM:
                p.wt = cuda.to_device(np.ascontiguousarray(np.asarray(n.weights["W"], np.float32).T))
                p.b = cuda.to_device(np.ascontiguousarray(n.weights["B"], np.float32))
            elif n.op is Op.AFFINE:
                p.scale = cuda.to_device(np.ascontiguousarray(n.weights["scale"], np.float32).reshape(-1))
                p.shift = cuda.to_device(np.ascontiguousarray(n.weights["shift"], np.float32).reshape(-1))
            self.prep[n.name] = p
        self._last_use = {}
        for idx, st in enumerate(self.plan.steps):
            for i in st.node.inputs:
                self._last_use[i] = idx
        self._fused_acts = {}
        for st in self.plan.steps:
            if st.fused is not None:
                self._fused_acts[st.fused.name] = _fused_prep(st.fused)

    # -- public ------------------------------------------------------------------------------
    def warmup(self) -> float:
        """Compile every kernel this plan uses (one run on a zero sample); returns seconds."""
        t = time.perf_counter()
        self.predict(np.zeros((1,) + tuple(self.graph.input_shape), np.float32))
        self.jit_seconds = time.perf_counter() - t
        return self.jit_seconds

    def run(self, batch: np.ndarray, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run on an NCHW float32 host batch; returns {node name: batch-first host array}."""
        outs = self.run_device(self.upload(batch), outputs)
        return {k: to_external_host(v) for k, v in outs.items()}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)[self.graph.output]

    def upload(self, batch: np.ndarray):
        return cuda_module().to_device(to_internal_host(batch))

    def run_device(self, x, outputs: list[str] | None = None) -> dict:
        """Run on an internal-layout device batch; returns {name: device array (internal)}."""
        g = self.graph
        want = set(outputs or [g.output])
        vals = {g.input.name: x}
        result = {g.input.name: x} if g.input.name in want else {}
        for idx, st in enumerate(self.plan.steps):
            if st.fused is not None and st.node.name in want:
                raise ValueError(f"{st.node.name} is fused away; lower with fuse=False to read it")
            y = self.exec_step(st, [vals[i] for i in st.node.inputs])
            name = self.plan.out_name(st)
            vals[name] = y
            if name in want:
                result[name] = y
            for i in st.node.inputs:
                if self._last_use.get(i) == idx and i not in want:
                    vals.pop(i, None)
        return result

    # -- one step ------------------------------------------------------------------------------
    def exec_step(self, step: PhysicalStep, ins: list, pads=None, out_hw=None):
        """One step on internal-layout device inputs (pads / out_hw override a windowed
        node's padding and output size: incremental plans run on read-in contexts)."""
        K = self.K
        node = step.node
        op = node.op
        x = ins[0] if ins else None
        act = act_spec(step.fused)
        if op is Op.CONV:
            return self.conv(x, node, act, pads)
        if op in (Op.MAXPOOL, Op.AVGPOOL):
            y = self.pool(x, node, pads, out_hw)
            return self.pointwise(y, step.fused) if step.fused is not None else y
        if op is Op.GLOBAL_AVGPOOL:
            x = contiguous(x)
            c, n = x.shape[0], x.shape[1]
            keep = node.params.get("keepdims", True)
            out = device_empty((c, n) if keep else (n, c))
            launch(K.global_avgpool_gpu, c * n, x, out, not keep)
            return out.reshape(c, n, 1, 1) if keep else out
        if op in ACTIVATIONS or op is Op.AFFINE:
            return self.pointwise(x, node)
        if op in (Op.ADD, Op.MUL):
            return self.binary(ins, op is Op.MUL, act)
        if op is Op.CONCAT:
            return self.concat(ins)
        if op is Op.LRN:
            p = node.params
            x = contiguous(x)
            out = device_empty(x.shape)
            launch(K.lrn_cnhw_gpu, x.size, x, int(p["size"]), np.float32(p["alpha"]),
                    np.float32(p["beta"]), np.float32(p["bias"]), out)
            return out
        if op is Op.PAD:
            t, l, b, r = node.params["pads"]
            c, n, h, w = x.shape
            out = device_empty((c, n, h + t + b, w + l + r))
            launch(K.pad_cnhw_gpu, out.size, x, int(t), int(l), np.float32(node.params["value"]), out)
            return out
        if op is Op.RESHAPE:
            ext = self._external(x)
            return self._internal(ext.reshape(*((ext.shape[0],) + tuple(node.shape))))
        if op is Op.TRANSPOSE:
            ext = self._external(x)
            perm = (0,) + tuple(a + 1 for a in node.params["perm"])
            return self._internal(self._permute(ext, perm))
        if op is Op.GEMM:
            p = self.prep[node.name]
            return self.dense(contiguous(x), p.wt, p.b, False, act)
        if op is Op.SOFTMAX:
            x = contiguous(x)
            x2 = x.reshape(-1, x.shape[x.ndim - 1])
            out = device_empty(x2.shape)
            launch(K.softmax_rows_gpu, x2.shape[0], x2, out)
            return out.reshape(*x.shape)
        raise NotImplementedError(f"GPU executor has no lowering for {op}")

    def conv(self, x, node: Node, act, pads=None):
        """Convolution of a CNHW batch with fused bias + activation; ``pads`` overrides the
        node's padding. Depthwise -> direct kernel; 1x1 stride 1 unpadded -> GEMM on the input
        itself (cuBLAS or the tiled kernel); else implicit GEMM (``conv_gemm_gpu``)."""
        K = self.K
        p = node.params
        pr = self.prep[node.name]
        c, n, h, w = x.shape
        kh, kw = p["kernel"]
        sh, sw = p["stride"]
        dh, dw = p["dilation"]
        t, l, b, r = pads if pads is not None else p["pads"]
        ho = (h + t + b - dh * (kh - 1) - 1) // sh + 1
        wo = (w + l + r - dw * (kw - 1) - 1) // sw + 1
        o, cg = pr.w4.shape[0], pr.w4.shape[1]
        g = int(p["groups"])
        code, a0, a1 = act
        direct = self.conv_algo == "direct"
        if kh == kw == 1 and sh == sw == 1 and t == l == b == r == 0 and g == 1 and not direct:
            x = contiguous(x)
            y = self.dense(pr.w2, x.reshape(c, n * h * w), pr.b, True, act)
            return y.reshape(o, n, h, w)
        out = device_empty((o, n, ho, wo))
        if direct or (cg == 1 and g > 1):
            launch(K.conv_direct_gpu, out.size, x, pr.w4, pr.b, sh, sw, dh, dw, t, l, g,
                    code, a0, a1, out)
            return out
        tiles = g * (-(-(o // g) // K.TILE)) * (-(-(n * ho * wo) // K.TILE))
        blocks, threads = K.launch_tiles(tiles)
        K.conv_gemm_gpu[blocks, threads](x, pr.w2, pr.b, kh, kw, sh, sw, dh, dw, t, l, g,
                                         code, a0, a1, out)
        return out

    def dense(self, a, b, bias, bias_rows: bool, act):
        """act(a[M, K] @ b[K, N] + bias) (bias per row when ``bias_rows``, else per column):
        cuBLAS via CuPy when available, else the shared-memory tiled kernel."""
        K = self.K
        code, a0, a1 = act
        m, n = a.shape[0], b.shape[1]
        out = device_empty((m, n))
        if self.use_cupy:
            import cupy as cp

            cp.matmul(cp.asarray(a), cp.asarray(b), out=cp.asarray(out))
            launch(K.bias_act_rows_gpu, m * n, out, bias, bias_rows, code, a0, a1)
            return out
        tiles = (-(-m // K.TILE)) * (-(-n // K.TILE))
        blocks, threads = K.launch_tiles(tiles)
        K.matmul_tiled_gpu[blocks, threads](a, b, out, bias, bias_rows, code, a0, a1)
        return out

    def pool(self, x, node: Node, pads=None, out_hw=None):
        p = node.params
        c, n = x.shape[0], x.shape[1]
        ho, wo = out_hw if out_hw is not None else node.shape[1:]
        t, l, b, r = pads if pads is not None else p["pads"]
        kh, kw = p["kernel"]
        sh, sw = p["stride"]
        out = device_empty((c, n, ho, wo))
        launch(self.K.pool_cnhw_gpu, out.size, x, kh, kw, sh, sw, t, l, b, r,
                node.op is Op.MAXPOOL, bool(p.get("count_include_pad", False)), out)
        return out

    def pointwise(self, x, node: Node):
        """A pointwise node (activation or per-channel affine) on CNHW maps or [N, K] vectors."""
        K = self.K
        x = contiguous(x)
        out = device_empty(x.shape)
        if node.op is Op.AFFINE:
            pr = self.prep.get(node.name) or self._fused_acts[node.name]
            x2 = x.reshape(x.shape[0], -1) if x.ndim == 4 else x.reshape(-1, x.shape[x.ndim - 1])
            launch(K.affine_gpu, x.size, x2, pr.scale, pr.shift, 0 if x.ndim == 4 else 1,
                    out.reshape(*x2.shape))
            return out
        code, a0, a1 = act_spec(node)
        launch(K.act_flat_gpu, x.size, x.reshape(-1), out.reshape(-1), code, a0, a1)
        return out

    def binary(self, ins: list, is_mul: bool, act):
        """Residual add / gate multiply of two or more inputs; the fused activation runs on
        the last product only."""
        K = self.K
        none = act_spec(None)
        cur = ins[0]
        for i, v in enumerate(ins[1:]):
            code, a0, a1 = act if i == len(ins) - 2 else none
            if tuple(cur.shape) == tuple(v.shape) and cur.is_c_contiguous() and v.is_c_contiguous():
                out = device_empty(cur.shape)
                launch(K.add_act_gpu if not is_mul else K.binary_bcast_gpu, cur.size,
                        *((cur.reshape(-1), v.reshape(-1), out.reshape(-1), code, a0, a1) if not is_mul
                          else (as_4d(cur), as_4d(v), as_4d(out), True, code, a0, a1)))
            else:
                if cur.ndim != v.ndim:
                    raise NotImplementedError(f"broadcast between ranks {cur.ndim} and {v.ndim}")
                shp = tuple(int(s) for s in np.broadcast_shapes(tuple(cur.shape), tuple(v.shape)))
                out = device_empty(shp)
                launch(K.binary_bcast_gpu, out.size, as_4d(contiguous(cur)), as_4d(contiguous(v)), as_4d(out),
                        is_mul, code, a0, a1)
            cur = out
        return cur

    def concat(self, ins: list):
        """Concatenation along the per-sample channel axis (CNHW axis 0, vector axis 1)."""
        K = self.K
        if ins[0].ndim == 4:
            shp = (sum(v.shape[0] for v in ins),) + tuple(ins[0].shape[1:])
            axis = 0
        else:
            shp = (ins[0].shape[0], sum(v.shape[1] for v in ins))
            axis = 3
        out = device_empty(shp)
        o4 = as_4d(out)
        off = 0
        for v in ins:
            v4 = v if v.ndim == 4 else as_4d(contiguous(v))
            launch(K.copy_offset4_gpu, v.size, v4, o4, axis, off)
            off += v.shape[0] if axis == 0 else v.shape[1]
        return out

    # -- layout changes (reshape / transpose work on the batch-first layout) ------------------
    def _permute(self, a, perm):
        a = contiguous(a)
        nd = a.ndim
        if nd > 4:
            raise NotImplementedError("transpose of more than 4 axes")
        lead = 4 - nd
        p4 = tuple(range(lead)) + tuple(lead + q for q in perm)
        shp = tuple(a.shape[q] for q in perm)
        out = device_empty(shp)
        launch(self.K.permute4_gpu, a.size, _to4_any(a), _to4_any(out), *p4)
        return out

    def _external(self, x):
        return self._permute(x, (1, 0, 2, 3)) if x.ndim == 4 else contiguous(x)

    def _internal(self, x):
        return self._permute(x, (1, 0, 2, 3)) if x.ndim == 4 else x


def _to4_any(a):
    return a if a.ndim == 4 else a.reshape(*((1,) * (4 - a.ndim) + tuple(a.shape)))


def _fused_prep(node: Node) -> _Prep:
    p = _Prep()
    if node.op is Op.AFFINE:
        cuda = cuda_module()
        p.scale = cuda.to_device(np.ascontiguousarray(node.weights["scale"], np.float32).reshape(-1))
        p.shift = cuda.to_device(np.ascontiguousarray(node.weights["shift"], np.float32).reshape(-1))
    return p


def device_summary() -> str:
    """One line naming the device (or the simulator / why there is none)."""
    ok, why = gpu_status()
    if not ok:
        return f"no GPU: {why}"
    if why == "simulator":
        return "numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    cuda = cuda_module()
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    cc = ".".join(map(str, dev.compute_capability))
    return f"{name} (compute capability {cc})"


__all__ = [
    "GpuExecutor",
    "GpuUnavailableError",
    "cupy_available",
    "device_summary",
    "gpu_available",
    "gpu_status",
    "require_gpu",
]
