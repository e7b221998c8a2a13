"""Per-position output regions (planner.regions): each query's exact box covers every cell
its patch changes (oracle: the numpy reference executor run on the original and the occluded
image, every layer compared), is never larger than the published size, and runs equal to
naive re-inference and to ONNX Runtime at corners, edges and centre."""

import numpy as np
import onnx
import pytest
from test_occlusion import NETS

import krypton_db as kdb
from krypton_db.exec import reference
from krypton_db.images import color_to_input
from krypton_db.occlusion import grid_positions, occlude
from krypton_db.planner import regions
from krypton_db.planner.delta_plan import plan_occlusion


@pytest.fixture(params=list(NETS))
def net(request, tmp_path):
    model, (h, w) = NETS[request.param]()
    p = tmp_path / f"{request.param}.onnx"
    onnx.save(model, p)
    img = np.random.default_rng(11).random((h, w, 3)).astype(np.float32)
    return kdb.load_model(p), img, p


def _edge_positions(h, w, ph, pw):
    ys = sorted({0, 1, 2, (h - ph) // 2, h - ph - 1, h - ph} - {-1})
    xs = sorted({0, 1, 3, (w - pw) // 2, w - pw - 2, w - pw} - {-1, -2})
    return np.array([(y, x) for y in ys for x in xs if 0 <= y <= h - ph and 0 <= x <= w - pw])


@pytest.mark.parametrize("patch", [(1, 1), (3, 5), (4, 4)])
def test_exact_boxes_cover_every_changed_cell(net, patch):
    m, img, _ = net
    g = m.graph
    h, w = g.input.shape[1:]
    plan = plan_occlusion(g, patch, regions="position")
    pos = _edge_positions(h, w, *patch)
    boxes = regions.exact_intervals(plan, pos)
    x = m.to_nchw(m.preprocess(img)[None]).astype(np.float64)
    names = [n for n, b in boxes.items() if b is not None]
    base = reference.run(g, x, outputs=names)
    occl = np.repeat(x, len(pos), axis=0)
    for i, (y, xx) in enumerate(pos):
        occl[i, :, y : y + patch[0], xx : xx + patch[1]] = 0.37
    after = reference.run(g, occl, outputs=names)
    sizes = plan.sizes()
    checked = 0
    for name in names:
        if base[name].ndim != 4:
            continue
        b = boxes[name]
        hh, ww = base[name].shape[2:]
        assert (b.y0 >= 0).all() and (b.x0 >= 0).all() and (b.y1 < hh).all() and (b.x1 < ww).all()
        if sizes.get(name) is not None and len(g[name].shape) == 3:
            # never larger than the published (position-independent) size
            assert ((b.y1 - b.y0 + 1) <= sizes[name][0]).all() and ((b.x1 - b.x0 + 1) <= sizes[name][1]).all()
        changed = np.abs(after[name] - base[name]).max(axis=1) > 0  # [B, H, W]
        for q in range(len(pos)):
            inside = np.zeros((hh, ww), bool)
            inside[b.y0[q] : b.y1[q] + 1, b.x0[q] : b.x1[q] + 1] = True
            assert not (changed[q] & ~inside).any(), (name, pos[q].tolist())
            checked += int(changed[q].any())
    assert checked > len(pos)  # the patches changed cells in several layers


def test_exact_boxes_are_smaller_at_borders_than_published():
    """VGG16 at patch 4: the published sizes give 8.59x; each position's exact boxes 11.82x
    (the border clip and the phase of strided layers); the runs' batches of 48 in batch order
    in between (10.8x)."""
    g = kdb.load_model("zoo:vgg16").graph
    plan = plan_occlusion(g, (4, 4), regions="position")
    pos = grid_positions(224, 224, (4, 4), (4, 4))[0].reshape(-1, 2)
    full = plan.macs_full * len(pos)
    assert full / (plan.macs_inc * len(pos)) == pytest.approx(8.59, rel=0.01)
    exact = full / regions.position_macs(plan, pos)
    batched = full / regions.position_macs(plan, pos, batch=48)
    assert exact == pytest.approx(11.82, rel=0.01)
    assert 8.59 < batched < exact
    # one position at the centre, alone: no larger than the published size at any step
    one = regions.batch_windows(plan, np.array([[110, 110]]))
    sizes = plan.sizes()
    assert all(s[0] <= sizes[n][0] and s[1] <= sizes[n][1] for n, (_, s) in one.items())


def test_batch_order_is_a_permutation_putting_equal_sizes_together():
    g = kdb.load_model("zoo:resnet18").graph
    plan = plan_occlusion(g, (8, 8), regions="position")
    pos = grid_positions(224, 224, (8, 8), (8, 8))[0].reshape(-1, 2)
    order = regions.batch_order(plan, pos)
    assert sorted(order.tolist()) == list(range(len(pos)))
    # batches in this order cost fewer multiply-adds than batches in grid order
    assert regions.position_macs(plan, pos, batch=32) < regions.position_macs(plan, pos, batch=32,
                                                                             ordered=False)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_position_regions_equal_naive_and_published_on_small_nets(net, precision):
    m, img, _ = net
    h, w = m.spec.size
    for patch, stride in (((3, 5), (2, 3)), (4, 3)):
        kw = dict(patch=patch, stride=stride, all_classes=True, precision=precision)
        naive = occlude(m, img, mode="naive", **kw)
        pub = occlude(m, img, regions="published", batch_size=5, **kw)
        pos = occlude(m, img, regions="position", batch_size=5, **kw)
        assert np.abs(pos.all_probs - naive.all_probs).max() <= 1e-5
        assert np.abs(pos.all_probs - pub.all_probs).max() <= 1e-5
        assert naive.probs.std() > 1e-5  # not a flat map


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet18", "inception3"])
def test_zoo_corners_edges_centre_equal_onnx_runtime(name):
    """The zoo models at corners, edges and centre, patch 4 / 8 / 16: per-position regions
    equal naive re-inference by ONNX Runtime on the occluded images (1e-5, precision exact;
    our own naive mode against the regions is the small nets' test above)."""
    import onnxruntime as ort  # the oracle

    path = kdb.zoo.zoo_path(name)
    m = kdb.load_model(path)
    h, w = m.spec.size
    img = kdb.sample_image("chelsea")
    x = m.to_nchw(m.preprocess(img)[None])
    # one session for the three patch sizes (a session per ort_run call re-serialized the
    # 528 MB VGG16 each time: 3/4 of this test's time)
    so = ort.SessionOptions()  # as onnx_builders.ort_run: no graph rewrites in the oracle
    so.intra_op_num_threads = 2
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for p in (4, 8, 16):
        pos = np.array([(0, 0), (0, w - p), (h - p, 0), (h - p, w - p), (0, (w - p) // 2),
                        ((h - p) // 2, 0), (h - p, w // 3), (w // 5, w - p - 1),
                        ((h - p) // 2, (w - p) // 2), (1, 2), (h - p - 1, w - p - 3)])
        got = occlude(m, img, patch=p, positions=pos, regions="position", precision="exact",
                      all_classes=True)
        occl = np.repeat(x, len(pos), axis=0)
        black = color_to_input(0.0, m.spec)[:, None, None]
        for i, (y, xx) in enumerate(pos):
            occl[i, :, y : y + p, xx : xx + p] = black
        want = sess.run(None, {sess.get_inputs()[0].name: occl.astype(np.float32)})[0]
        probs = want if np.allclose(want.sum(axis=1), 1, atol=1e-4) else _softmax(want)
        assert np.abs(got.all_probs[0] - probs).max() <= 1e-5, p


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_regions_option_from_the_language_and_the_api(net, tmp_path):
    """``regions => 'published'`` runs the published sizes (EXPLAIN says which, the run's
    settings record it); both spellings give the same heat map; a bad value is the same
    error from the API and the language."""
    m, img, path = net
    from PIL import Image

    Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "img.png")
    with kdb.connect(tmp_path / "c.duckdb") as s:
        s.sql(f"CREATE MODEL net FROM '{path}'; CREATE IMAGE img FROM '{tmp_path / 'img.png'}'")
        q = "SELECT y, x, prob FROM occlusion('net', 'img', patch => 3, stride => 2{}) ORDER BY y, x"
        assert "regions position" in str(s.explain(q.format("")))
        assert "regions published" in str(s.explain(q.format(", regions => 'published'")))
        a = np.array(s.sql(q.format("")).fetchall())
        b = np.array(s.sql(q.format(", regions => 'published'")).fetchall())
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
        settings = s.sql("SELECT settings FROM runs ORDER BY id").fetchall()
        assert "regions" not in str(settings[0][0]) and "published" in str(settings[1][0])
        with pytest.raises(kdb.KryptonError, match="regions must be one of") as lang:
            s.sql(q.format(", regions => 'exact'"))
    with pytest.raises(kdb.InputError, match="regions must be one of") as api:
        occlude(m, img, patch=3, stride=2, regions="exact")
    assert "position" in str(lang.value) and "position" in str(api.value)
