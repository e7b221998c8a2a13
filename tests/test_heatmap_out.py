"""Heat maps out: ``HeatMap.save`` by suffix round-trips (.npy, .parquet, .csv), the PNG has
its colour bar and caption, ``to_image`` maps back to the original image's size, ``plot``
draws with a colour bar, and query results come out as numpy / pandas / Arrow."""

from __future__ import annotations

import numpy as np
import onnx
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from onnx_builders import Net
from PIL import Image

import krypton_db as kdb
from krypton_db.errors import InputError
from krypton_db.heatmap import cell_map, colormap


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("hmout")
    net = Net((1, 3, 24, 32), seed=4, name="tiny")
    y = net.op("Relu", [net.conv("input", 3, 4)])
    f = net.op("Flatten", [net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])], axis=1)
    onnx.save(net.model(net.op("Softmax", [net.gemm(f, 4 * 12 * 16, 3)], axis=1)), d / "t.onnx")
    return kdb.load_model(d / "t.onnx", labels=["cat", "dog", "owl"])


@pytest.fixture(scope="module")
def image():  # 60 x 80 original: the model input is 24 x 32
    return (np.random.default_rng(2).random((60, 80, 3)) * 255).astype(np.uint8)


def test_save_round_trips(model, image, tmp_path):
    hm = kdb.occlude(model, image, patch=8, stride=4, all_classes=True)
    hm.save(tmp_path / "h.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy"), hm.probs)
    for suffix, read in ((".parquet", pq.read_table), (".csv", pacsv.read_csv)):
        hm.save(tmp_path / f"h{suffix}")
        t = read(tmp_path / f"h{suffix}")
        assert t.column_names == ["y", "x", "prob", "prob_0", "prob_1", "prob_2"]
        pos = hm.positions.reshape(-1, 2)
        assert t.column("y").to_pylist() == pos[:, 0].tolist()
        assert t.column("x").to_pylist() == pos[:, 1].tolist()
        np.testing.assert_allclose(t.column("prob").to_numpy(), hm.probs.reshape(-1), rtol=1e-6)
        np.testing.assert_allclose(t.column(f"prob_{hm.target}").to_numpy(), hm.probs.reshape(-1),
                                   rtol=1e-6)
    with pytest.raises(InputError, match=r"cannot save a heat map as '.xyz'; use one of .png"):
        hm.save(tmp_path / "h.xyz")
    with pytest.raises(InputError, match="does not exist"):
        hm.save(tmp_path / "missing" / "h.png")


def test_png_has_the_overlay_a_colour_bar_and_a_caption(model, image, tmp_path):
    hm = kdb.occlude(model, image, patch=8, stride=4)
    path = hm.save(tmp_path / "h.png")
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    h, w = 24 * 2, 32 * 2  # the overlay, twice the model input size
    assert png.shape[0] == h + 30 + 16 and png.shape[1] > w + 16
    # the colour bar: a column right of the overlay running the colour map from high to low
    bar = png[30 : 30 + h, 8 + w + 8 + 8]
    want = colormap(np.linspace(1.0, 0.0, h)).astype(int)
    assert np.abs(bar[1:-1] - want[1:-1]).max() <= 1
    # the overlay blends the colour-mapped per-pixel drop over the image
    imp = cell_map(hm)
    assert imp.max() > imp.min()
    # the caption is drawn (dark text pixels in the top rows)
    assert (png[:28, :w] < 100).any()


def test_to_image_maps_back_to_the_original_size(model, image):
    hm = kdb.occlude(model, image, patch=8, stride=4)
    small = hm.to_image(original_size=False)
    big = hm.to_image()
    assert small.shape == (24, 32) and big.shape == (60, 80)
    np.testing.assert_allclose(small, cell_map(hm), rtol=1e-6)
    # bilinear: the original-size map's mean stays that of the input-size map
    assert abs(big.mean() - small.mean()) <= 0.05 * max(abs(small.mean()), 1e-6) + 1e-6
    # the largest drop lands at the corresponding place (in relative coordinates)
    iy, ix = np.unravel_index(np.argmax(small), small.shape)
    jy, jx = np.unravel_index(np.argmax(big), big.shape)
    assert abs(jy / 60 - iy / 24) < 0.1 and abs(jx / 80 - ix / 32) < 0.1


def test_plot_draws_with_a_colour_bar(model, image):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hm = kdb.occlude(model, image, patch=8, stride=4)
    ax = hm.plot()
    assert len(ax.figure.axes) == 2  # the image axes and the colour bar
    assert "cat" in ax.get_title() or "dog" in ax.get_title() or "owl" in ax.get_title()
    plt.close(ax.figure)


def test_query_results_as_numpy_pandas_arrow(model, image, tmp_path):
    Image.fromarray(image).save(tmp_path / "i.png")
    with kdb.connect(":memory:") as s:
        s.sql(f"CREATE MODEL t FROM '{model.source}'; CREATE IMAGE i FROM '{tmp_path / 'i.png'}'")
        r = s.sql("SELECT y, x, prob FROM occlusion('t', 'i', patch => 8, stride => 8) ORDER BY y, x")
        rows = r.fetchall()
        cols = r.numpy()
        assert cols["y"].tolist() == [row[0] for row in rows]
        np.testing.assert_allclose(cols["prob"], [row[2] for row in rows], rtol=1e-6)
        df = r.df()
        assert list(df.columns) == ["y", "x", "prob"] and len(df) == len(rows)
        assert r.arrow().num_rows == len(rows)
