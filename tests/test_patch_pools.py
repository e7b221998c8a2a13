"""The CHWB pooling kernels of the patch route (``patch_cpu.maxpool_chwb`` / ``avgpool_chwb``:
16 queries per vector register, masked tails) against plain numpy loops, at batch sizes below,
at and across the 16-lane blocks, strides 1 and 2, and read-in windows that hang over the
map's border (where the average's divisor counts only the cells the full layer counts)."""

import numpy as np
import pytest

from krypton_db.exec import dense_cpu
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


@pytest.mark.parametrize("n", [16, 27])
@pytest.mark.parametrize("k,s,hw,ceil", [(3, 2, (17, 17), False), (2, 2, (9, 12), False),
                                         (3, 3, (13, 10), False), (2, 2, (9, 13), True)])
def test_dense_strided_maxpool_through_chwb(n, k, s, hw, ceil, monkeypatch):
    """The dense executor's strided max pool on a small map runs through the CHWB layout
    (two transposes and these kernels), except in ceil mode; it agrees with the float64 reference executor and with
    the per-plane kernel it replaces."""
    from krypton_db.exec import cpu as C
    from krypton_db.exec import reference
    from krypton_db.graph import Graph

    c = 6
    ho, wo = (-(-(hw[0] - k) // s) + 1, -(-(hw[1] - k) // s) + 1) if ceil else \
        ((hw[0] - k) // s + 1, (hw[1] - k) // s + 1)
    g = Graph([Node("x", Op.INPUT, (), {}, {}, (c,) + hw),
               Node("p", Op.MAXPOOL, ("x",), dict(kernel=(k, k), stride=(s, s), pads=(0, 0, 0, 0),
                                                 ceil_mode=ceil), {}, (c, ho, wo))], "p")
    x = np.random.default_rng(n + k).standard_normal((n, c) + hw).astype(np.float32)
    calls = []
    real = dense_cpu._maxpool_via_chwb
    monkeypatch.setattr(dense_cpu, "_maxpool_via_chwb", lambda *a: (calls.append(1), real(*a))[1])
    got = C.CpuExecutor(g).predict(x)
    # ceil mode's last windows hang past the map: those stay on the per-plane kernel
    assert bool(calls) != ceil, "the CHWB route was not taken" if not ceil else "taken in ceil mode"
    np.testing.assert_array_equal(got, reference.run(g, x)["p"].astype(np.float32))
    monkeypatch.setattr(dense_cpu, "CHWB_POOL_MAX_WO", 0)
    np.testing.assert_array_equal(C.CpuExecutor(g).predict(x), got)
