"""The CHWB pooling kernels of the patch route (``patch_cpu.maxpool_chwb`` / ``avgpool_chwb``:
16 queries per vector register, masked tails) against plain numpy loops, at batch sizes below,
at and across the 16-lane blocks, strides 1 and 2, and read-in windows that hang over the
map's border (where the average's divisor counts only the cells the full layer counts); and the
dense executor's max pool against the float64 reference."""

import numpy as np
import pytest

from krypton_db.exec import patch_cpu as P
from krypton_db.graph import Node, Op


def _node(op, k, s, pads, include_pad):
    return Node("p", op, ("x",), dict(kernel=(k, k), stride=(s, s), pads=pads, ceil_mode=False,
                                     count_include_pad=include_pad), {}, (4, 9, 9))


def _ref(buf, k, s, size, is_max, rloc=None, in_hw=None, pads=None, include_pad=False):
    c, _, _, nb = buf.shape
    out = np.empty((c, size[0], size[1], nb), np.float64)
    for q in range(nb):
        for oy in range(size[0]):
            for ox in range(size[1]):
                win = buf[:, oy * s : oy * s + k, ox * s : ox * s + k, q].astype(np.float64)
                if is_max:
                    out[:, oy, ox, q] = win.max(axis=(1, 2))
                    continue
                y0, x0 = rloc[q, 0] + oy * s, rloc[q, 1] + ox * s
                t, l, b, r = pads
                lo_y, hi_y = (-t, in_hw[0] + b) if include_pad else (0, in_hw[0])
                lo_x, hi_x = (-l, in_hw[1] + r) if include_pad else (0, in_hw[1])
                cnt = (min(y0 + k, hi_y) - max(y0, lo_y)) * (min(x0 + k, hi_x) - max(x0, lo_x))
                out[:, oy, ox, q] = win.sum(axis=(1, 2)) / cnt
    return out


@pytest.mark.parametrize("nb", [1, 13, 16, 27, 48])
@pytest.mark.parametrize("k,s", [(3, 1), (3, 2), (2, 2)])
def test_maxpool_chwb(nb, k, s):
    rng = np.random.default_rng(nb * 10 + k + s)
    buf = rng.standard_normal((5, 9, 11, nb)).astype(np.float32)
    size = ((9 - k) // s + 1, (11 - k) // s + 1)
    got = P.maxpool_chwb(buf, _node(Op.MAXPOOL, k, s, (0, 0, 0, 0), False), size)
    np.testing.assert_array_equal(got, _ref(buf, k, s, size, True).astype(np.float32))


@pytest.mark.parametrize("nb", [1, 13, 16, 27, 48])
@pytest.mark.parametrize("include_pad", [False, True])
@pytest.mark.parametrize("s", [1, 2])
def test_avgpool_chwb_border_divisors(nb, include_pad, s):
    """Read-in windows at the map's corners and edges: cells outside the map are zero in the
    buffer, and the divisor counts the cells inside (plus the declared padding with
    count_include_pad)."""
    rng = np.random.default_rng(nb + 100 * s + include_pad)
    in_hw, pads, k = (9, 9), (1, 1, 1, 1), 3
    rh = rw = 5
    size = ((rh - k) // s + 1, (rw - k) // s + 1)
    rloc = rng.integers(-1, 9 - rh + 2, size=(nb, 2)).astype(np.int64)
    buf = rng.standard_normal((4, rh, rw, nb)).astype(np.float32)
    for q in range(nb):  # zero outside the map, as the gather fills it
        ys = np.arange(rh) + rloc[q, 0]
        xs = np.arange(rw) + rloc[q, 1]
        buf[:, (ys < 0) | (ys >= in_hw[0]), :, q] = 0
        buf[:, :, (xs < 0) | (xs >= in_hw[1]), q] = 0
    node = _node(Op.AVGPOOL, k, s, pads, include_pad)
    got = P.avgpool_chwb(buf, node, rloc, in_hw, size)
    want = _ref(buf, k, s, size, False, rloc, in_hw, pads, include_pad)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,s,pads,ceil", [(3, 2, (0, 0, 0, 0), False), (3, 2, (1, 1, 1, 1), False),
                                          (2, 2, (0, 0, 0, 0), False), (2, 2, (0, 0, 0, 0), True),
                                          (3, 1, (1, 1, 1, 1), False), (3, 3, (1, 0, 0, 1), False),
                                          (5, 2, (2, 1, 2, 1), True), (4, 1, (0, 2, 1, 0), False),
                                          (1, 2, (0, 0, 0, 0), False)])
@pytest.mark.parametrize("hw", [(5, 7), (17, 17), (24, 33), (9, 40)])
def test_dense_maxpool_matches_reference(k, s, pads, ceil, hw):
    """The dense executor's max pool (``kernels_cpu.maxpool_cnhw_cpu``: fused 2- / 3-row and
    2- / 3-tap loops, stride 2 over even / odd cells, -inf padding; general loops otherwise)
    equals the float64 reference executor bit for bit, at widths below, at and past the vector
    width, with asymmetric padding and ceil mode's windows that hang past the map."""
    from krypton_db.exec import cpu as C
    from krypton_db.exec import reference
    from krypton_db.graph import Graph

    c, n = 3, 5
    t, l, b, r = pads
    size = [(d + p0 + p1 - k + ((s - 1) if ceil else 0)) // s + 1 for d, p0, p1 in zip(hw, (t, l), (b, r))]
    g = Graph([Node("x", Op.INPUT, (), {}, {}, (c,) + hw),
               Node("p", Op.MAXPOOL, ("x",), dict(kernel=(k, k), stride=(s, s), pads=pads, ceil_mode=ceil),
                    {}, (c, *size))], "p")
    x = np.random.default_rng(k * 100 + s * 10 + hw[1]).standard_normal((n, c) + hw).astype(np.float32)
    want = reference.run(g, x)["p"].astype(np.float32)
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(C.CpuExecutor(g).predict(x), want)
