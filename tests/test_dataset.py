"""explain_dataset on the local backend: results equal the API's per-image heat maps, stream
to Parquet parts written whole, land in the catalog one row per image, survive bad images,
resume after an interruption, and refuse bad arguments (the Ray backend: test_dataset_ray)."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pytest
from PIL import Image

import krypton_db as kdb
from krypton_db.catalog import Catalog
from krypton_db.errors import InputError

PATCH, STRIDE = 4, 4


@pytest.fixture(scope="module")
def vgg(tiny_nets):
    return tiny_nets["vgg"][0]


def write_images(folder, model, n: int, seed: int = 0, bad: bool = True) -> list[str]:
    """n random PNGs (8-bit RGB at the model's input size) and, with ``bad``, a corrupt one."""
    folder.mkdir(parents=True, exist_ok=True)
    c, h, w = model.graph.input_shape
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    if bad:
        (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return paths


def rows_by_image(result) -> dict[str, np.ndarray]:
    t = result.sql("SELECT image, y, x, prob FROM heatmaps ORDER BY image, y, x").fetchnumpy()
    return {k: t["prob"][t["image"] == k] for k in np.unique(t["image"])}


def test_results_equal_the_api_and_land_in_the_catalog(vgg, tmp_path):
    paths = write_images(tmp_path / "imgs", vgg, 4)
    cat_path = tmp_path / "cat.duckdb"
    seen = []
    r = kdb.explain_dataset(vgg, tmp_path / "imgs", patch=PATCH, stride=STRIDE,
                            out=tmp_path / "out", catalog=cat_path, progress=False,
                            on_image=seen.append)
    assert (r.done, r.failed, r.skipped) == (4, 1, 0)
    assert r.failures[0][0].endswith("corrupt.png") and "cannot read image" in r.failures[0][1]
    assert sorted(x["image"] for x in seen) == sorted(paths + [str(tmp_path / "imgs" /
                                                                    "corrupt.png")])
    got = rows_by_image(r)
    assert sorted(got) == sorted(paths)
    for p in paths:  # the oracle: one occlude call per file, computed independently
        hm = kdb.occlude(vgg, p, patch=PATCH, stride=STRIDE, progress=False)
        np.testing.assert_array_equal(got[p], hm.probs.reshape(-1).astype(np.float32))
        t = r.sql(f"SELECT DISTINCT target, label FROM heatmaps WHERE image = '{p}'").fetchall()
        assert t == [(hm.target, hm.label)]
    # the SQL a user writes over the results, checked against numpy on the same rows
    worst = dict(r.sql("SELECT image, max(1 - prob) FROM heatmaps GROUP BY image").fetchall())
    for p in paths:
        assert worst[p] == pytest.approx(float(np.max(1 - got[p])), abs=1e-6)
    # one part per image, nothing temporary left, the settings written beside them
    files = sorted(os.listdir(r.folder))
    assert len([f for f in files if f.endswith(".parquet")]) == 4
    assert "_settings.json" in files and not [f for f in files if f.endswith(".tmp")]
    with Catalog(cat_path, read_only=True) as cat:
        (ds,) = cat.datasets()
        assert (ds["images_done"], ds["images_failed"]) == (4, 1)
        runs = cat.con.sql("SELECT image, status, cells, part FROM dataset_runs "
                           "ORDER BY image").fetchall()
    assert [x[1] for x in runs] == ["failed"] + ["done"] * 4
    assert all(x[2] == len(got[x[0]]) for x in runs if x[1] == "done")
    # the catalog's part names point at the files, read back by DuckDB
    con = duckdb.connect()
    for image, _, cells, part in runs[1:]:
        n = con.execute(f"SELECT count(*) FROM read_parquet('{r.folder}/{part}')").fetchone()[0]
        assert n == cells


def test_resume_recomputes_only_what_is_missing(vgg, tmp_path, monkeypatch):
    paths = write_images(tmp_path / "imgs", vgg, 5, bad=False)
    cat_path = tmp_path / "cat.duckdb"

    class Crash(Exception):
        pass

    real = Catalog.record_dataset_runs

    def crash_on_third(self, dataset_id, job, rows):  # the process dies before row 3 lands
        if len(done) == 2:
            raise Crash
        real(self, dataset_id, job, rows)

    done: list[str] = []
    monkeypatch.setattr(Catalog, "record_dataset_runs", crash_on_third)
    with pytest.raises(Crash):
        kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "out",
                            catalog=cat_path, progress=False,
                            on_image=lambda rec: done.append(rec["image"]))
    monkeypatch.setattr(Catalog, "record_dataset_runs", real)
    # the third image's part was written before the crash, its catalog row was not
    parts = {f: os.stat(os.path.join(dp, f)).st_mtime_ns
             for dp, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".parquet")}
    assert len(parts) == 3
    again: list[str] = []
    r = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "out",
                            catalog=cat_path, progress=False, on_image=again.append)
    assert (r.done, r.failed, r.skipped) == (2, 0, 3)
    assert sorted(x["image"] for x in again) == sorted(set(paths) - set(done))
    assert [x["status"] for x in again].count("recovered") == 1
    # the parts of the first call were not rewritten
    for f, mtime in parts.items():
        assert os.stat(os.path.join(r.folder, f)).st_mtime_ns == mtime
    with Catalog(cat_path, read_only=True) as cat:
        st = cat.con.sql("SELECT status, count(*) FROM dataset_runs GROUP BY 1 ORDER BY 1"
                         ).fetchall()
        (ds,) = cat.datasets()
    assert st == [("done", 4), ("recovered", 1)] and ds["images_done"] == 5
    assert sorted(rows_by_image(r)) == sorted(paths)
    # a third run does nothing; resume=False recomputes every image into the same five parts
    r3 = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "out",
                             progress=False)
    assert (r3.done, r3.skipped) == (0, 5)
    r4 = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "out",
                             progress=False, resume=False)
    assert r4.done == 5 and len([f for f in os.listdir(r4.folder) if f.endswith(".parquet")]) == 5
    # other settings are another dataset beside it
    r5 = kdb.explain_dataset(vgg, paths[:1], patch=PATCH, stride=2, out=tmp_path / "out",
                             progress=False)
    assert r5.done == 1 and r5.folder != r4.folder


def test_sources_arrays_pil_globs_catalog_and_duplicates(vgg, tmp_path):
    paths = write_images(tmp_path / "imgs", vgg, 3, bad=False)
    arrays = [np.asarray(Image.open(p)) for p in paths]
    r = kdb.explain_dataset(vgg, iter(arrays + [Image.open(paths[0])] + [arrays[1]]),
                            patch=PATCH, stride=STRIDE, out=tmp_path / "a", progress=False)
    assert (r.done, r.skipped) == (4, 1)  # the repeated array is the same content
    got = rows_by_image(r)
    files = rows_by_image(kdb.explain_dataset(vgg, str(tmp_path / "imgs" / "*.png"),
                                              patch=PATCH, stride=STRIDE, out=tmp_path / "b",
                                              progress=False))
    for i, p in enumerate(paths):  # decoded pixels and their PNG give the same map
        np.testing.assert_array_equal(got[f"array-{i}"], files[p])
    np.testing.assert_array_equal(got["array-3"], files[paths[0]])
    with Catalog(tmp_path / "cat.duckdb") as cat:
        for p in paths[:2]:
            cat.register_image(p, os.path.basename(p))
        r = kdb.explain_dataset(vgg, cat, patch=PATCH, stride=STRIDE, out=tmp_path / "c",
                                catalog=cat, progress=False)
        assert r.done == 2
        assert sorted(rows_by_image(r)) == ["img00.png", "img01.png"]
        # read from the catalog given as images=, recorded nowhere without catalog=
        r2 = kdb.explain_dataset(vgg, cat, patch=PATCH, stride=STRIDE, out=tmp_path / "d",
                                 progress=False)
        assert r2.done == 2 and r2.dataset_id is None
        np.testing.assert_array_equal(rows_by_image(r)["img00.png"], files[paths[0]])


def test_all_classes_and_a_fixed_target(vgg, tmp_path):
    paths = write_images(tmp_path / "imgs", vgg, 2, bad=False)
    r = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, target=1,
                            all_classes=True, out=tmp_path / "o", progress=False)
    t = r.dataset().to_table().to_pydict()
    hm = kdb.occlude(vgg, paths[0], patch=PATCH, stride=STRIDE, target=1, all_classes=True,
                     progress=False)
    sel = [i for i, im in enumerate(t["image"]) if im == paths[0]]
    assert set(t["target"]) == {1}
    np.testing.assert_allclose(np.array([t["probs"][i] for i in sel]),
                               hm.all_probs.reshape(len(sel), -1), atol=0)


@pytest.mark.parametrize("kw, msg", [
    (dict(backend="spark"), "backend must be one of"),
    (dict(workers=2), "for backend='ray'"),
    (dict(patch=0), "patch"),
    (dict(engine="duckdb"), "unknown option 'engine'"),
    (dict(resume="yes"), "resume must be True or False"),
    (dict(on_image=3), "on_image must be"),
])
def test_bad_arguments_are_refused_before_anything_runs(vgg, tmp_path, kw, msg):
    paths = write_images(tmp_path / "imgs", vgg, 1, bad=False)
    with pytest.raises(InputError, match=msg):
        kdb.explain_dataset(vgg, paths, out=tmp_path / "o", progress=False,
                            **{"patch": PATCH, "stride": STRIDE, **kw})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("images, msg", [
    ("{tmp}/nothing/*.png", "no files match"),
    ("{tmp}/empty", "holds no image files"),
    ("{tmp}/missing.png", "is not a folder, a file or a glob"),
    ([], "images is empty"),
    ([3.5], r"images\[0\] is a float"),
])
def test_bad_image_sources(vgg, tmp_path, images, msg):
    (tmp_path / "empty").mkdir()
    if isinstance(images, str):
        images = images.format(tmp=tmp_path)
    with pytest.raises(InputError, match=msg):
        kdb.explain_dataset(vgg, images, patch=PATCH, stride=STRIDE, out=tmp_path / "o",
                            progress=False)


def test_the_language_explains_a_dataset(vgg, tmp_path):
    """occlusion(images => ...) gives the rows explain_dataset writes, for a glob and for
    registered images; EXPLAIN counts the images and estimates the total; SHOW DATASETS."""
    paths = write_images(tmp_path / "imgs", vgg, 3)
    s = kdb.connect(tmp_path / "cat.duckdb")
    s.sql(f"CREATE MODEL vgg FROM '{vgg.source}'")
    q = (f"SELECT image, y, x, prob FROM occlusion(model => 'vgg', images => "
         f"'{tmp_path}/imgs/*.png', patch => {PATCH}, stride => {STRIDE}) ORDER BY ALL")
    rows = s.sql(q).fetchall()
    api = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "api",
                              progress=False)
    assert rows == api.sql("SELECT image, y, x, prob FROM heatmaps ORDER BY ALL").fetchall()
    # results default to datasets/ beside the catalog; the corrupt image is recorded failed
    assert os.path.isdir(tmp_path / "datasets")
    (ds,) = s.sql("SHOW DATASETS").fetchall()
    assert ds[1] == "vgg" and ds[3] == str(tmp_path / "datasets") and ds[5:7] == (3, 1)
    plan = dict(s.sql("EXPLAIN " + q).fetchall())
    assert plan["dataset"].startswith(f"images 4 ({tmp_path}/imgs/*.png)")
    per_image = float(plan["estimate"].split("predicted runtime ")[1].split(" s")[0])
    assert f"estimated total {4 * per_image:.1f} s" in plan["dataset"]
    # registered images by name pattern, every class
    s.sql(f"CREATE IMAGES FROM '{tmp_path}/imgs/img*.png'")
    got = s.sql(f"SELECT image, class, prob FROM occlusion(model => 'vgg', images => "
                f"'catalog:img0[01]', patch => {PATCH}, stride => {STRIDE}, target => ALL) "
                "WHERE y = 0 AND x = 0 ORDER BY ALL").fetchall()
    hm = kdb.occlude(vgg, paths[1], patch=PATCH, stride=STRIDE, all_classes=True,
                     progress=False)
    k = hm.all_probs.shape[-1]
    assert [g[0] for g in got] == ["img00"] * k + ["img01"] * k
    np.testing.assert_allclose([g[2] for g in got[k:]], hm.all_probs[0, 0], atol=1e-6)


@pytest.mark.parametrize("call, msg", [
    ("model => 'vgg', image => 'a', images => 'b'", "not both"),
    ("model => 'vgg', image => 'a', workers => 2", "goes with images"),
    ("model => 'vgg', images => 'catalog:zz*'", "no registered image matches 'zz\\*'"),
    ("model => 'vgg', images => '{tmp}/none/*.png'", "no files match"),
    ("model => 'vgg', images => '{tmp}/imgs', engine => 'duckdb'", "positions and engine"),
    ("model => 'vgg', images => '{tmp}/imgs', backend => 'spark'", "backend"),
])
def test_dataset_queries_refuse_bad_input(vgg, tmp_path, call, msg):
    write_images(tmp_path / "imgs", vgg, 1, bad=False)
    s = kdb.connect(tmp_path / "cat.duckdb")
    s.sql(f"CREATE MODEL vgg FROM '{vgg.source}'")
    with pytest.raises(kdb.KryptonError, match=msg):
        s.sql(f"SELECT * FROM occlusion({call.format(tmp=tmp_path)}, patch => {PATCH})")
    assert s.sql("SHOW DATASETS").fetchall() == []


def test_a_pyarrow_uri_as_the_output(vgg, tmp_path):
    """out= as a pyarrow.fs URI goes through pyarrow's filesystem (here file://), the same
    parts as a plain folder."""
    paths = write_images(tmp_path / "imgs", vgg, 2, bad=False)
    uri = (tmp_path / "viauri").as_uri()
    r = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=uri, progress=False)
    assert r.done == 2 and r.location == uri
    plain = kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "plain",
                                progress=False)
    assert sorted(os.listdir(r.folder)) == sorted(os.listdir(plain.folder))
    a, b = rows_by_image(r), rows_by_image(plain)
    for p in paths:
        np.testing.assert_array_equal(a[p], b[p])
    with pytest.raises(InputError, match="not a usable pyarrow.fs location"):
        kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out="nosuchfs://x/y",
                            progress=False)


def test_a_dataset_run_keeps_no_views(vgg, tmp_path):
    """Each image of a dataset is explained once: its views are not kept in the model's view
    cache (the cache is for interactive queries that come back to an image)."""
    vgg.executor.view_cache.clear()
    paths = write_images(tmp_path / "imgs", vgg, 2, bad=False)
    kdb.explain_dataset(vgg, paths, patch=PATCH, stride=STRIDE, out=tmp_path / "o",
                        progress=False)
    assert vgg.executor.view_cache.stats()["entries"] == 0
    assert kdb.occlude(vgg, paths[0], patch=PATCH, stride=STRIDE,
                       progress=False).stats["views"] == "materialized"
    assert vgg.executor.view_cache.stats()["entries"] == 1
