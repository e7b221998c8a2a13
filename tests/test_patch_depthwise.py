"""The patch route's depthwise conv (``patch_cpu.depthwise_chwb_cpu``: 16 queries per vector
register, masked tails, bias and activation fused) against a float64 numpy loop, at batch
sizes below, at and across the 16-lane blocks, 3x3 / 5x5, stride 1 and 2, dilation 2, and the
activations it applies in registers and the exp-based one it leaves to a pass."""

import numpy as np
import pytest

from krypton_db.exec import conv_cpu
from krypton_db.exec import patch_cpu as P
from krypton_db.graph import ACT_CLIP, ACT_HSWISH, ACT_NONE, ACT_SIGMOID, Node, Op

ACTS = {
    ACT_NONE: (0.0, 0.0, lambda v: v),
    ACT_CLIP: (0.0, 6.0, lambda v: np.clip(v, 0.0, 6.0)),
    ACT_HSWISH: (0.0, 0.0, lambda v: v * np.clip(v / 6.0 + 0.5, 0.0, 1.0)),
    ACT_SIGMOID: (0.0, 0.0, lambda v: 1.0 / (1.0 + np.exp(-v))),
}


@pytest.mark.parametrize("code", sorted(ACTS))
@pytest.mark.parametrize("nb", [1, 13, 16, 27, 48])
@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1), (3, 1, 2)])
def test_depthwise_chwb(code, nb, k, s, d):
    rng = np.random.default_rng(nb * 10 + k + s + code)
    c, hr, wr = 5, 13, 11
    ho, wo = (hr - d * (k - 1) - 1) // s + 1, (wr - d * (k - 1) - 1) // s + 1
    w = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    node = Node("c", Op.CONV, ("x",), dict(kernel=(k, k), stride=(s, s), pads=(0, 0, 0, 0), dilation=(d, d),
                                           groups=c), {"W": w, "B": b}, (c, ho, wo))
    buf = rng.standard_normal((c, hr, wr, nb)).astype(np.float32)
    a0, a1, f = ACTS[code]
    got = P.conv_chwb(buf, node, conv_cpu.ConvWeights.of(node), (code, np.float32(a0), np.float32(a1)), (ho, wo))
    want = np.zeros((c, ho, wo, nb))
    for i in range(k):
        for j in range(k):
            win = buf[:, i * d : i * d + (ho - 1) * s + 1 : s, j * d : j * d + (wo - 1) * s + 1 : s, :]
            want += w[:, 0, i, j, None, None, None].astype(np.float64) * win
    want = f(want + b[:, None, None, None])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
