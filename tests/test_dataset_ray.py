"""explain_dataset on Ray: a two-node cluster started by the test on 127.0.0.1 (one CPU each);
the Ray backend equals the local one, a killed actor still leaves every image exactly once,
resume and corrupt images behave as locally, and a cluster the call starts itself binds to
the loopback address only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import krypton_db as kdb
from krypton_db.catalog import Catalog
from test_dataset import PATCH, STRIDE, rows_by_image, write_images

# read by Ray at import: without it a local cluster binds the machine's primary interface
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="Ray is in the [test] extra")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each on 127.0.0.1; stops only what it started."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    try:
        c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=c.address, log_to_driver=False)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert c.address.startswith("127.0.0.1:")
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def vgg(tiny_nets):
    return tiny_nets["vgg"][0]


def test_ray_equals_local_and_reports_a_corrupt_image(cluster, vgg, tmp_path):
    paths = write_images(tmp_path / "imgs", vgg, 6)
    local = kdb.explain_dataset(vgg, tmp_path / "imgs", patch=PATCH, stride=STRIDE,
                                out=tmp_path / "local", progress=False)
    cat_path = tmp_path / "cat.duckdb"
    r = kdb.explain_dataset(vgg, tmp_path / "imgs", patch=PATCH, stride=STRIDE,
                            out=tmp_path / "ray", catalog=cat_path, backend="ray",
                            workers=2, progress=False)
    assert (r.done, r.failed) == (6, 1) and "corrupt.png" in r.failures[0][0]
    assert [w["threads"] for w in r.workers] == [1, 1]
    assert len({w["pid"] for w in r.workers}) == 2
    a, b = rows_by_image(local), rows_by_image(r)
    assert sorted(a) == sorted(b) == sorted(paths)
    for p in paths:
        np.testing.assert_allclose(b[p], a[p], rtol=0, atol=1e-6)
    with Catalog(cat_path, read_only=True) as cat:
        workers = cat.con.sql("SELECT DISTINCT worker FROM dataset_runs WHERE status = 'done'"
                              ).fetchall()
    assert {w[0] for w in workers} <= {w["name"] for w in r.workers}


def test_a_killed_actor_leaves_every_image_exactly_once(cluster, vgg, tmp_path):
    paths = write_images(tmp_path / "imgs", vgg, 10, bad=False)
    killed = []

    def kill_first_worker(rec):
        if not killed:
            killed.append(rec["worker"])
            ray.kill(ray.get_actor(rec["worker"]))

    cat_path = tmp_path / "cat.duckdb"
    r = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "ray",
                            catalog=cat_path, backend="ray", workers=2, progress=False,
                            on_image=kill_first_worker)
    assert killed and r.done == 10 and r.failed == 0
    counts = r.sql("SELECT image, count(*) AS n FROM heatmaps GROUP BY image").fetchall()
    cells = len(rows_by_image(r)[paths[0]])
    assert sorted(c[0] for c in counts) == sorted(paths) and {c[1] for c in counts} == {cells}
    assert len([f for f in os.listdir(r.folder) if f.endswith(".parquet")]) == 10
    with Catalog(cat_path, read_only=True) as cat:
        per_image = cat.con.sql("SELECT image, count(*) FROM dataset_runs WHERE status = 'done'"
                                " GROUP BY image").fetchall()
        after_kill = cat.con.sql("SELECT count(*) FROM dataset_runs WHERE worker = ?",
                                 params=[killed[0]]).fetchall()[0][0]
    assert sorted(x[0] for x in per_image) == sorted(paths) and {x[1] for x in per_image} == {1}
    assert after_kill < 10  # the dead actor's share went to the others
    local = rows_by_image(kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE,
                                              out=tmp_path / "local", progress=False))
    for p in paths:
        np.testing.assert_allclose(rows_by_image(r)[p], local[p], rtol=0, atol=1e-6)


def test_resume_on_ray_does_only_the_missing_images(cluster, vgg, tmp_path):
    paths = write_images(tmp_path / "imgs", vgg, 5, bad=False)
    first = kdb.explain_dataset(vgg, paths[:2], patch=PATCH, stride=STRIDE, out=tmp_path / "o",
                                backend="ray", workers=1, progress=False)
    assert first.done == 2 and first.workers[0]["threads"] == 1
    seen = []
    r = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "o",
                            backend="ray", workers=2, progress=False,
                            on_image=lambda rec: seen.append(rec["image"]))
    assert (r.done, r.skipped) == (3, 2) and sorted(seen) == sorted(paths[2:])


def test_more_cpus_than_the_cluster_has_is_refused(cluster, vgg, tmp_path):
    paths = write_images(tmp_path / "imgs", vgg, 1, bad=False)
    with pytest.raises(kdb.KryptonError, match="need 6 CPUs; the cluster has 2"):
        kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "o",
                            backend="ray", workers=3, cpus_per_worker=2, progress=False)
    with pytest.raises(kdb.KryptonError, match="fits on no node"):
        kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "o",
                            backend="ray", workers=1, cpus_per_worker=2, progress=False)


def test_a_cluster_started_by_the_call_binds_to_loopback(tiny_nets, tmp_path):
    """In a fresh process (this one is connected to the test cluster): explain_dataset starts
    its own Ray on 127.0.0.1, every node of it is on loopback while it runs, and it is gone
    after the call."""
    model = tiny_nets["vgg"][0]
    write_images(tmp_path / "imgs", model, 2, bad=False)
    script = textwrap.dedent(f"""
        import json, ray, krypton_db as kdb
        m = kdb.load_model({str(model.source)!r})
        seen = []
        r = kdb.explain_dataset(m, {str(tmp_path / 'imgs')!r}, patch={PATCH}, stride={STRIDE},
                                out={str(tmp_path / 'o')!r}, backend="ray", workers=1,
                                progress=False, on_image=lambda rec: seen.extend(
                                    n["NodeManagerAddress"] for n in ray.nodes()))
        print(json.dumps(dict(done=r.done, nodes=sorted(set(seen)),
                              threads=r.workers[0]["threads"], after=ray.is_initialized())))
    """)
    # nothing of this process's Ray connection (address, session, token) reaches the child
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # one worker gets the default CPUs per worker (2, or fewer on a smaller machine)
    assert res == dict(done=2, nodes=["127.0.0.1"], threads=min(2, os.cpu_count()),
                       after=False)
