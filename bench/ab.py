"""A/B timing of two commits of krypton_db on the exact and full-inference workloads,
interleaved process by process (a structural change must not cost time).

Usage: python bench/ab.py OLD_REV NEW_REV [--rounds 3] [--workloads vgg16,resnet18,inception3,mri]

Each revision is checked out into a git worktree (planner/ and sql/ linked into its
krypton_db/ so it imports as installed); each measurement is a fresh process that warms the
JIT and the views on one position, then times one exact explanation (the workload of
bench/exact.py) and full inference of a batch of 16 (median of 5). Both revisions' heat maps
must agree to 1e-5 before a time is reported. Prints one row per workload: medians over
rounds, new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import check_oracle, machine_line  # noqa: E402
from exact import WORKLOADS  # noqa: E402

CHILD = r"""
import json, sys, time
import numpy as np
import krypton_db as kdb
src, img, patch, stride, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
m = kdb.load_model(src)
im = kdb.sample_image(img)
try:  # since the view cache: every commit's timed run materializes the views
    from krypton_db.exec import view_cache
    view_cache.paused().__enter__()
except ImportError:
    pass
kdb.occlude(m, im, patch=patch, positions=[(0, 0)])  # JIT, outside the timing
t = time.perf_counter()
hm = kdb.occlude(m, im, patch=patch, stride=stride)
exact_s = time.perf_counter() - t
x = m.to_nchw(np.repeat(m.preprocess(im)[None], 16, axis=0))
m.executor.predict(x)
ts = []
for _ in range(5):
    t = time.perf_counter()
    m.executor.predict(x)
    ts.append(time.perf_counter() - t)
np.save(out, hm.probs)
import krypton_db.planner.delta_plan as dp
print(json.dumps(dict(exact_s=exact_s, full16_s=sorted(ts)[2], file=kdb.__file__, planner=dp.__file__)))
"""


def worktree(rev: str, base: Path) -> Path:
    d = base / rev
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(d), rev],
                   check=True, capture_output=True)
    for sub in ("planner", "sql"):
        (d / "krypton_db" / sub).symlink_to(d / sub)
    return d


def run(tree: Path, wl: str, out: Path) -> dict:
    src, img, patch, stride = WORKLOADS[wl]
    env = dict(os.environ, PYTHONPATH=str(tree))
    r = subprocess.run([sys.executable, "-c", CHILD, src, img, str(patch), str(stride), str(out)],
                       env=env, capture_output=True, text=True, check=True, cwd=tree)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(tree)) and res["planner"].startswith(str(tree)), res
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="vgg16,resnet18,inception3,mri")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="krypton-ab-"))
    trees = {rev: worktree(rev, base) for rev in (a.old, a.new)}
    print(machine_line())
    print(f"{'workload':<11} {'exact old s':>11} {'exact new s':>11} {'new/old':>8} "
          f"{'full16 old s':>12} {'full16 new s':>12} {'new/old':>8}  runs (exact old | new)")
    try:
        for wl in a.workloads.split(","):
            res = {a.old: [], a.new: []}
            for k in range(a.rounds):
                order = (a.old, a.new) if k % 2 == 0 else (a.new, a.old)
                for rev in order:
                    res[rev].append(run(trees[rev], wl, base / f"{rev}.npy"))
                import numpy as np
                check_oracle(f"{wl}: new vs old heat map", np.load(base / f"{a.new}.npy"),
                             np.load(base / f"{a.old}.npy"), 1e-5)

            def med(rev, key):
                v = sorted(r[key] for r in res[rev])
                return v[len(v) // 2]
            eo, en, fo, fn = med(a.old, "exact_s"), med(a.new, "exact_s"), med(a.old, "full16_s"), med(a.new, "full16_s")
            runs = " ".join(f"{r['exact_s']:.2f}" for r in res[a.old]) + " | " + \
                " ".join(f"{r['exact_s']:.2f}" for r in res[a.new])
            print(f"{wl:<11} {eo:>11.3f} {en:>11.3f} {en / eo:>8.3f} {fo:>12.3f} {fn:>12.3f} "
                  f"{fn / fo:>8.3f}  {runs}", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)


if __name__ == "__main__":
    main()
