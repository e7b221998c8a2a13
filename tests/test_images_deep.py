"""Full-precision images: one scaling rule for every container (a uint16 array, the same
data as a 16-bit PNG and as .npy give the same model input, (v / 65535 * 255 * scale -
mean) / std, never quantized to 8 bits), float arrays as they are, DICOM through pydicom
(modality LUT, the file's window when the model asks, MONOCHROME1 inverted) checked against
pydicom's own LUT functions on the DICOM files pydicom ships."""

import numpy as np
import onnx
import pydicom
import pytest
from onnx_builders import Net
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_voi_lut

import krypton_db as kdb
from krypton_db.errors import InputError
from krypton_db.graph import Preprocess
from krypton_db.images import pixels

MEAN, STD = [100.0, 110.0, 120.0], [50.0, 60.0, 70.0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    net = Net((1, 3, 24, 20), seed=2)
    y = net.op("Relu", [net.conv("input", 3, 4)])
    f = net.op("Flatten", [y], axis=1)
    p = tmp_path_factory.mktemp("deep") / "m.onnx"
    onnx.save(net.model(net.op("Softmax", [net.gemm(f, 4 * 24 * 20, 3)], axis=1)), p)
    return kdb.load_model(p, preprocess={"mean": MEAN, "std": STD})


def test_uint16_array_png16_and_npy_give_one_input(model, tmp_path):
    v = np.random.default_rng(1).integers(0, 65536, size=(24, 20), dtype=np.uint16)
    v[0, :4] = [0, 1, 257, 65535]  # 1 and 257 differ only below 8 bits
    Image.fromarray(v).save(tmp_path / "v.png")  # a 16-bit grey PNG
    np.save(tmp_path / "v.npy", v)
    assert Image.open(tmp_path / "v.png").mode.startswith("I")
    want = ((v.astype(np.float64) / 65535 * 255 * model.spec.scale)[None]
            - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    for src in (v, tmp_path / "v.png", tmp_path / "v.npy", Image.open(tmp_path / "v.png")):
        x = model.preprocess(src)
        assert x.dtype == np.float32 and x.shape == (3, 24, 20)
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-5)
    x = model.preprocess(v)
    assert x[0, 0, 1] != x[0, 0, 0] and x[0, 0, 1] < x[0, 0, 2]  # not quantized to 8 bits
    f = v.astype(np.float32) / 65535  # a float array in [0, 1]: the same input
    np.testing.assert_allclose(model.preprocess(f), want, rtol=1e-6, atol=1e-5)
    # resized in float: the 8-bit path would round 257/65535 and 1/65535 alike
    big = np.kron(v, np.ones((2, 2), np.uint16))  # 48 x 40 -> 24 x 20
    xb = model.preprocess(big)
    assert np.unique(xb[0]).size > 256  # more levels than 8 bits hold


def test_float_images_out_of_range_are_refused(model):
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        model.preprocess(np.full((24, 20), 1.5, np.float32))


def _spec(ds, window=False):
    return Preprocess(size=tuple(ds.pixel_array.shape), channels=1, window=window,
                      mean=(0.0,), std=(1.0,))


def test_dicom_modality_lut_and_stored_range():
    path = get_testdata_file("CT_small.dcm")  # int16, rescale slope 1, intercept -1024
    ds = pydicom.dcmread(path)
    got = pixels(path, _spec(ds))[:, :, 0]
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = -32768 + float(ds.RescaleIntercept), 32767 + float(ds.RescaleIntercept)
    np.testing.assert_allclose(got, (hu - lo) / (hi - lo), rtol=0, atol=1e-6)


def test_dicom_window_matches_pydicom_voi_lut(tmp_path):
    path = get_testdata_file("MR_small.dcm")  # window centre 600, width 1600
    ds = pydicom.dcmread(path)
    got = pixels(path, _spec(ds, window=True))[:, :, 0]
    voi = apply_voi_lut(ds.pixel_array, ds).astype(np.float64)  # pydicom's own VOI LUT
    ymin, ymax = -(2 ** 15), 2 ** 15 - 1  # its output range for signed 16-bit data
    np.testing.assert_allclose(got, (voi - ymin) / (ymax - ymin), rtol=0, atol=1e-5)
    assert 0.0 < got.mean() < 1.0 and got.std() > 0.05
    ds.PhotometricInterpretation = "MONOCHROME1"  # inverted: bright = low values
    ds.save_as(tmp_path / "m1.dcm")
    inv = pixels(tmp_path / "m1.dcm", _spec(ds, window=True))[:, :, 0]
    np.testing.assert_allclose(inv, 1.0 - got, atol=1e-6)


def test_dicom_through_the_api_and_the_language(model, tmp_path):
    path = get_testdata_file("MR_small.dcm")
    hm = kdb.occlude(model, path, patch=8, stride=8, progress=False)
    assert hm.probs.shape == (3, 2) and np.isfinite(hm.probs).all()
    m2 = kdb.load_model(model.source, preprocess={"window": True})
    assert m2.spec.window and not model.spec.window
    assert not np.allclose(m2.preprocess(path), model.preprocess(path))
    with pytest.raises(InputError, match="window"):
        kdb.load_model(model.source, preprocess={"window": "yes"})
    s = kdb.connect(tmp_path / "c.duckdb")
    s.sql(f"CREATE MODEL w FROM '{model.source}' WITH (window => true); "
          f"CREATE IMAGE scan FROM '{path}'")
    rows = s.sql("SELECT count(*) FROM occlusion('w', 'scan', patch => 8, stride => 8)").fetchall()
    assert rows == [(6,)]
    s.close()


def test_dicom_heat_map_in_original_coordinates(model, tmp_path):
    path = get_testdata_file("MR_small.dcm")  # 64 x 64, the model input is 24 x 20
    hm = kdb.occlude(model, path, patch=8, stride=8, progress=False)
    assert hm.to_image().shape == (64, 64) and hm.to_image(original_size=False).shape == (24, 20)
    out = hm.save(tmp_path / "mr.png")
    assert Image.open(out).size[0] > 0


def test_sixteen_bit_files_of_any_format_keep_their_depth(model, tmp_path):
    """A 16-bit PGM reads by the same rule as the PNG (the mode decides, not the suffix)."""
    v = (np.arange(24 * 20, dtype=np.uint32).reshape(24, 20) * 136).astype(np.uint16)
    Image.fromarray(v).save(tmp_path / "v.png")
    Image.fromarray(v).save(tmp_path / "v.pgm")
    assert Image.open(tmp_path / "v.pgm").mode.startswith("I")
    np.testing.assert_allclose(model.preprocess(tmp_path / "v.pgm"),
                               model.preprocess(tmp_path / "v.png"), atol=1e-6)


def test_colour_dicom_is_rgb():
    """YBR_FULL_422 DICOM (a file pydicom ships; others it would download: never here):
    pydicom's pixel_array is RGB already (converted once, not twice); the first pixel is red,
    and the values are pixel_array over the stored range."""
    ybr = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")
    ds = pydicom.dcmread(ybr)
    spec = Preprocess(size=ds.pixel_array.shape[:2], channels=3)
    p = pixels(ybr, spec)
    assert p[0, 0, 0] > 0.9 and p[0, 0, 1:].max() < 0.1
    want = ds.pixel_array.astype(np.float64) / (2 ** ds.BitsStored - 1)
    np.testing.assert_allclose(p, want, atol=1e-6)
