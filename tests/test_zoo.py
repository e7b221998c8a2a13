"""Tests for krypton_db.zoo: torchvision-topology ONNX classifiers with random weights."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from krypton_db import zoo

# torchvision's parameter counts (BN gamma/beta count, running mean/var do not).
# Re-derived analytically from the layer shapes: vgg16 and resnet18 match the
# published numbers; inception_v3 is published as 27,161,264 *with* AuxLogits
# (conv 768->128 1x1 + BN, conv 128->768 5x5 + BN, fc 768->1000 = 3,326,696).
PARAMS = {"vgg16": 138_357_544, "resnet18": 11_689_512, "inception3": 23_834_568}
N_BN = {"vgg16": 0, "resnet18": 20, "inception3": 94}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("krypton_cache")
        mp.setenv("KRYPTON_CACHE", str(root))
        yield root


@pytest.fixture(scope="module", params=zoo.ZOO)
def saved(request, cache):
    """(name, path, ModelProto) -- built and saved once per model."""
    name = request.param
    path = zoo.zoo_path(name)
    yield name, path, onnx.load(str(path))


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.slow
def test_zoo_path_caches(saved, cache):
    name, path, _ = saved
    assert path.parent == cache / "zoo" and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert zoo.zoo_path(name) == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_checker_and_structure(saved):
    name, path, model = saved
    onnx.checker.check_model(str(path), full_check=True)
    g = model.graph
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    h, w = zoo.input_size(name)
    assert [i.name for i in g.input] == ["input"] and _dims(g.input[0]) == ["N", 3, h, w]
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in g.output] == ["probs"] and _dims(g.output[0]) == ["N", 1000]
    fc, sm = g.node[-2], g.node[-1]
    assert (fc.op_type, list(fc.output)) == ("Gemm", ["logits"])
    assert (sm.op_type, list(sm.input), list(sm.output)) == ("Softmax", ["logits"], ["probs"])
    assert onnx.helper.get_attribute_value(sm.attribute[0]) == 1
    names = [n.name for n in g.node]
    assert all(names) and len(set(names)) == len(names)
    assert all(i.data_location == onnx.TensorProto.DEFAULT and i.raw_data for i in g.initializer)

    bns = [n for n in g.node if n.op_type == "BatchNormalization"]
    assert len(bns) == N_BN[name]
    buffers = {i for n in bns for i in n.input[3:5]}  # running mean / var
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    assert all((inits[n.input[4]] > 0).all() for n in bns)
    assert sum(a.size for k, a in inits.items() if k not in buffers) == PARAMS[name]

    meta = {p.key: p.value for p in model.metadata_props}
    pre = json.loads(meta["krypton.preprocess"])
    assert pre == {"layout": "NCHW", "size": [h, w], "scale": 1 / 255,
                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    labels = json.loads(meta["krypton.labels"])
    assert len(labels) == 1000 and labels[0] == "class_0" and labels[-1] == "class_999"


@pytest.mark.slow
def test_inference(saved):
    name, path, _ = saved
    h, w = zoo.input_size(name)
    batch = 1 if name == "vgg16" else 2  # batch > 1 exercises the symbolic N
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(123).standard_normal((batch, 3, h, w)).astype(np.float32)
    (probs,) = sess.run(["probs"], {"input": x})
    assert probs.shape == (batch, 1000) and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    logits_std = np.log(probs).std(axis=1)  # log-softmax = logits - const: same std
    assert ((logits_std > 0.5) & (logits_std < 50)).all(), logits_std
    if batch == 2:
        assert np.abs(probs[0] - probs[1]).max() > 1e-4  # output depends on the input


def test_deterministic():
    a = zoo.build("resnet18").SerializeToString()
    assert a == zoo.build("resnet18", seed=0).SerializeToString()
    assert a != zoo.build("resnet18", seed=1).SerializeToString()


def test_saved_bytes_match_build(cache):
    assert zoo.zoo_path("resnet18", seed=3).read_bytes() == zoo.build("resnet18", 3).SerializeToString()


def test_input_size():
    assert [zoo.input_size(n) for n in zoo.ZOO] == [(224, 224), (224, 224), (299, 299)]


@pytest.mark.parametrize("fn", [zoo.build, zoo.input_size, zoo.zoo_path])
def test_unknown_name(fn):
    with pytest.raises(ValueError, match="vgg16, resnet18, inception3"):
        fn("alexnet")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("KRYPTON_CACHE", str(tmp_path / "k"))
    assert zoo.cache_dir() == tmp_path / "k"
    monkeypatch.delenv("KRYPTON_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "krypton_db"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_dir() == Path(tmp_path / "home" / ".cache" / "krypton_db")


@pytest.mark.slow
def test_precision_budget(saved):
    """README "Precision" (test_precision_choice.assert_budget) on the zoo models; the exact
    twin runs no Winograd conv."""
    import krypton_db as kdb
    from krypton_db.planner import algorithms
    from test_precision_choice import assert_budget

    name, path, _ = saved
    m = kdb.load_model(path)
    exact = m.with_precision("exact")
    assert {algorithms.conv_algorithm(n) for n in exact.graph.nodes if n.op is kdb.Op.CONV} == {"direct"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert_budget(m, lambda xo: sess.run(["probs"], {"input": xo})[0])
