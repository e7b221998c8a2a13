"""Soak: one process runs 300 interactive explanations (a few positions each, alternating two
models, recorded in a catalog) with flat memory: the resident set after the first 50 and at
the end differ by less than 5%. ``bench/soak.py`` runs the same on the real models."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx_builders import Net

import krypton_db as kdb


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def net(seed: int, size: int, width: int, depth: int):
    n = Net((1, 3, size, size), seed=seed, name=f"soak{seed}")
    y, c = "input", 3
    for _ in range(depth):
        y, c = n.op("Relu", [n.conv(y, c, width)]), width
    y = n.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])
    f = n.op("Flatten", [y], axis=1)
    return n.model(n.op("Softmax", [n.gemm(f, width * (size // 2) ** 2, 4)], axis=1))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm (Linux)")
def test_300_interactive_explanations_keep_memory_flat(tmp_path):
    models = []
    for seed, size in ((1, 48), (2, 40)):
        onnx.save(net(seed, size, 16, 3), tmp_path / f"m{seed}.onnx")
        models.append(kdb.load_model(tmp_path / f"m{seed}.onnx"))
    rng = np.random.default_rng(0)
    images = [rng.random((m.spec.size[0], m.spec.size[1], 3)).astype(np.float32) for m in models]
    rss = []
    with kdb.connect(tmp_path / "soak.duckdb") as s:
        for i in range(300):
            m, img = models[i % 2], images[i % 2]
            h, w = m.spec.size
            pos = rng.integers(0, [h - 8, w - 8], size=(int(rng.integers(1, 5)), 2))
            hm = kdb.occlude(m, img, patch=8, positions=pos)
            assert hm.probs.size == len(pos)
            if i % 10 == 0:  # and now and then a recorded grid run
                kdb.occlude(m, img, patch=8, stride=8, catalog=s)
            rss.append(rss_bytes())
    at50, end = rss[49], rss[-1]
    print(f"\nRSS after 50: {at50 / 2**20:.1f} MiB, after 300: {end / 2**20:.1f} MiB "
          f"({100 * (end - at50) / at50:+.2f}%), max {max(rss) / 2**20:.1f} MiB")
    assert abs(end - at50) / at50 < 0.05
