"""Benchmark `cold`: the first explanation in a fresh process, with and without a warm numba
cache.

Usage: python bench/cold.py [--workloads mri,resnet18]

Each row is one fresh Python process running ``import krypton_db``, ``load_model``,
``occlude(mode="exact")`` on the `exact` workload (patch 16, its stride): the wall time of each
phase from process start, and in total. "cold cache": ``NUMBA_CACHE_DIR`` is a new empty
directory, so every kernel compiles; "warm cache": the same directory again, second process,
so kernels load from numba's on-disk cache (the state after ``pip install`` + one run). The
zoo / package model files are cached beforehand in both cases (model generation is not
timed). "again" is the same explanation repeated in that process (compiled, buffers faulted
in); first - again is what starting cold costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402
from exact import WORKLOADS  # noqa: E402

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {bench!r})
import krypton_db as kdb
from exact import WORKLOADS, positions_for
t1 = time.perf_counter()
src, img, patch, stride = WORKLOADS[{w!r}]
m = kdb.load_model(src)
image = kdb.sample_image(img)
pos = positions_for(m, patch, stride)
t2 = time.perf_counter()
hm = kdb.occlude(m, image, patch=patch, positions=pos)
t3 = time.perf_counter()
hm = kdb.occlude(m, image, patch=patch, positions=pos)
t4 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, first_s=t3 - t2,
                      again_s=t4 - t3, positions=len(pos))))
"""


def run_child(workload: str, cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    code = CHILD.format(bench=str(Path(__file__).parent), w=workload)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    d = json.loads(out.strip().splitlines()[-1])
    d["process_s"] = time.perf_counter() - t
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="mri,resnet18")
    args = ap.parse_args()
    print(machine_line())
    import krypton_db as kdb

    print("\n| workload | positions | numba cache | import (s) | load model (s) | first explanation "
          "(s) | process total (s) | same explanation again (s) | first - again (JIT, cache load) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in args.workloads.split(","):
        kdb.load_model(WORKLOADS[w][0])  # model file generated / located outside the timing
        with tempfile.TemporaryDirectory() as cache:
            for label in ("cold", "warm"):
                d = run_child(w, cache)
                print(f"| {w} | {d['positions']} | {label} | {d['import_s']:.2f} | {d['load_s']:.2f} "
                      f"| {d['first_s']:.2f} | {d['process_s']:.2f} | {d['again_s']:.2f} | "
                      f"{d['first_s'] - d['again_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
