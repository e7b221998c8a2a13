"""The LLVM-IR row primitives (``krypton_db.exec.simd_cpu``) against numpy slicing."""

import numpy as np
from numba import njit

from krypton_db.exec.kernels_cpu import copy_strided_at


@njit(cache=False)
def _strided(d, doff, s, soff, n, step):
    copy_strided_at(d, doff, s, soff, n, step)


def test_stride2_copy_every_length_and_offset():
    """Stride 2 (the vector shuffle path, scalar tail) and stride 3 (the scalar loop) equal
    numpy's s[soff::step], for lengths across the vector width, at odd offsets, and with the
    last element read being the source's last element (no read past it: the buffer ends
    there)."""
    rng = np.random.default_rng(0)
    for step in (2, 3):
        for n in list(range(0, 40)) + [112, 113, 127]:
            for soff in (0, 1, 5):
                s = rng.standard_normal(soff + step * (n - 1) + 1 if n else soff).astype(np.float32)
                d = np.full(n + 7, -1.0, np.float32)
                _strided(d, 3, s, soff, n, step)
                np.testing.assert_array_equal(d[3 : 3 + n], s[soff::step][:n])
                assert (d[:3] == -1).all() and (d[3 + n :] == -1).all()
