"""Runtime-estimate accuracy: EXPLAIN's cost model (``planner/cost.py``: per-step costs from
conv MACs, conv accumulations, FC MACs, elements moved and a per-step constant, calibrated on
this machine by ``CALIBRATE``) against the measured exact-occlusion time of the `exact`
workloads. The calibration runs use other patch sizes (8, 32), random positions and other
batch sizes than the workloads (patch 16, the grid, the automatic batch).

Usage: python bench/estimate.py [--repeat 2]
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
from krypton_db import calibration  # noqa: E402
from krypton_db.planner import cost  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(machine_line())
    path = Path(tempfile.mkdtemp()) / "cost_model.json"
    cm = calibration.calibrate(path=path)
    print(f"calibrated on {', '.join(cm['models'])} in {cm['seconds']} s, {cm['samples']} step "
          f"samples: " + ", ".join(f"{k}={v:.3e}" for k, v in cm["coef"].items()))
    model = cost.load_cost_model(path)
    print("\n| workload | positions | batch | predicted (s) | measured (s) | error |")
    print("|---|---|---|---|---|---|")
    for w, (src, img, patch, stride) in WORKLOADS.items():
        m = kdb.load_model(src)
        image = kdb.sample_image(img)
        pos = positions_for(m, patch, stride)
        hm = occlude(m, image, patch=patch, positions=pos[:2])  # warm-up / JIT apart
        ts = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            hm = occlude(m, image, patch=patch, positions=pos)
            ts.append(time.perf_counter() - t)
        bs = hm.stats["batch_size"]
        pred = cost.predict(kdb.plan(m, patch), "exact", len(pos), bs, model)["predicted_s"]
        meas = float(np.median(ts))
        print(f"| {w} | {len(pos)} | {bs} | {pred:.2f} | {meas:.2f} | "
              f"{100 * (pred - meas) / meas:+.0f}% |", flush=True)


if __name__ == "__main__":
    main()
