"""The web viewer's HTTP and WebSocket API against a server started here on 127.0.0.1 (a
small VGG-like ONNX net, so these run in seconds; the browser tests in test_web_browser.py
use the real brain-MRI VGG16). Oracles: the catalog file read with plain SQL, the Python API
and naive re-inference for the values the viewer computes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from PIL import Image
from conftest import held_by_another_process
from test_occlusion import NETS
from websockets.sync.client import connect as ws_connect

import krypton_db as kdb
from krypton_db.catalog import Catalog
from krypton_db.errors import InputError
from krypton_db.web import ViewerServer
from krypton_db.web.store import UPLOAD_FOLDER


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A catalog with one recorded run (all classes) of a small net on a PNG file."""
    d = tmp_path_factory.mktemp("viewer")
    net, (h, w) = NETS["vgg"]()
    onnx.save(net, d / "vgg.onnx")
    px = (np.random.default_rng(5).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(px).save(d / "scan.png")
    m = kdb.load_model(d / "vgg.onnx")
    hm = kdb.occlude(m, d / "scan.png", patch=4, stride=4, all_classes=True,
                     catalog=d / "cat.duckdb", progress=False)
    return dict(dir=d, model=m, image=d / "scan.png", run_id=hm.stats["run_id"], hm=hm,
                catalog=d / "cat.duckdb")


@pytest.fixture(scope="module")
def server(setup):
    with ViewerServer(setup["catalog"], port=0, lock_timeout=1.0, max_upload=200_000) as srv:
        yield srv


def get(srv, path):
    with urllib.request.urlopen(srv.url + path, timeout=60) as r:
        return r.status, r.headers.get("content-type"), r.read()


def call(srv, path, body=None, method=None, raw: bytes | None = None, headers=None):
    """(status, JSON) of a request (POSTs with the viewer page's ``x-krypton`` header unless
    ``headers`` says otherwise); error statuses are answered, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"content-type": "application/json", "x-krypton": "1"}
    hdrs.update(headers or {})
    req = urllib.request.Request(srv.url + path, data=data, method=method,
                                 headers={k: v for k, v in hdrs.items() if v is not None})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_job(srv, job: dict, timeout=120) -> dict:
    t0 = time.monotonic()
    while job["state"] not in ("done", "failed"):
        assert time.monotonic() - t0 < timeout, job
        time.sleep(0.05)
        job = call(srv, f"/api/jobs/{job['id']}")[1]
    return job


def test_serves_on_loopback_only(server):
    assert server.sock.getsockname()[0] == "127.0.0.1"
    status, ctype, body = get(server, "/")
    assert status == 200 and b"app.js" in body and ctype.startswith("text/html")
    assert get(server, "/static/app.js")[0] == 200


def test_catalog_listing_equals_the_catalog_file(server, setup):
    status, c = call(server, "/api/catalog")
    assert status == 200
    with Catalog(setup["catalog"], read_only=True) as cat, cat.connection() as con:
        runs = con.execute("SELECT id, mode, heatmap_h, heatmap_w FROM runs "
                           "ORDER BY id DESC").fetchall()
        models = con.execute("SELECT id, name, version FROM models ORDER BY id").fetchall()
        images = con.execute("SELECT id, name, width, height FROM images ORDER BY id").fetchall()
    got_runs = [(r["id"], r["mode"], r["heatmap_h"], r["heatmap_w"]) for r in c["runs"]]
    assert got_runs[-len(runs):] == runs[-len(got_runs):] or got_runs == runs
    assert [(m["id"], m["name"], m["version"]) for m in c["models"]] == models
    assert [(i["id"], i["name"], i["width"], i["height"]) for i in c["images"]] == images


def test_run_grid_and_class_view_equal_the_api(server, setup):
    hm, rid = setup["hm"], setup["run_id"]
    status, run = call(server, f"/api/runs/{rid}")
    assert status == 200 and run["all_classes"]
    g = run["grid"]
    assert g["ys"] == sorted({int(y) for y in hm.positions[..., 0].ravel()})
    np.testing.assert_allclose(np.asarray(g["values"], np.float32), hm.probs, rtol=0, atol=0)
    k = (hm.target + 1) % hm.all_probs.shape[-1]
    g2 = call(server, f"/api/runs/{rid}/classes/{k}")[1]
    np.testing.assert_allclose(np.asarray(g2["values"], np.float32), hm.all_probs[..., k], atol=0)
    ids = f"model_id={run['model_id']}&image_id={run['image_id']}"
    base = call(server, f"/api/base?{ids}&target=")[1]
    assert base["target"] == hm.target and abs(base["base_prob"] - hm.base_prob) < 1e-6


def test_images_render_as_png(server, setup):
    run = call(server, f"/api/runs/{setup['run_id']}")[1]
    _, ctype, data = get(server,
                         f"/api/models/{run['model_id']}/images/{run['image_id']}/input.png")
    import io
    got = np.asarray(Image.open(io.BytesIO(data)))
    want = np.asarray(Image.open(setup["image"]))  # already the model's input size
    assert ctype == "image/png" and got.shape == want.shape
    assert np.abs(got.astype(int) - want).max() <= 1
    assert get(server, f"/api/images/{run['image_id']}/thumb.png")[1] == "image/png"


def test_explanation_job_records_a_run_equal_to_naive_reinference(server, setup):
    run = call(server, f"/api/runs/{setup['run_id']}")[1]
    status, job = call(server, "/api/explain", dict(
        model_id=run["model_id"], image_id=run["image_id"], patch=4, stride=6,
        region=[0, 0, 13, 13]))
    assert status == 200 and job["positions"] == 9 and job["estimate_s"] > 0
    job = wait_job(server, job)
    assert job["state"] == "done" and job["done"] == job["total"] == 9, job
    new = call(server, f"/api/runs/{job['run_id']}")[1]
    assert new["settings"]["region"] == [0, 0, 13, 13] and new["settings"]["stride"] == [6, 6]
    ys, xs = new["grid"]["ys"], new["grid"]["xs"]
    pos = [(y, x) for y in ys for x in xs]
    naive = kdb.occlude(setup["model"], setup["image"], patch=4, positions=pos, mode="naive",
                        progress=False)
    np.testing.assert_allclose(np.asarray(new["grid"]["values"]).ravel(), naive.probs.ravel(),
                               atol=1e-5)


@pytest.mark.parametrize("form,words", [
    (dict(patch=0), "patch"),
    (dict(stride="x"), "stride"),
    (dict(mode="fast"), "mode must be one of"),
    (dict(region=[5, 5, 2, 2]), "region"),
    (dict(color=[0.1, 0.2]), "color"),
    (dict(target=999), "class index 999"),
    (dict(bogus=1), "unknown explanation option 'bogus'"),
    (dict(mode="approximate"), "no tuned tau"),
    (dict(drilldown={"r": 0.5}), "go with mode 'drilldown'"),
    (dict(precision="half"), "precision must be one of fast, exact"),
    (dict(mode="drilldown", drilldown={"r": 2}), "drilldown r must lie in (0, 1]"),
])
def test_bad_explanation_requests_name_the_problem(server, setup, form, words):
    run = call(server, f"/api/runs/{setup['run_id']}")[1]
    status, body = call(server, "/api/explain", dict(model_id=run["model_id"],
                                                     image_id=run["image_id"], **form))
    assert status == 400 and words in body["error"], body


def test_unknown_ids_and_non_json(server):
    assert call(server, "/api/explain", dict(model_id=99, image_id=1))[0] == 404
    assert call(server, "/api/runs/12345")[1]["error"] == "no run 12345 in the catalog"
    assert call(server, "/api/runs/abc")[0] == 400
    status, body = call(server, "/api/explain", raw=b"{not json")
    assert status == 400 and "JSON object" in body["error"]
    assert call(server, "/api/jobs/77")[0] == 404


def test_uploads_are_checked_limited_and_kept_under_the_catalog_folder(server, setup):
    d = setup["dir"]
    status, body = call(server, "/api/uploads?name=notes.png", raw=b"this is not an image")
    assert status == 400 and "not a readable image" in body["error"]
    status, body = call(server, "/api/uploads?name=big.png", raw=b"\0" * 300_000)
    assert status == 413 and "limit is 200000" in body["error"]
    status, body = call(server, "/api/uploads?name=x.exe", raw=b"MZ")
    assert status == 400 and "unknown image type '.exe'" in body["error"]
    px = (np.random.default_rng(9).random((20, 24)) * 255).astype(np.uint8)
    import io
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    status, img = call(server, "/api/uploads?name=../../escape%20me.png", raw=buf.getvalue())
    assert status == 200 and img["name"] == "escape_me"
    assert (img["width"], img["height"]) == (24, 20)
    written = [p for p in d.rglob("*")
               if p.is_file() and p.suffix == ".png" and p != setup["image"]]
    assert written and all(p.parent == d / UPLOAD_FOLDER for p in written)
    assert not (d.parent / "escape me.png").exists()
    assert not list((d / UPLOAD_FOLDER).glob(".part-*"))
    with Catalog(setup["catalog"], read_only=True) as cat, cat.connection() as con:
        blob, dtype = con.execute("SELECT pixels, dtype FROM images "
                                  "WHERE name = 'escape_me'").fetchone()
    assert dtype == "uint8"
    np.testing.assert_array_equal(np.frombuffer(blob, np.uint8).reshape(20, 24), px)


def test_live_probe_equals_the_api_and_drops_stale_requests(server, setup):
    run = call(server, f"/api/runs/{setup['run_id']}")[1]
    m, img = setup["model"], setup["image"]
    url = server.url.replace("http://", "ws://") + "/api/live"
    with ws_connect(url, open_timeout=30) as ws:
        ws.send(json.dumps(dict(type="probe", y=0, x=0, seq=0)))
        assert "send a start message" in json.loads(ws.recv(timeout=60))["error"]
        ws.send(json.dumps(dict(type="start", model_id=run["model_id"], image_id=run["image_id"],
                                patch=[5, 5], color=0.25, target=None, extra=1)))
        assert "unknown live option 'extra'" in json.loads(ws.recv(timeout=60))["error"]
        ws.send(json.dumps(dict(type="start", model_id=run["model_id"], image_id=run["image_id"],
                                patch=[5, 5], color=0.25, target=None)))
        assert json.loads(ws.recv(timeout=60))["type"] == "ready"
        for seq, (y, x) in enumerate([(3, 7), (0, 0), (100, -4)]):
            ws.send(json.dumps(dict(type="probe", y=y, x=x, seq=seq)))
            got = json.loads(ws.recv(timeout=60))
            h, w = m.graph.input_shape[1:]
            want_y, want_x = min(max(y, 0), h - 5), min(max(x, 0), w - 5)
            assert (got["seq"], got["y"], got["x"]) == (seq, want_y, want_x)
            api = kdb.occlude(m, img, patch=5, positions=[(want_y, want_x)], color=0.25,
                              all_classes=True, progress=False)
            naive = kdb.occlude(m, img, patch=5, positions=[(want_y, want_x)], color=0.25,
                                mode="naive", progress=False)
            assert got["prob"] == pytest.approx(float(api.probs.ravel()[0]), abs=1e-6)
            assert got["prob"] == pytest.approx(float(naive.probs.ravel()[0]), abs=1e-5)
            assert got["top"][0]["prob"] == pytest.approx(float(api.all_probs.max()), abs=1e-6)
        # a burst: positions asked while one is computed are dropped, the newest is answered
        n = 40
        for seq in range(100, 100 + n):
            ws.send(json.dumps(dict(type="probe", y=seq % 9, x=2, seq=seq)))
        answers = []
        while not answers or answers[-1]["seq"] != 100 + n - 1:
            answers.append(json.loads(ws.recv(timeout=60)))
        assert len(answers) < n and answers == sorted(answers, key=lambda a: a["seq"])
        ws.send("not json")
        assert "must be JSON" in json.loads(ws.recv(timeout=60))["error"]


def test_explain_analyze_of_a_recorded_run(server, setup):
    """The run's query in the language, analyzed by the language's EXPLAIN ANALYZE: the same
    positions, and the run's own settings in the query."""
    rid, hm = setup["run_id"], setup["hm"]
    status, body = call(server, f"/api/runs/{rid}/explain-analyze")
    assert status == 200, body
    q = body["query"]
    assert "patch => (4, 4)" in q and "stride => (4, 4)" in q and f"target => {hm.target}" in q
    text = "\n".join(plan for _, plan in body["rows"])
    assert f"EXPLAIN ANALYZE: {hm.probs.size} positions" in text
    listed = kdb.occlude(setup["model"], setup["image"], patch=4, positions=[(0, 0)],
                         catalog=setup["catalog"], progress=False).stats["run_id"]
    status, body = call(server, f"/api/runs/{listed}/explain-analyze")
    assert status == 400 and "listed positions" in body["error"]


def test_refine_drilldown_job_and_its_analysis(server, setup):
    """A drill-down request with select 'refine' (no r) runs the adaptive refinement: the run
    records the rule and no r, its computed positions equal naive re-inference, and its
    EXPLAIN ANALYZE query carries the same drill-down settings."""
    run = call(server, f"/api/runs/{setup['run_id']}")[1]
    status, job = call(server, "/api/explain", dict(
        model_id=run["model_id"], image_id=run["image_id"], patch=4, stride=2, mode="drilldown",
        drilldown={"speedup": 2, "select": "refine"}))
    assert status == 200, job
    job = wait_job(server, job)
    assert job["state"] == "done", job
    new = call(server, f"/api/runs/{job['run_id']}")[1]
    dd = new["settings"]["drilldown"]
    assert dd["select"] == "refine" and dd["speedup"] == 2 and "r" not in dd
    hm = kdb.occlude(setup["model"], setup["image"], patch=4, stride=2,
                     drilldown=dict(speedup=2, select="refine"), progress=False)
    ys, xs = new["grid"]["ys"], new["grid"]["xs"]
    got = np.asarray(new["grid"]["values"]).reshape(len(ys), len(xs))
    np.testing.assert_allclose(got, hm.probs, atol=1e-6)  # the same run through the API
    computed = np.argwhere(hm.stats["drilldown"]["stage2_mask"])[:5]
    pos = [(ys[i], xs[j]) for i, j in computed]
    naive = kdb.occlude(setup["model"], setup["image"], patch=4, positions=pos, mode="naive",
                        progress=False)
    np.testing.assert_allclose(got[tuple(computed.T)], naive.probs.ravel(), atol=1e-5)
    status, body = call(server, f"/api/runs/{job['run_id']}/explain-analyze")
    assert status == 200, body
    assert "drilldown => {speedup: 2.0, select: 'refine'}" in body["query"]
    assert "EXPLAIN ANALYZE" in "\n".join(plan for _, plan in body["rows"])


def test_other_web_pages_cannot_drive_the_viewer(server, setup):
    """Writes need the page's header; a foreign Host (DNS rebinding) and a foreign Origin on
    the WebSocket are refused."""
    for path, kw in (("/api/explain", dict(body=dict(model_id=1, image_id=1))),
                     ("/api/uploads?name=a.png", dict(raw=b"x"))):
        status, body = call(server, path, headers={"x-krypton": None}, **kw)
        assert status == 403 and "x-krypton" in body["error"]
    req = urllib.request.Request(server.url + "/api/catalog", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 400
    url = server.url.replace("http://", "ws://") + "/api/live"
    with pytest.raises(Exception) as exc, ws_connect(url, origin="http://evil.example") as ws:
        ws.recv(timeout=30)
    assert "1008" in str(exc.value) or "403" in str(exc.value)
    with ws_connect(url, origin=server.url) as ws:  # the viewer's own page
        ws.send(json.dumps(dict(type="probe", y=0, x=0, seq=1)))
        assert "start message" in json.loads(ws.recv(timeout=30))["error"]


def test_a_changed_model_file_is_a_clear_message(tmp_path):
    """A catalog model whose ONNX file changed since registration: explaining and live
    occlusion say so (the catalog's refusal), and the server goes on."""
    net, (h, w) = NETS["resnet"]()
    onnx.save(net, tmp_path / "m.onnx")
    img = (np.random.default_rng(1).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "i.png")
    m = kdb.load_model(tmp_path / "m.onnx")
    kdb.occlude(m, tmp_path / "i.png", patch=4, stride=8, catalog=tmp_path / "c.duckdb",
                progress=False)
    w0 = net.graph.initializer[0]  # the same net with one weight changed
    a = onnx.numpy_helper.to_array(w0).copy()
    a.flat[0] += 1.0
    w0.CopyFrom(onnx.numpy_helper.from_array(a, w0.name))
    onnx.save(net, tmp_path / "m.onnx")
    with ViewerServer(tmp_path / "c.duckdb", port=0) as srv:
        status, body = call(srv, "/api/explain", dict(model_id=1, image_id=1, patch=4))
        assert status == 400 and "changed since it was registered" in body["error"]
        url = srv.url.replace("http://", "ws://") + "/api/live"
        with ws_connect(url) as ws:
            ws.send(json.dumps(dict(type="start", model_id=1, image_id=1, patch=[4, 4])))
            assert "changed since it was registered" in json.loads(ws.recv(timeout=60))["error"]
        assert call(srv, "/api/catalog")[0] == 200


def test_server_survives_an_internal_error(server, monkeypatch):
    def broken():
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.store, "models", broken)
    status, body = call(server, "/api/catalog")
    assert status == 500 and body["error"] == "internal error (RuntimeError): disk on fire"
    monkeypatch.undo()
    assert call(server, "/api/catalog")[0] == 200


def test_busy_catalog_is_a_clear_message(server, setup):
    with held_by_another_process(setup["catalog"]):
        status, body = call(server, "/api/catalog")
        assert status == 503 and "locked by another process" in body["error"], body
    assert call(server, "/api/catalog")[0] == 200


def test_read_only_viewer_refuses_writes(setup):
    with ViewerServer(setup["catalog"], port=0, read_only=True) as srv:
        assert call(srv, "/api/catalog")[1]["read_only"] is True
        status, body = call(srv, "/api/explain", dict(model_id=1, image_id=1))
        assert status == 409 and "read-only" in body["error"]
        status, body = call(srv, "/api/uploads?name=a.png", raw=b"x")
        assert status == 409 and "read-only" in body["error"]


def test_bad_port_and_missing_catalog_are_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"port must be an integer in \[0, 65535\]"):
        ViewerServer(tmp_path / "c.duckdb", port=70000)
    with pytest.raises(kdb.KryptonError, match="no catalog at"):
        ViewerServer(tmp_path / "missing.duckdb", port=0, read_only=True)


def test_krypton_serve_command(setup, tmp_path):
    """`krypton serve` prints its 127.0.0.1 URL, answers, and stops on SIGINT."""
    import signal

    p = subprocess.Popen([sys.executable, "-m", "krypton_db", "serve", "--catalog",
                          str(setup["catalog"]), "--port", "0", "--read-only"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("krypton viewer on http://127.0.0.1:"), line + p.stderr.read()
        url = line.split()[3]
        with urllib.request.urlopen(url + "/api/catalog", timeout=30) as r:
            assert json.loads(r.read())["read_only"] is True
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    assert p.returncode in (0, 130)
