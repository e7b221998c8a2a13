"""The Python API's run behaviour: a progress bar on stderr for long runs (silenced by
progress=False, the caller's on_batch still called), and runs at listed positions recorded
in the catalog like grid runs."""

import re

import duckdb
import numpy as np

import krypton_db as kdb
from krypton_db import api
from krypton_db.hooks import OcclusionHooks


def test_progress_bar_on_stderr(tiny_nets, capsys, monkeypatch):
    monkeypatch.setattr(api, "PROGRESS_DELAY_S", 0.0)  # a "long" run: show it at once
    model, img = tiny_nets["vgg"]
    seen = []
    hooks = OcclusionHooks(on_batch=lambda done, total: seen.append((done, total)))
    hm = kdb.occlude(model, img, patch=3, stride=2, batch_size=16, hooks=hooks)
    n = hm.probs.size
    err = capsys.readouterr().err
    # tqdm writes the rate as pos/s, or as s/pos while it is below one (a slow first batch
    # that compiles kernels in a fresh environment)
    assert f"occlusion({model.name})" in err and re.search(rf"\b\d+/{n}\b.*(pos/s|s/pos)", err), err
    assert seen[-1] == (n, n) and len(seen) == -(-n // 16)  # the caller's hook, every batch
    assert hooks.on_batch is not None and hooks.on_batch.__name__ == "<lambda>"  # restored
    kdb.occlude(model, img, patch=3, stride=2, batch_size=16, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(api, "PROGRESS_DELAY_S", 60.0)  # a short run shows nothing
    kdb.occlude(model, img, patch=3, stride=2)
    assert capsys.readouterr().err == ""


def test_listed_positions_are_recorded(tiny_nets, tmp_path):
    model, img = tiny_nets["resnet"]
    path = tmp_path / "runs.duckdb"
    pos = [(0, 0), (7, 3), (20, 18)]
    hm = kdb.occlude(model, img, patch=4, positions=pos, catalog=path, progress=False)
    run_id = hm.stats["run_id"]
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT y, x, prob FROM heatmaps WHERE run_id = ? ORDER BY y, x",
                           [run_id]).fetchall()
        settings = con.execute("SELECT settings FROM runs WHERE id = ?", [run_id]).fetchone()[0]
    assert [(y, x) for y, x, _ in rows] == pos
    np.testing.assert_allclose([p for *_, p in rows], hm.probs.reshape(-1), rtol=1e-6)
    assert '"positions": "listed"' in str(settings) or "listed" in str(settings)


def test_tune_reports_per_image_and_tau(tiny_nets, capsys, monkeypatch):
    """tune's bar names the image and the tau being run (shown at once: a fake long run)."""
    import tqdm as tqdm_module

    real = tqdm_module.tqdm

    def eager(*a, **kw):
        kw["delay"] = 0.0
        kw["mininterval"] = 0.0
        return real(*a, **kw)

    monkeypatch.setattr("krypton_db.approx.tqdm", eager)
    model, img = tiny_nets["vgg"]
    imgs = [img, img[::-1].copy(), img[:, ::-1].copy()]
    kdb.tune(model, imgs, patch=3, stride=2, taus=(1.0, 0.8, 0.6))
    err = capsys.readouterr().err
    assert f"tune({model.name})" in err and "image 1/2 tau 0.8" in err and "held-out" in err, err
    kdb.tune(model, imgs, patch=3, stride=2, taus=(1.0, 0.8, 0.6), progress=False)
    assert "tune(" not in capsys.readouterr().err


def test_drilldown_runs_are_grid_runs_in_the_catalog(tiny_nets, tmp_path):
    model, img = tiny_nets["vgg"]
    path = tmp_path / "dd.duckdb"
    hm = kdb.occlude(model, img, patch=3, stride=2, drilldown=True, catalog=path,
                     progress=False)
    with duckdb.connect(str(path), read_only=True) as con:
        settings = con.execute("SELECT settings FROM runs WHERE id = ?",
                               [hm.stats["run_id"]]).fetchone()[0]
    assert "listed" not in settings and "drilldown" in settings
