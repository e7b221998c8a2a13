"""The incremental executor's gather (``exec/gather_cpu.py``) against a plain numpy oracle:
per query, the view with the patch pasted in, read at the read-in origin, fill outside."""

import numpy as np
import pytest

from krypton_db.exec import gather_cpu as GC


def oracle(view, patch, ploc, rloc, size, fill):
    c, h, w = view.shape
    hr, wr = size
    ph, pw = patch.shape[1:3]
    out = np.full((c, hr, wr, ploc.shape[0]), fill, np.float32)
    for q in range(ploc.shape[0]):
        full = np.full((c, h + 2 * hr, w + 2 * wr), fill, np.float32)  # a frame of fill
        full[:, hr : hr + h, wr : wr + w] = view
        y, x = ploc[q] + (hr, wr)
        full[:, y : y + ph, x : x + pw] = patch[..., q]
        y, x = rloc[q] + (hr, wr)
        out[..., q] = full[:, y : y + hr, x : x + wr]
    return out


@pytest.mark.parametrize("c,h,w,size,ps,nq", [
    (3, 20, 17, (9, 9), (4, 4), 37),      # B not a multiple of 16, non-square view
    (16, 14, 14, (15, 15), (11, 11), 64),  # read-in wider than the view (fill on both sides)
    (5, 30, 30, (19, 23), (7, 5), 16),     # rows longer than one 16-float move, non-square patch
    (2, 9, 9, (9, 9), (9, 9), 17),         # the patch is the whole view
    (4, 12, 12, (3, 2), (6, 6), 5),        # read-ins smaller than the patch (it is cropped)
    (6, 40, 36, (7, 5), (3, 3), 1),        # one query: only its window's box is copied
    (6, 40, 36, (7, 5), (3, 3), 2),        # two: the box of both, offset inside the view
])
@pytest.mark.parametrize("fill", [0.0, -np.inf])
def test_gather_matches_oracle(c, h, w, size, ps, nq, fill):
    rng = np.random.default_rng(c * 100 + nq)
    view = rng.standard_normal((c, h, w), dtype=np.float32)
    patch = rng.standard_normal((c, ps[0], ps[1], nq), dtype=np.float32)
    ploc = np.stack([rng.integers(0, h - ps[0] + 1, nq), rng.integers(0, w - ps[1] + 1, nq)], 1)
    # read-ins around the patch, some reaching past every border, some not touching the patch
    rloc = ploc + rng.integers(-size[0], ps[0] + 1, (nq, 2))
    out = np.empty((c, size[0], size[1], nq), np.float32)
    GC.gather(view, patch, ploc, rloc, size, fill, out)
    np.testing.assert_array_equal(out, oracle(view, patch, ploc, rloc, size, fill))


def test_transpose_ragged_edges():
    rng = np.random.default_rng(0)
    for n, m in [(16, 16), (37, 50), (5, 3), (64, 225)]:
        a = rng.standard_normal(n * m + 20, dtype=np.float32)
        out = np.zeros(m * (n + 3) + 7, np.float32)
        GC.transpose_cpu(a, 20, m, out, 7, n + 3, n, m)
        got = out[7:].reshape(m, n + 3)[:, :n]
        np.testing.assert_array_equal(got, a[20:].reshape(n, m).T)


@pytest.mark.parametrize("c,n,h,w", [(3, 27, 17, 17), (2, 64, 7, 7), (5, 5, 9, 20)])
def test_layout_transposes_match_numpy(c, n, h, w):
    """CNHW <-> CHWB around the dense CHWB convs, on bands of rows with a zero frame."""
    from krypton_db.exec import transpose_cpu as TR

    rng = np.random.default_rng(n)
    x = rng.standard_normal((c, n, h, w), dtype=np.float32)
    ylo, yhi, pt, pl = 2, h - 1, 1, 2  # rows 2..h-2 of x, one zero row above, two columns left
    buf = np.full((c, yhi - ylo + 3, w + 3, n), np.nan, np.float32)
    TR.cnhw_to_chwb_cpu(x, ylo, yhi, pt, pl, buf, 0, c)
    want = np.zeros_like(buf)
    want[:, pt : pt + yhi - ylo, pl : pl + w] = x[:, :, ylo:yhi].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(buf, want)
    y = rng.standard_normal((c, 3, w, n), dtype=np.float32)  # a band of 3 output rows at row 2
    out = np.zeros((c, n, h, w), np.float32)
    TR.chwb_to_cnhw_cpu(y, out, 2, 0, c)
    np.testing.assert_array_equal(out[:, :, 2:5], y.transpose(0, 3, 1, 2))
    assert not out[:, :, :2].any() and not out[:, :, 5:].any()
    # no frame left or right (an r x 1 conv's read-in): one transpose per channel
    buf = np.full((c, yhi - ylo + 4, w, n), np.nan, np.float32)
    TR.cnhw_to_chwb_cpu(x, ylo, yhi, 3, 0, buf, 0, c)
    want = np.zeros_like(buf)
    want[:, 3 : 3 + yhi - ylo] = x[:, :, ylo:yhi].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(buf, want)
    # the CWHB layout of a 1 x r conv (filter axis outermost) and back
    cw = np.full((c, w + 4, h + 1, n), np.nan, np.float32)
    TR.cnhw_to_cwhb_cpu(x, 1, 3, cw, 0, c)
    want = np.zeros_like(cw)
    want[:, 3 : 3 + w, 1 : 1 + h] = x.transpose(0, 3, 2, 1)
    np.testing.assert_array_equal(cw, want)
    yc = rng.standard_normal((c, w, h, n), dtype=np.float32)
    out = np.full((c, n, h, w), np.nan, np.float32)
    TR.cwhb_to_cnhw_cpu(yc, out, 0, c)
    np.testing.assert_array_equal(out, yc.transpose(0, 3, 2, 1))


@pytest.mark.parametrize("c,h,w,ps,nq", [(3, 14, 14, (14, 14), 37), (4, 9, 12, (5, 7), 16), (2, 7, 7, (3, 3), 5)])
def test_stitch_matches_numpy(c, h, w, ps, nq):
    rng = np.random.default_rng(nq)
    view = rng.standard_normal((c, h, w), dtype=np.float32)
    patch = rng.standard_normal((c, ps[0], ps[1], nq), dtype=np.float32)
    ploc = np.stack([rng.integers(0, h - ps[0] + 1, nq), rng.integers(0, w - ps[1] + 1, nq)], 1)
    out = np.empty((c, nq, h, w), np.float32)
    GC.stitch(view, patch, ploc, out)
    want = np.repeat(view[:, None], nq, axis=1)
    for q, (y, x) in enumerate(ploc):
        want[:, q, y : y + ps[0], x : x + ps[1]] = patch[..., q]
    np.testing.assert_array_equal(out, want)


@pytest.mark.slow
def test_transposes_on_an_avx2_target_in_a_subprocess(tmp_path):
    """The 16-lane shuffles and masked moves compiled for an AVX2-only CPU (LLVM splits them
    into 8-lane halves): the gather still matches the oracle, and no AVX-512 register is used."""
    from conftest import run_on_avx2

    code = (
        "import numpy as np\n"
        "from krypton_db.exec import gather_cpu as GC, transpose_cpu as TR\n"
        "import test_gather as t\n"
        "t.test_gather_matches_oracle(3, 20, 17, (9, 9), (4, 4), 37, -np.inf)\n"
        "t.test_transpose_ragged_edges()\n"
        "asm = ''.join(TR.transpose_cpu.inspect_asm().values())\n"
        "assert 'zmm' not in asm and 'ymm' in asm, 'not an AVX2 build'\n"
        "print('ok')\n")
    run_on_avx2(code, tmp_path)
