"""Runtime-estimate accuracy: EXPLAIN's cost model (seconds = a * MACs_incremental * positions
+ b * positions + c, calibrated once on this machine with ``CALIBRATE``) against the measured
exact-occlusion time of the `exact` workloads.

Usage: python bench/estimate.py [--calibrate-on zoo:resnet18]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_line  # noqa: E402
from exact import WORKLOADS, positions_for  # noqa: E402

import krypton_db as kdb  # noqa: E402
from krypton_db.occlusion import occlude  # noqa: E402
from krypton_db.query import calibrate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibrate-on", default="zoo:resnet18")
    ap.add_argument("--counts", default="32,128,256",
                    help="positions per calibration run (batches near the real batch size)")
    args = ap.parse_args()
    print(machine_line())
    path = Path(tempfile.mkdtemp()) / "cost_model.json"
    counts = tuple(int(v) for v in args.counts.split(","))
    cm = calibrate(kdb.load_model(args.calibrate_on), kdb.sample_image("chelsea"), path=path,
                   counts=counts)
    print(f"calibrated on {args.calibrate_on}: a={cm['a']:.3e} s/MAC, b={cm['b']:.3e} s/position, "
          f"c={cm['c']:.3f} s")
    print("\n| workload | positions | MACs incremental / position | predicted (s) | measured (s) | error |")
    print("|---|---|---|---|---|---|")
    for w, (src, img, patch, stride) in WORKLOADS.items():
        m = kdb.load_model(src)
        image = kdb.sample_image(img)
        pos = positions_for(m, patch, stride)
        macs = kdb.plan(m, patch).macs_inc
        pred = cm["a"] * macs * len(pos) + cm["b"] * len(pos) + cm["c"]
        occlude(m, image, patch=patch, positions=pos[:2])  # warm-up / JIT apart
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            occlude(m, image, patch=patch, positions=pos)
            ts.append(time.perf_counter() - t)
        meas = float(np.median(ts))
        print(f"| {w} | {len(pos)} | {macs / 1e9:.2f} G | {pred:.2f} | {meas:.2f} | "
              f"{100 * (pred - meas) / meas:+.0f}% |")


if __name__ == "__main__":
    main()
