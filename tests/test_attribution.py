"""Captum-compatible per-pixel attribution: equals Captum 0.9's ``Occlusion`` (same window,
stride, baseline, target) to 1e-5, also when the stride does not divide the image."""

import numpy as np
import onnx
import pytest
from onnx_builders import Net

import krypton_db as kdb
from krypton_db.occlusion import occlude


def _net(tmp_path):
    net = Net((1, 3, 13, 11), seed=4)
    y = net.op("Relu", [net.conv("input", 3, 6, stride=(2, 2))])
    y = net.op("MaxPool", [y], kernel_shape=[2, 2], strides=[1, 1])
    f = net.op("Flatten", [y], axis=1)
    logits = net.gemm(f, 6 * 6 * 5, 4)
    m = net.model(net.op("Softmax", [logits], axis=1))
    p = tmp_path / "a.onnx"
    onnx.save(m, p)
    return p


def _captum(path, x, patch, stride, target, output, baseline):
    import captum.attr as captum
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onx = onnx.load(str(path))
    logits_name = [n.input[0] for n in onx.graph.node if n.op_type == "Softmax"][0]
    onx.graph.output.append(onnx.ValueInfoProto(name=logits_name))
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])

    def forward(t):  # the ONNX model itself, run by ONNX Runtime, as Captum's forward function
        probs, logits = sess.run(None, {"input": t.detach().numpy().astype(np.float32)})
        return torch.from_numpy(probs if output == "prob" else logits).double()

    occ = captum.Occlusion(forward)
    attr = occ.attribute(torch.from_numpy(x[None]).double(), sliding_window_shapes=(3,) + patch,
                         strides=(3,) + stride, baselines=baseline, target=target,
                         perturbations_per_eval=64)
    return attr[0, 0].numpy()


@pytest.mark.parametrize("patch,stride", [((3, 3), (2, 2)), ((5, 4), (3, 3)), ((5, 5), (5, 5))])
@pytest.mark.parametrize("output", ["prob", "logit"])
def test_attribution_equals_captum(tmp_path, patch, stride, output):
    p = _net(tmp_path)
    m = kdb.load_model(p)
    img = np.random.default_rng(5).random((13, 11, 3)).astype(np.float32)
    hm = occlude(m, img, patch=patch, stride=stride, mode="exact")
    ours = hm.attribution(output=output)
    x = m.preprocess(img)
    theirs = _captum(p, x, patch, stride, hm.target, output, baseline=0.0)
    assert ours.shape == theirs.shape == (13, 11)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.abs(theirs).max() > 1e-3  # a real, non-trivial attribution map
