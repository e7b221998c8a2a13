"""The ONNX Model Zoo classics that ship in the ``onnx`` package's light model zoo
(``onnx/backend/test/data/light``: AlexNet, DenseNet-121, GoogLeNet, Inception v2, ResNet-50,
ShuffleNet, SqueezeNet 1.0, VGG-19, ZFNet-512) import, incl. classifier heads that output
``[N, K, 1, 1]`` and a Softmax over the class axis of such a tensor, and compute what ONNX
Runtime computes on the input the onnx test runner feeds them. DenseNet-121 and SqueezeNet
explain end to end with exact == naive.

The light models carry constant weights (``ConstantOfShape``), so their logits are huge and
equal across classes (GoogLeNet's ~1.2e21): there the float32 logits are compared (relative
1e-4), and the stored reference output where the model outputs logits itself (DenseNet-121);
probabilities of equal logits near 1e21 are decided by float32 rounding, in any runtime's
summation order. So every model also runs with seeded random weights in place of the
constants (its own topology, well-conditioned outputs), probabilities and logits against ONNX
Runtime, and the explanations run on those."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import rel_err
from onnx import numpy_helper
from onnx.backend.test.runner import Runner
from onnx_builders import logits_tensor, ort_run, with_outputs

import krypton_db as kdb

LIGHT = sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("*.onnx"))


def runner_input(onx: onnx.ModelProto) -> np.ndarray:
    """The input onnx's backend test runner generates for a light model."""
    inits = {i.name for i in onx.graph.initializer}
    x = next(i for i in onx.graph.input if i.name not in inits)
    return Runner.generate_dummy_data(x, seed=0, name="", random=False)


def with_random_weights(onx: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The same topology with every ``ConstantOfShape`` weight replaced by seeded random
    values: He-scaled conv filters, BN scales / variances and per-channel multipliers in
    [0.5, 1.5], small biases and means."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    shapes = {i.name: numpy_helper.to_array(i) for i in onx.graph.initializer}
    consumer = {}
    for n in onx.graph.node:
        for k, name in enumerate(n.input):
            consumer.setdefault(name, (n.op_type, k))
    out = onnx.ModelProto()
    out.CopyFrom(onx)
    del out.graph.node[:]
    for n in onx.graph.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in shapes:
            out.graph.node.append(n)
            continue
        shape = tuple(int(v) for v in shapes[n.input[0]])
        op, k = consumer.get(n.output[0], ("", 0))
        if op == "Conv" and k == 1:
            v = rng.normal(0, np.sqrt(2.0 / max(np.prod(shape[1:]), 1)), shape)
        elif op in ("Gemm", "MatMul") and k == 1:
            v = rng.normal(0, np.sqrt(1.0 / max(min(shape), 1)), shape)
        elif (op == "BatchNormalization" and k in (1, 4)) or op in ("Unsqueeze", "Mul"):
            v = rng.uniform(0.5, 1.5, shape)
        else:
            v = rng.normal(0, 0.1, shape)
        out.graph.node.append(helper.make_node(
            "Constant", [], [n.output[0]], value=numpy_helper.from_array(v.astype(np.float32))))
    return out


def test_the_light_zoo_is_installed():
    assert {p.stem for p in LIGHT} >= {"light_densenet121", "light_squeezenet", "light_resnet50",
                                        "light_vgg19", "light_inception_v1"}


@pytest.mark.slow
@pytest.mark.parametrize("path", LIGHT, ids=lambda p: p.stem)
def test_light_zoo_model_matches_onnx_runtime(path):
    onx = onnx.load(path)
    x = runner_input(onx)
    m = kdb.load_model(path)
    assert m.graph.num_classes == 1000 and m.graph.input_shape == (3, 224, 224)
    ours = m.logits(x).reshape(len(x), -1)
    if m.ends_in_softmax:
        name = logits_tensor(onx)
        want = ort_run(with_outputs(onx, [name]), x, [name])[0].reshape(len(x), -1)
    else:
        want = ort_run(onx, x)[0].reshape(len(x), -1)
        stored = numpy_helper.to_array(onnx.load_tensor(str(path)[:-5] + "_output_0.pb"))
        assert rel_err(ours, stored.reshape(len(x), -1)) <= 1e-4
    assert rel_err(ours, want) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("path", LIGHT, ids=lambda p: p.stem)
def test_light_zoo_topology_with_random_weights_matches_onnx_runtime(path, tmp_path):
    onx = with_random_weights(onnx.load(path))
    onnx.save(onx, tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(size=(1, 3, 224, 224)).astype(np.float32)  # batch 1: static
    m = kdb.load_model(tmp_path / "m.onnx")
    name = logits_tensor(onx) if m.ends_in_softmax else onx.graph.output[0].name
    want_logits = ort_run(with_outputs(onx, [name]), x, [name])[0].reshape(1, -1)
    assert want_logits.std() > 0  # not degenerate: the classes differ
    assert rel_err(m.logits(x).reshape(1, -1), want_logits) <= 1e-4
    want = np.exp(want_logits - want_logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    assert np.abs(m.predict(x) - want).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["light_densenet121", "light_squeezenet"])
def test_conv_head_classics_explain_exact_equals_naive(name, tmp_path):
    onnx.save(with_random_weights(onnx.load(next(p for p in LIGHT if p.stem == name))),
              tmp_path / "m.onnx")
    m = kdb.load_model(tmp_path / "m.onnx")
    img = np.random.default_rng(0).random((224, 224, 3)).astype(np.float32)
    ex = kdb.occlude(m, img, patch=16, stride=104)
    nv = kdb.occlude(m, img, patch=16, stride=104, mode="naive")
    assert ex.probs.shape == (3, 3) and np.abs(ex.probs - nv.probs).max() <= 1e-5
