"""Benchmark `gpu`: occlusion (OBE) on a CUDA GPU -- our numba.cuda incremental executor (exact
and approximate) vs PyTorch CUDA naive batched re-inference (fp32 with TF32 off, and a TF32 row)
and vs our CPU executor.

Usage: python bench/gpu.py [--models vgg16,resnet18,inception3] [--patch 16] [--stride 8]
                           [--batch 64] [--tau 0.5] [--cpu-positions 32] [--json out.json]
       python bench/gpu.py --selftest     # check the PyTorch graph runner on the CPU, no GPU needed

Without a CUDA GPU (or with only the numba simulator, far too slow for zoo models) it prints
why and exits 0. Prints the card and a markdown table: seconds for all positions, positions/s,
speedup over PyTorch fp32 naive, and the max |probability difference| against PyTorch fp32.
The CPU executor runs ``--cpu-positions`` positions only; its rate is extrapolated (marked *).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import krypton_db as kdb
from krypton_db.exec import gpu as G
from krypton_db.exec.gpu_incremental import GpuIncrementalExecutor
from krypton_db.model import softmax
from krypton_db.occlusion import grid_positions

# -- PyTorch graph runner: bench/torch_eager.py (any device) ----------------------------------------

from torch_eager import TorchGraph  # noqa: E402


def torch_naive(tg: TorchGraph, x_chw: np.ndarray, pos: np.ndarray, pv: np.ndarray, batch: int):
    """Naive OBE: occluded copies of the image built on the device, batched re-inference."""
    torch = tg.torch
    xd = torch.as_tensor(x_chw, device=tg.device)
    pd = torch.as_tensor(pv, device=tg.device)
    ph, pw = pv.shape[1:]
    outs = []
    with torch.inference_mode():
        for i in range(0, len(pos), batch):
            chunk = pos[i : i + batch]
            xb = xd[None].repeat(len(chunk), 1, 1, 1)
            for j, (y, x) in enumerate(chunk):
                xb[j, :, y : y + ph, x : x + pw] = pd
            outs.append(tg(xb))
        out = torch.cat(outs)
    if tg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return out.float().cpu().numpy()


# -- runs -------------------------------------------------------------------------------------------


def _probs(model, y):
    return y if model.ends_in_softmax else softmax(y)


def timed(fn, sync=None):
    t = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return out, time.perf_counter() - t


def ours_incremental(model, gex, x, pos, pv, patch, tau, batch, cpu=False):
    from krypton_db.planner.delta_plan import plan_occlusion

    from krypton_db.exec.incremental import IncrementalExecutor

    plan = plan_occlusion(model.graph, patch, model.executor.plan, tau=tau)
    inc = IncrementalExecutor(plan, model.executor) if cpu else GpuIncrementalExecutor(plan, gex)
    inc.materialize(x)
    inc.run_batch(pos[: min(batch, len(pos))], pv)  # warm-up: kernel compilation, allocations

    def run():
        inc.materialize(x)
        return np.concatenate([_probs(model, inc.run_batch(pos[i : i + batch], pv))
                               for i in range(0, len(pos), batch)])

    return timed(run)


def ours_naive(model, gex, x, pos, pv, batch):
    ph, pw = pv.shape[1:]

    def run():
        outs = []
        for i in range(0, len(pos), batch):
            chunk = pos[i : i + batch]
            xb = np.repeat(x[None], len(chunk), axis=0)
            for j, (y, xx) in enumerate(chunk):
                xb[j, :, y : y + ph, xx : xx + pw] = pv
            outs.append(_probs(model, gex.predict(xb)))
        return np.concatenate(outs)

    run_small = pos[: min(batch, len(pos))]
    gex.predict(np.repeat(x[None], len(run_small), axis=0))  # warm-up
    return timed(run)


def bench_model(name, args) -> list[dict]:
    import torch

    m = kdb.load_model(f"zoo:{name}")
    img = m.preprocess(kdb.sample_image("chelsea"))
    x = np.ascontiguousarray(m.to_nchw(img[None])[0], np.float32)
    c, h, w = x.shape
    patch = (args.patch, args.patch)
    grid, _ = grid_positions(h, w, patch, (args.stride, args.stride))
    pos = grid.reshape(-1, 2)
    pv = np.zeros((c,) + patch, np.float32)
    n = len(pos)
    rows = []

    def row(method, secs, probs, ref, npos=n, note=""):
        err = float(np.abs(probs - ref[: len(probs)]).max()) if ref is not None else float("nan")
        rows.append({"model": name, "method": method, "positions": n, "secs": secs * n / npos,
                         "rate": npos / secs, "err": err, "note": note})

    tg = TorchGraph(m.graph, "cuda")
    sync = torch.cuda.synchronize
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch_naive(tg, x, pos[: args.batch], pv, args.batch)  # warm-up (cuDNN autotuning, allocator)
    ref, t = timed(lambda: torch_naive(tg, x, pos, pv, args.batch), sync)
    ref = _probs(m, ref)
    row("PyTorch CUDA naive, fp32 (TF32 off)", t, ref, ref)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch_naive(tg, x, pos[: args.batch], pv, args.batch)
    p, t = timed(lambda: _probs(m, torch_naive(tg, x, pos, pv, args.batch)), sync)
    row("PyTorch CUDA naive, TF32", t, p, ref)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tg = None  # free the PyTorch weights before our executor uploads its own
    torch.cuda.empty_cache()

    gex = G.GpuExecutor(m.graph)
    gex.warmup()
    p, t = ours_naive(m, gex, x, pos, pv, args.batch)
    row("ours GPU naive (numba.cuda)", t, p, ref)
    p, t = ours_incremental(m, gex, x, pos, pv, patch, 1.0, args.batch)
    row("ours GPU exact (IVM)", t, p, ref)
    p, t = ours_incremental(m, gex, x, pos, pv, patch, args.tau, args.batch)
    row(f"ours GPU approximate (tau={args.tau:g})", t, p, ref)
    k = min(args.cpu_positions, n)
    if k > 0:
        m.executor.warmup()
        p, t = ours_incremental(m, None, x, pos[:k], pv, patch, 1.0, min(args.batch, 16), cpu=True)
        row("ours CPU exact (IVM)", t, p, ref, npos=k, note=f"* {k} positions, extrapolated")
    return rows


def card_line() -> str:
    import numba
    import torch

    try:
        import numba_cuda

        ncv = numba_cuda.__version__
    except Exception:  # noqa: BLE001
        ncv = "?"
    tdev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"
    return (f"GPU: {G.device_summary()}; torch {torch.__version__} (CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, sees {tdev}); numba {numba.__version__}, "
            f"numba-cuda {ncv}; CuPy/cuBLAS dense path: {'yes' if G.cupy_available() else 'no'}")


def selftest() -> int:
    """PyTorch runner (CPU) vs our CPU executor on the zoo models: the baseline computes the
    same function."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for name in ("resnet18", "inception3", "vgg16"):
        m = kdb.load_model(f"zoo:{name}")
        x = rng.random((2,) + m.graph.input_shape).astype(np.float32)
        import torch

        got = TorchGraph(m.graph, "cpu")(torch.as_tensor(x)).numpy()
        err = float(np.abs(got - m.executor.predict(x)).max())
        worst = max(worst, err)
        print(f"selftest {name}: max |torch - ours CPU| = {err:.2e}")
    return 0 if worst <= 1e-4 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vgg16,resnet18,inception3")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--cpu-positions", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--selftest", action="store_true")
    args = ap.parse_args()
    if args.selftest:
        return selftest()
    ok, why = G.gpu_status()
    if not ok or why != "gpu":
        reason = "only the numba CUDA simulator is active (far too slow for zoo models)" \
            if ok else why
        print(f"bench/gpu.py: no CUDA GPU to benchmark on: {reason}. Run it on a machine with an "
              f"NVIDIA GPU, the numba-cuda package (e.g. pip install 'numba-cuda[cu12]') and a "
              f"CUDA build of PyTorch.")
        return 0
    try:
        import torch
    except ImportError:
        print("bench/gpu.py: PyTorch is not installed (the naive baseline needs a CUDA build)")
        return 0
    if not torch.cuda.is_available():
        print("bench/gpu.py: this PyTorch build does not see the GPU (CPU-only wheel?)")
        return 0
    print(card_line())
    print(f"patch {args.patch}, stride {args.stride}, batch {args.batch}, image 'chelsea', "
          f"black patch; all timings are one full heat map after a warm-up\n")
    rows = []
    for name in args.models.split(","):
        t = time.perf_counter()
        rows.extend(bench_model(name.strip(), args))
        print(f"# {name} done in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    base = {r["model"]: r["secs"] for r in rows if r["method"].startswith("PyTorch CUDA naive, fp32")}
    print("| model | method | positions | seconds | positions/s | speedup vs PyTorch fp32 | "
          "max abs prob diff vs PyTorch fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        star = " *" if r["note"] else ""
        print(f"| {r['model']} | {r['method']} | {r['positions']} | {r['secs']:.3f}{star} | "
              f"{r['rate']:.1f} | {base[r['model']] / r['secs']:.2f}x | {r['err']:.1e} |")
    if any(r["note"] for r in rows):
        print(f"\n* CPU rows: {args.cpu_positions} positions measured, time scaled to all positions.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
